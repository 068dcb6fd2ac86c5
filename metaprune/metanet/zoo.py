"""The zoo of *data models*: independently trained networks the metanetwork learns from.

Layout of a zoo folder::

    zoo/zoo.json                    the zoo's config and the list of finished members
    zoo/member_000/model.safetensors
    zoo/member_000/metrics.json     val / test accuracy, MACs, params, speed-up, seed, epochs
    zoo/member_000/last.pt          resume checkpoint while a member trains (engine.train)

Building is resumable: finished members (``metrics.json`` present) are skipped and a member
interrupted mid-training resumes from its ``last.pt``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from metaprune.data.datasets import DataSplits
from metaprune.engine import TrainConfig, count_macs, count_params, evaluate, seed_everything, train
from metaprune.engine.report import input_shape
from metaprune.engine.runtime import barrier, is_main, resolve_device
from metaprune.engine.train import identity_options
from metaprune.errors import ConfigError, ModelFileError
from metaprune.fingerprint import check_float, check_int, differences
from metaprune.io import load_model, read_json, save_model, write_json

log = logging.getLogger(__name__)
ZOO_INDEX = "zoo.json"
METRICS = "metrics.json"


@dataclass
class ZooConfig:
    """How the data models of a zoo are made.

    Attributes:
        arch: registry name of the architecture (e.g. ``cifar_resnet20``).
        data: dataset name (``fashion-mnist``).
        count: number of members.
        seed: seed of the first member; member ``i`` uses ``seed + i`` for init and batch order.
        data_seed: seed of the train/val split and training subset (the same for every member).
        train_subset: train on this many (seeded) images only; ``None`` uses all.
        init_speedup: initial structured pruning to this MAC speed-up before a short finetune,
            as in the paper (1.0 = none). Needs :mod:`metaprune.pruning`.
        train: the training schedule of every member (default: `metaprune zoo`'s, 4 epochs one-cycle to lr 0.1).
        finetune_epochs: epochs of finetuning after the initial pruning.
    """

    arch: str = "cifar_resnet20"
    data: str = "fashion-mnist"
    count: int = 8
    seed: int = 0
    data_seed: int = 0
    val_fraction: float = 0.1
    train_subset: int | None = None
    init_speedup: float = 1.0
    finetune_epochs: int = 1
    train: TrainConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = TrainConfig(epochs=4, lr=0.1)  # `metaprune zoo`'s defaults
        elif isinstance(self.train, dict):
            unknown = sorted(set(self.train) - {f.name for f in fields(TrainConfig)})
            if unknown:
                raise ConfigError(f"unknown training options {unknown} in the zoo's train settings")
            self.train = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.train.items()})
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"the zoo's train settings must be a mapping of training options, got {self.train!r}")
        check_int("count", self.count, 1)
        check_int("seed", self.seed)
        check_int("data_seed", self.data_seed)
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_int("train_subset", self.train_subset, 1, optional=True)
        check_float("val_fraction", self.val_fraction, above=0, below=1)
        check_float("init_speedup", self.init_speedup, minimum=1.0)
        if self.train.epochs < 1:
            raise ConfigError(f"zoo members need --epochs >= 1, got {self.train.epochs}")


def member_dir(root: str | Path, i: int) -> Path:
    """Folder of member ``i``."""
    return Path(root) / f"member_{i:03d}"


def list_members(root: str | Path) -> list[Path]:
    """Finished members (those with ``metrics.json``), sorted by index."""
    root = Path(root)
    if not root.is_dir():
        raise ModelFileError(f"zoo folder {root} does not exist; build one with `metaprune zoo -o {root}`")
    members = sorted(p for p in root.glob("member_*") if (p / METRICS).exists() and (p / "model.safetensors").exists())
    if not members:
        raise ModelFileError(f"zoo folder {root} holds no finished members; run `metaprune zoo -o {root}` first")
    return members


def load_zoo_data(root: str | Path, data: str | None = None, data_dir: str | None = None) -> DataSplits:
    """The dataset a zoo was trained on, with the same training subset and train/validation split
    (``data`` overrides the dataset name, ``data_dir`` where its files are)."""
    from metaprune.data import load_dataset

    zcfg = read_json(Path(root) / ZOO_INDEX)["config"]
    return load_dataset(data or zcfg["data"], data_dir, val_fraction=zcfg["val_fraction"], seed=zcfg["data_seed"],
                        train_subset=zcfg["train_subset"])


def load_member(path: str | Path) -> tuple[nn.Module, dict]:
    """(model, metrics) of one member folder."""
    model, _ = load_model(Path(path) / "model.safetensors")
    return model, read_json(Path(path) / METRICS)


def _initial_prune(model: nn.Module, data: DataSplits, cfg: ZooConfig, out: Path) -> tuple[nn.Module, float]:
    from metaprune.pruning import PruneConfig, prune  # the pruning stage owns this

    res = prune(model, PruneConfig(speedup=cfg.init_speedup), input_shape=input_shape(model, data))
    pruned = getattr(res, "model", res)
    ft = TrainConfig(**{**asdict(cfg.train), "epochs": cfg.finetune_epochs, "lr": cfg.train.lr * 0.1})
    pruned = train(pruned, data, ft, out_dir=out / "finetune", desc="zoo finetune").model
    return pruned, float(getattr(res, "speedup", 0.0) or 0.0)


def _zoo_identity(cfg: dict) -> dict:
    """The settings that decide what the members are (all but ``count`` and volatile training options)."""
    ident = {k: v for k, v in cfg.items() if k not in ("count", "train")}
    train_cfg = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    ident["train"] = identity_options(train_cfg)
    return ident


def build_zoo(cfg: ZooConfig, data: DataSplits, out_dir: str | Path) -> list[dict]:
    """Train the members of a zoo into ``out_dir`` (skipping finished ones); return their metrics."""
    from metaprune.models import create_model_for_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / ZOO_INDEX
    cfg_dict = asdict(cfg)
    if index_path.exists():
        # finished members are reused and an interrupted one resumes: only for the same settings
        # (the member count may grow; device and similar options may change)
        old = read_json(index_path)
        old = old.get("config") if isinstance(old, dict) else None
        if not isinstance(old, dict):
            raise ModelFileError(f"{index_path} is not a zoo index (no `config` object); use another output folder")
        diff = differences(_zoo_identity(old), _zoo_identity(cfg_dict))
        if diff:
            raise ConfigError(f"{out} is a zoo built with different settings ({'; '.join(diff[:6])}); "
                              "use another output folder or the same settings")
    results = []
    for i in range(cfg.count):
        d = member_dir(out, i)
        if (d / METRICS).exists() and (d / "model.safetensors").exists():
            results.append(read_json(d / METRICS))
            log.info("zoo: member %d already finished, skipped", i)
            continue
        d.mkdir(parents=True, exist_ok=True)
        seed = cfg.seed + i
        seed_everything(seed)
        model = create_model_for_data(cfg.arch, data.num_classes, data.in_chans, data.image_size)
        tcfg = TrainConfig(**{**asdict(cfg.train), "seed": seed})
        res = train(model, data, tcfg, out_dir=d, desc=f"zoo {i + 1}/{cfg.count}")
        model, speedup = res.model, 1.0
        shape = input_shape(model, data)
        base_macs = count_macs(model, shape)
        if cfg.init_speedup > 1.0:
            model, _ = _initial_prune(model, data, cfg, d)
            speedup = base_macs / count_macs(model, shape)
        device = resolve_device(tcfg.device)
        val = evaluate(model, data.val, device=device, desc="val")
        test = evaluate(model, data.test, device=device, desc="test")
        metrics = {"index": i, "seed": seed, "arch": cfg.arch, "data": data.name, "epochs": cfg.train.epochs,
                   "best_epoch": res.best_epoch, "val_acc": val["acc"], "val_loss": val["loss"],
                   "test_acc": test["acc"], "macs": count_macs(model, shape), "params": count_params(model),
                   "speedup": speedup, "train_seconds": res.seconds}
        results.append(metrics)
        if is_main():  # under torchrun every process trained its shard; one writes
            save_model(model, d / "model.safetensors", extra={"zoo_member": i, **metrics})
            write_json(d / METRICS, metrics)
            (d / "last.pt").unlink(missing_ok=True)
            (d / "finetune" / "last.pt").unlink(missing_ok=True)
            if (d / "finetune").is_dir() and not any((d / "finetune").iterdir()):
                (d / "finetune").rmdir()
            write_json(index_path, {"config": cfg_dict, "members": [m["index"] for m in results]})
        barrier()
        log.info("zoo: member %d val %.2f%% test %.2f%%", i, val["acc"], test["acc"])
    if is_main():
        write_json(index_path, {"config": cfg_dict, "members": [m["index"] for m in results]})
    return results
