"""Meta-training: teach the metanetwork edits that keep accuracy and make channels prunable.

Per step, for one zoo member ``theta`` (graph ``G``) and one training batch::

    theta' = graph_params(G, metanet(G))
    loss   = CE(f(x; theta'), y)  +  lam * S(theta') / S(theta)  [+ mu * CE(f(x; gate_r(theta')), y)]

``S`` is DepGraph's group sparsity or its BN-aware variant (``sparsity``).

CE is the batch mean (no dependence on dataset size); ``S`` is DepGraph's polarised group
sparsity (:mod:`metaprune.metanet.loss`) divided by its value on the unedited member, so it
starts at 1 whatever the network's width. The optional pruning-aware term (``prune_aware`` = mu)
is the CE of the edited network with a random fraction ``r`` of every group's channels softly
removed, picked by the same L2 ranking the pruner uses (:func:`metaprune.metanet.loss.soft_prune`):
it rewards edits after which the channels L2 pruning removes are the ones the network can lose.
BatchNorm uses train-mode (batch) statistics inside
``functional_call``; edited networks are BN-recalibrated before they are scored or shipped.

The checkpoint is selected automatically: after every ``score_every`` epochs each validation
member is edited, BN-recalibrated and scored by :func:`metaprune.pruning.prunability_curve`
(area under accuracy vs. MAC speed-up without finetuning, on the *validation* split), and the
epoch with the best mean score is kept in ``OUT/metanet.safetensors``. The test split is never
read. Under torchrun every process scores a share of the validation members and the results are
exchanged through the process group's key-value store, so no process waits inside a collective
(whose timeout would fire) while another one scores. ``OUT/log.jsonl`` has one line per epoch
(both loss terms, the score); ``OUT/last.pt`` (tensors and plain values only, loaded with
``weights_only=True``) makes a rerun of the same run resume: it holds the run's fingerprint (the
zoo members' hashes, the dataset, the meta-training and metanetwork configs), and a rerun that
differs is refused (``resume=False`` / ``--no-resume`` starts afresh). A loss or metanetwork
weights that become NaN or infinite stop the run with :class:`~metaprune.errors.TrainingError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metaprune.data.datasets import DataSplits
from metaprune.data.loader import BatchLoader
from metaprune.engine import progress, seed_everything
from metaprune.engine.runtime import (
    any_process,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    resolve_device,
)
from metaprune.engine.train import drop_stale_temporaries
from metaprune.errors import ConfigError, ModelFileError, TrainingError
from metaprune.fingerprint import all_finite, check_resume, data_identity, dumps
from metaprune.graph import to_graph
from metaprune.io import atomic_path, file_sha256, write_json
from metaprune.metanet.checkpoint import save_metanet
from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
from metaprune.metanet.loss import channel_sq_norms, dependency_groups, group_sparsity, soft_prune
from metaprune.metanet.model import Metanet
from metaprune.metanet.transform import BN_BUFFERS, edit_params, transform_model
from metaprune.metanet.zoo import list_members, load_member

log = logging.getLogger(__name__)
LOG = "log.jsonl"
LAST = "last.pt"
SCORE_WAIT_S = 24 * 3600  # how long a process waits for the others' validation scores
VOLATILE = ("device", "amp", "epochs")  # options a resumed run may change
_EXCHANGES = itertools.count()  # every process makes the same sequence of exchanges


def split_members(members: list[Path], cfg: MetaTrainConfig) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, validation, held-out) members: the last ``holdout`` by index are held out, the
    ``val_members`` before them validate, the rest train."""
    n = len(members)
    if n < cfg.val_members + cfg.holdout_members + 1:
        raise ConfigError(f"the zoo has {n} members; meta-training needs at least val_members + holdout_members + 1 "
                          f"= {cfg.val_members + cfg.holdout_members + 1}; build more with `metaprune zoo --count`")
    end = n - cfg.holdout_members
    return members[: end - cfg.val_members], members[end - cfg.val_members : end], members[end:]


class _Member:
    """A training member: its module (structure), graph, BN buffers, dependency groups and S(theta)."""

    def __init__(self, path: Path, input_shape: tuple[int, ...], alpha: float, sparsity: str = "depgraph"):
        self.path = path
        self.model, self.metrics = load_member(path)
        self.graph = to_graph(self.model)
        sd = self.model.state_dict()
        self.buffers = {k: v.detach().clone() for k, v in sd.items() if k.rsplit(".", 1)[-1] in BN_BUFFERS}
        self.groups = dependency_groups(self.model, input_shape)
        with torch.no_grad():
            self.s0 = float(group_sparsity(dict(sd), self.groups, alpha, sparsity)) or 1.0
            self.norms0 = group_norms(dict(sd), self.groups)
        self.model.train()

    def fresh_buffers(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.buffers.items()}

    def to(self, device: torch.device) -> _Member:
        """Move the module, graph, buffers and reference norms to ``device``."""
        self.model.to(device)
        self.graph = self.graph.to(device)
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        self.norms0 = self.norms0.to(device)
        for g in self.groups:  # index lists live where the parameters are (no copies per step)
            for sl in g.slices:
                sl.idxs, sl.root = sl.idxs.to(device), sl.root.to(device)
        return self


def group_norms(params: dict[str, torch.Tensor], groups) -> torch.Tensor:
    """L2 norm of every prunable channel group (all coupled slices of one root channel), concatenated."""
    return torch.cat([channel_sq_norms(params, g)[0].sqrt() for g in groups])


def norm_shift(params: dict[str, torch.Tensor], m: _Member) -> dict[str, float]:
    """How the edit moved the channel-group norms of member ``m``: fraction of groups whose norm
    dropped, dropped below 50% and below 10% of the original, and the median norm ratio."""
    with torch.no_grad():
        r = group_norms({k: v.detach() for k, v in params.items()}, m.groups) / m.norms0.clamp_min(1e-12)
    return {"groups_down": float((r < 1).float().mean()), "groups_below_50": float((r < 0.5).float().mean()),
            "groups_below_10": float((r < 0.1).float().mean()), "norm_ratio_median": float(r.median())}


def _score_one(net: Metanet | None, path: Path, data: DataSplits, cfg: MetaTrainConfig) -> dict:
    from metaprune.pruning import prunability_curve

    device = resolve_device(cfg.device)  # "auto" / "cuda": this process's GPU under torchrun
    model, _ = load_member(path)
    if net is not None:
        model = transform_model(net, model, data.train, cfg.score_batches, device=device)
    return prunability_curve(model, data, max_speedup=cfg.score_max_speedup, steps=cfg.score_steps,
                             val_batches=cfg.score_batches, calib_batches=cfg.score_batches, device=device)


def gather_patiently(obj) -> list:
    """Every process's ``obj`` (JSON values), in rank order; ``[obj]`` without a process group.

    The values go through the process group's key-value store and each process waits there (up
    to :data:`SCORE_WAIT_S`), not inside a collective: a process that finishes its share early does
    not hit the collective timeout (NCCL's watchdog, gloo's timeout) while another still works.
    """
    world = get_world_size()
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    n = next(_EXCHANGES)
    try:
        store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 - the store torchrun set up
    except Exception:  # noqa: BLE001 - no store reachable: a plain collective
        out: list = [None] * world
        dist.all_gather_object(out, obj)
        return out
    keys = [f"metaprune/meta_train/{n}/{r}" for r in range(world)]
    store.set(keys[get_rank()], json.dumps(obj))
    store.wait(keys, timedelta(seconds=SCORE_WAIT_S))
    return [json.loads(store.get(k)) for k in keys]


def score_members(net: Metanet | None, paths: list[Path], data: DataSplits, cfg: MetaTrainConfig) -> dict:
    """Mean prunability AUC of the members (edited by ``net``, or as they are when ``net`` is None).

    Under torchrun call it on every process: member ``i`` is scored by rank ``i % world_size`` and
    every process gets all the results (:func:`gather_patiently`).
    """
    world, rank = get_world_size(), get_rank()
    mine = {i: _score_one(net, p, data, cfg) for i, p in enumerate(paths) if i % world == rank}
    if world > 1:
        mine = {int(i): c for part in gather_patiently({str(i): c for i, c in mine.items()}) for i, c in part.items()}
    curves = [mine[i] for i in range(len(paths))]
    scores = [c["auc"] for c in curves]
    return {"score": sum(scores) / len(scores), "scores": scores, "curves": curves}


def run_fingerprint(members: list[Path], split: tuple[list[Path], list[Path], list[Path]], data: DataSplits,
                    cfg: MetaTrainConfig, net: Metanet) -> dict:
    """What a resume checkpoint of :func:`meta_train` must match."""
    train_p, val_p, held_p = split
    return {"kind": "meta-train",
            "zoo": {p.name: file_sha256(p / "model.safetensors") for p in [*train_p, *val_p]},
            "split": {"train": [p.name for p in train_p], "val": [p.name for p in val_p],
                      "holdout": [p.name for p in held_p]},
            "data": data_identity(data),
            "config": {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE},
            "metanet": net.cfg.to_dict()}


def _write_log(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


def meta_train(zoo_dir: str | Path, data: DataSplits, out_dir: str | Path, cfg: MetaTrainConfig,
               net_cfg: MetanetConfig | None = None, resume: bool = True) -> dict:
    """Meta-train a metanetwork on the zoo in ``zoo_dir``; write the selected checkpoint to ``out_dir``.

    Returns a summary: selected epoch, its validation score, the originals' score, the split.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    distributed = init_distributed(device)  # torchrun: gradients averaged over processes, data sharded
    net_cfg = net_cfg or MetanetConfig()
    if net_cfg.edit == "scale" and cfg.bn_eval:
        raise ConfigError("the scale edit is undone by BatchNorm's batch statistics, which is what makes it "
                          "function-preserving; meta-train it with train-mode BN (drop --bn-eval)")
    seed_everything(cfg.seed)
    members = list_members(zoo_dir)
    train_p, val_p, held_p = split_members(members, cfg)
    shape = (data.in_chans, data.image_size, data.image_size)
    train_m = [_Member(p, shape, cfg.alpha, cfg.sparsity).to(device) for p in train_p]
    net = Metanet.for_graph(train_m[0].graph, net_cfg).to(device)
    for m in train_m[1:]:
        net.check_graph(m.graph)
    runner = net
    if distributed:
        # the scale edit reads no edge state after the last layer: its edge update gets no gradient
        runner = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=net.cfg.edit == "scale")
    amp = cfg.amp and device.type == "cuda"
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start, best = 0, {"epoch": -1, "score": -1.0}
    baseline = None
    last = out / LAST
    fp = run_fingerprint(members, (train_p, val_p, held_p), data, cfg, net)
    if is_main():  # what a killed run left half-written
        drop_stale_temporaries(out, (LAST, LOG, "metanet.safetensors", "config.json", "summary.json"))
    if resume and last.exists():
        try:
            st = torch.load(last, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{last} is not a readable resume checkpoint ({str(e)[:200]}); pass --no-resume to "
                                 "start afresh or use another -o") from None
        check_resume(last, st.get("fingerprint") if isinstance(st, dict) else None, fp, "meta-training run")
        try:
            net.load_state_dict(st["net"])
            opt.load_state_dict(st["opt"])
            start, history, best, baseline = int(st["epoch"]) + 1, list(st["history"]), dict(st["best"]), st["baseline"]
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{last} is damaged ({str(e)[:200]}); pass --no-resume to start afresh") from None
        if start > cfg.epochs:
            raise ConfigError(f"{last} is a checkpoint after epoch {start} of a run with more epochs than --epochs "
                              f"{cfg.epochs}; pass --no-resume to start afresh or use another -o")
        if not distributed and isinstance(st.get("rng"), torch.Tensor):
            torch.set_rng_state(st["rng"].cpu())
        log.info("meta-train: resuming after epoch %d", start)
    if baseline is None:
        baseline = score_members(None, val_p, data, cfg)["score"]  # every process scores a share
        log.info("meta-train: validation members unedited: prunability %.2f", baseline)
    loader = BatchLoader(data.train, cfg.batch_size, shuffle=True, augment=False, seed=cfg.seed, drop_last=True,
                         rank=get_rank(), world_size=get_world_size(), device=device)
    info = {"zoo": str(zoo_dir), "train_members": [p.name for p in train_p], "val_members": [p.name for p in val_p],
            "holdout_members": [p.name for p in held_p], "data": data.name, "meta_train": asdict(cfg)}
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        net.train()
        loader.set_epoch(epoch)
        batches = iter(loader)
        sums = {"ce": 0.0, "ce_pruned": 0.0, "sparsity": 0.0, "loss": 0.0, "acc": 0.0, "groups_down": 0.0, "groups_below_50": 0.0,
                "groups_below_10": 0.0, "norm_ratio_median": 0.0}
        n = 0
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(train_m), generator=gen).tolist()
        r_max = 1 - cfg.score_max_speedup ** -0.5
        steps = [(i, s) for i in order for s in range(cfg.steps_per_member)]
        for i, _ in progress(steps, f"meta-train {epoch + 1}/{cfg.epochs}"):
            m = train_m[i]
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            m.model.train(not cfg.bn_eval)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                params = edit_params(runner, m.graph, m.fresh_buffers())
                logits = functional_call(m.model, params, (x,))
            params = {k: v.float() if v.is_floating_point() else v for k, v in params.items()}
            ce = F.cross_entropy(logits.float(), y)
            sp = group_sparsity(params, m.groups, cfg.alpha, cfg.sparsity) / m.s0
            loss = ce + cfg.lam * sp
            if cfg.prune_aware > 0:
                r = float(torch.rand((), generator=gen)) * r_max
                gated = soft_prune(params, m.groups, r, cfg.prune_temperature, cfg.prune_hard)
                gated.update(m.fresh_buffers())
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits_p = functional_call(m.model, gated, (x,))
                ce_p = F.cross_entropy(logits_p.float(), y)
                loss = loss + cfg.prune_aware * ce_p
                sums["ce_pruned"] += ce_p.item()
            lv = loss.item()
            if any_process(not math.isfinite(lv), device, distributed):
                raise TrainingError(f"meta-train: the loss became {lv} at epoch {epoch + 1} (member {m.path.name}); "
                                    "the metanetwork diverged. Lower --lr (or --lam / --prune-aware); nothing was "
                                    "saved from this epoch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
            sums["ce"] += ce.item()
            sums["sparsity"] += sp.item()
            sums["loss"] += lv
            sums["acc"] += (logits.argmax(1) == y).float().mean().item() * 100
            for k, v in norm_shift(params, m).items():  # before the step: what this loss saw
                sums[k] += v
        rec = {"epoch": epoch, **{k: v / max(1, n) for k, v in sums.items()}, "steps": n}
        if any_process(not all_finite(net.state_dict().values()), device, distributed):
            raise TrainingError(f"meta-train: the metanetwork's weights became NaN or infinite in epoch {epoch + 1}; "
                                "lower --lr; nothing was saved from this epoch")
        if (epoch + 1) % cfg.score_every == 0 or epoch == cfg.epochs - 1:
            net.eval()
            sc = score_members(net, val_p, data, cfg)  # every process scores a share of the members
            if not math.isfinite(sc["score"]):
                raise TrainingError(f"meta-train: the validation score of epoch {epoch + 1} is {sc['score']} "
                                    f"(members: {sc['scores']}); the edited networks are broken. Lower --lr")
            rec.update(score=sc["score"], member_scores=sc["scores"], baseline_score=baseline)
            if sc["score"] > best["score"]:
                best = {"epoch": epoch, "score": sc["score"]}
                if is_main():
                    save_metanet(net, out, extra={"selected_epoch": epoch, "val_score": sc["score"],
                                                  "val_score_unedited": baseline, **info})
        rec["seconds"] = time.time() - t0
        history.append(rec)
        if is_main():  # one process writes
            _write_log(out / LOG, history)
            with atomic_path(last) as tmp:  # a crash (or kill -9) leaves the previous checkpoint intact
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "history": history,
                            "best": best, "baseline": baseline, "fingerprint": dumps(fp),
                            "rng": torch.get_rng_state()}, tmp)
        barrier()
        log.info("meta-train epoch %d: ce %.3f sparsity %.3f groups down %.1f%% (<50%%: %.1f%%) score %s "
                 "(unedited %.2f)", epoch, rec["ce"], rec["sparsity"], 100 * rec["groups_down"],
                 100 * rec["groups_below_50"], f"{rec['score']:.2f}" if "score" in rec else "-", baseline)
    summary = {"selected_epoch": best["epoch"], "val_score": best["score"], "val_score_unedited": baseline,
               "epochs": cfg.epochs, **info}
    if is_main():
        write_json(out / "summary.json", summary)
    return summary
