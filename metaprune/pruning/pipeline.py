"""Prune a model file end to end: load, measure, prune, (finetune), measure, save, report."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import torch

from metaprune.data.datasets import DataSplits
from metaprune.data.loader import BatchLoader
from metaprune.engine.report import input_shape, model_summary, write_report
from metaprune.engine.runtime import resolve_device
from metaprune.errors import ConfigError
from metaprune.pruning.config import PruneConfig
from metaprune.pruning.engine import layer_widths, prune
from metaprune.pruning.report import add_latency, compare


def _check_fits(model, data: DataSplits) -> None:
    args = getattr(model, "metaprune_arch", {}).get("args", {})
    for key, have in (("in_chans", data.in_chans), ("num_classes", data.num_classes)):
        if args.get(key) not in (None, have):
            raise ConfigError(f"the model has {key}={args[key]} but {data.name} has {have}; use matching data")


def prune_file(source: str | os.PathLike, out_dir: str | os.PathLike, config: PruneConfig,
               data: DataSplits | None = None, finetune=None, device: str = "auto", latency: bool | str | tuple = True,
               eval_batches: int | None = None, trust_pickle: bool = False) -> dict:
    """Prune the model file ``source`` into ``out_dir`` (``model.safetensors`` + ``report.json``).

    Args:
        source: model file (never modified).
        out_dir: output folder.
        config: the pruning target and criterion.
        data: when given, accuracy before / after is measured (test split), the ``taylor`` / ``gate``
            criteria and reconstruction (on by default with data: ``config.reconstruct="auto"``) draw their
            batches from ``data.train``, and finetuning uses it.
        finetune: a :class:`metaprune.engine.TrainConfig`; with ``epochs > 0`` the pruned model is
            finetuned (best epoch on the validation split).
        latency: measure latency (batch 1 and 64) before and after: True (PyTorch), or the runtimes
            (``"torch,onnxruntime"``: onnxruntime too, interleaved; see ``report.add_latency``).

    Returns the report dict that was written.
    """
    from metaprune.io import check_output, load_model, save_model

    out_dir = Path(out_dir)
    if finetune is not None and finetune.epochs > 0 and data is None:
        raise ConfigError("--finetune-epochs needs --data")
    check_output(out_dir / "model.safetensors", (source,))
    dev = resolve_device(device)
    model, info = load_model(source, trust_pickle=trust_pickle)
    if data is not None:
        _check_fits(model, data)
    shape = input_shape(model, data)
    rec_calib = None
    if data is not None and (config.criterion == "gate" or config.reconstruct):  # seeded, shuffled, batch 128
        # (reconstruct "auto", the default, is truthy: with data the pruned model is refitted)
        rec_calib = BatchLoader(data.train, 128, shuffle=True, augment=False, seed=config.seed, device=dev)
    calib = (BatchLoader(data.train, 64, shuffle=False, augment=False, device=dev)
             if config.criterion == "taylor" and data is not None else rec_calib)
    model = model.to(dev)
    example = torch.randn(1, *shape, device=dev)
    result = prune(model, config, example_input=example, calibration=calib, reconstruct_calibration=rec_calib)
    before = model_summary(model, data, dev, latency=False, eval_batches=eval_batches)
    before["file_bytes"] = Path(info.path).stat().st_size
    pruned = result.model
    ft_info = None
    if finetune is not None and finetune.epochs > 0:
        from metaprune.engine import train
        from metaprune.fingerprint import canonical
        from metaprune.io import file_sha256

        cfg = copy.copy(finetune)
        # the resume checkpoint in out_dir belongs to this source and this pruning only (not to
        # another source of the same widths): the run is identified by the source file's hash
        ident = {"source_sha256": file_sha256(info.path), "prune": canonical(asdict(config))}
        res = train(pruned.train(), data, cfg, out_dir=out_dir, desc="finetune", identity=ident)
        pruned = res.model
        ft_info = {"epochs": cfg.epochs, "data": data.name, "best_epoch": res.best_epoch,
                   "best_val_acc": res.best_val_acc, "config": asdict(cfg), "history": res.history}
    pruned.eval()
    after = model_summary(pruned, data, dev, latency=False, eval_batches=eval_batches)
    if latency:  # before and after measured together (interleaved rounds, fixed threads)
        add_latency(before, after, model, pruned, shape, dev, runtimes=latency)
    extra = {"command": "prune", "source": str(source), "ratio": result.ratio, "speedup": result.speedup}
    path = save_model(pruned, out_dir, extra=extra, inputs=(source,), input_size=shape[-1])
    after["file_bytes"] = path.stat().st_size
    report = {"command": "prune", "source": str(source), "output": str(path), "arch": info.arch,
              "config": asdict(config), "result": result.summary(), "before": before, "after": after,
              "ratios": compare(before, after), "finetune": ft_info,
              "widths": {"before": layer_widths(model), "after": layer_widths(pruned)}}
    write_report(out_dir, report, device=dev)
    return report
