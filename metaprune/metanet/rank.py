"""The ranking metanetwork: per-channel importance scores in one forward pass, used as a pruning criterion.

A :class:`~metaprune.metanet.model.Metanet` with ``output="score"`` reads a model's graph (one node per
channel) and returns one score per node. Torch-pruning prunes *groups* (channels several layers share,
e.g. a residual stream), so the scores of a group channel are the mean of the scores of its nodes (the
output channels of every conv / linear layer of the group, :func:`group_nodes`). The scores then rank
channels inside torch-pruning through :class:`metaprune.pruning.criteria.ScoreImportance`, as the
``gate`` criterion's scores do (``PruneConfig(criterion="metanet", metanet=CKPT)``).

Training (:func:`rank_train`): the targets are the per-member ``gate`` scores
(:mod:`metaprune.metanet.targets`); the loss is ListNet's, per group: the cross-entropy between
``softmax(z(target) / tau)`` and ``softmax(prediction)``, ``z`` the standardisation within the group,
averaged over the groups of a member. No data and no forward pass of the member are needed, so a step
costs one metanetwork forward / backward.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaprune.errors import ConfigError, ModelFileError, PruningError
from metaprune.fingerprint import check_float, check_int, fingerprint

#: ranking losses of :class:`RankTrainConfig`
RANK_LOSSES = ("listnet", "pairwise")


#: a pruning group's channels and the graph nodes that carry them
@dataclass
class GroupNodes:
    key: str  # "<root module name>:<out|in>", as ScoreImportance keys it
    n_root: int  # channels of the group's root
    nodes: Tensor  # graph node per (member layer, channel): [M]
    root: Tensor  # the group channel each of those nodes belongs to: [M]
    fallback: Tensor | None = None  # no node maps to the group: functional scores
    functional: Tensor | None = None  # standardised log of the group's functional scores (the score prior)


def _layer_nodes(graph) -> dict[str, Tensor]:
    """Graph nodes of every layer, by layer name, in channel order."""
    names = {int(e["id"]): str(e["name"]) for e in graph.spec.get("layers", [])}
    layer = graph.node_layer.cpu()
    order = torch.argsort(layer, stable=True)
    counts = torch.bincount(layer, minlength=max(names, default=0) + 1)
    out = {}
    for lid, nodes in zip(range(len(counts)), order.split(counts.tolist())):
        if lid in names:
            out[names[lid]] = nodes
    return out


def group_nodes(model: nn.Module, graph, config=None, example_input: Tensor | None = None) -> list[GroupNodes]:
    """The torch-pruning groups of ``model`` (built as the pruning engine builds them) and their graph nodes."""
    from metaprune.pruning import PruneConfig
    from metaprune.pruning.criteria import _OUT_FNS, FunctionalImportance, _root_idx
    from metaprune.pruning.gate import make_pruner, pruning_groups

    config = config or PruneConfig(ratio=0.5)
    if example_input is None:
        shape = tuple(graph.spec.get("input_shape") or ())[-3:]
        example_input = torch.randn(1, *shape)
    dev = next(model.parameters()).device
    pruner = make_pruner(model, config, example_input.to(dev))
    names = {m: n for n, m in model.named_modules()}
    layers = _layer_nodes(graph)
    # fused q/k/v layers (graph rule _qkv_attention): node j carries weight rows j, j+d and j+2d
    qkv = {str(e["name"]) for e in graph.spec.get("layers", []) if str(e.get("type", "")).endswith(".qkv")}
    out = []
    for group, key, _, _ in pruning_groups(pruner, names):
        n_root = len(group[0].idxs)
        nodes, roots = [], []
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            root = _root_idx(item)
            if fn not in _OUT_FNS or root is None or names.get(layer) not in layers:
                continue
            ln = layers[names[layer]]
            ix = torch.as_tensor(list(item.idxs), dtype=torch.long)
            if names[layer] in qkv and len(ln):
                ix = ix % len(ln)
            if len(ln) == 0 or int(ix.max()) >= len(ln):
                continue
            nodes.append(ln[ix])
            roots.append(root)
        g = GroupNodes(key, n_root, torch.cat(nodes) if nodes else torch.zeros(0, dtype=torch.long),
                       torch.cat(roots) if roots else torch.zeros(0, dtype=torch.long))
        imp = FunctionalImportance()(group)
        imp = imp.float().cpu() if imp is not None else torch.ones(n_root)
        lg = imp.clamp_min(1e-12).log()
        g.functional = (lg - lg.mean()) / lg.std().clamp_min(1e-6) if n_root > 1 else torch.zeros(n_root)
        if not nodes or torch.bincount(g.root, minlength=n_root).min() == 0:
            g.fallback = imp
        out.append(g)
    return out


def group_scores(node_scores: Tensor, groups: list[GroupNodes], prior_weight: Tensor | None = None) -> list[Tensor]:
    """Per group, the mean node score of every group channel, plus ``prior_weight`` times the group's
    standardised log functional score (the metanetwork's ``score_prior[-1]``); the fallback where no node maps."""
    out = []
    for g in groups:
        if g.fallback is not None:
            out.append(g.fallback.to(node_scores.device))
            continue
        nodes, root = g.nodes.to(node_scores.device), g.root.to(node_scores.device)
        s = node_scores.new_zeros(g.n_root).index_add(0, root, node_scores.index_select(0, nodes))
        cnt = node_scores.new_zeros(g.n_root).index_add(0, root, torch.ones_like(root, dtype=node_scores.dtype))
        s = s / cnt
        if prior_weight is not None and g.functional is not None:
            s = s + prior_weight * g.functional.to(s.device)
        out.append(s)
    return out


def check_score_metanet(net, where: str = "the metanetwork") -> None:
    """Refuse a metanetwork that does not output scores (an edit checkpoint used as a criterion)."""
    if getattr(getattr(net, "cfg", None), "output", "edit") != "score":
        raise ModelFileError(f"{where} outputs weight edits (output={net.cfg.output!r}), not channel scores; the "
                             "metanet criterion needs a score metanetwork (e.g. checkpoints/metanet_rank_fmnist, or "
                             "one trained with `metaprune meta-train --output-mode score`); an edit metanetwork is "
                             "used with `metaprune transform`")


_LOADED: dict[tuple, tuple] = {}


def load_score_metanet(path: str | os.PathLike):
    """Load a score metanetwork folder (cached per path and modification time); one clear error otherwise."""
    from metaprune.metanet.checkpoint import CONFIG, WEIGHTS, load_metanet

    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"metanetwork {p} does not exist; give the folder of a score metanetwork (e.g. "
                             "checkpoints/metanet_rank_fmnist)")
    if p.is_file() and p.name != WEIGHTS:
        raise ModelFileError(f"{p} is a file, not a score-metanetwork folder (config.json + {WEIGHTS}); give the folder, "
                             "e.g. checkpoints/metanet_rank_fmnist")
    d = p.parent if p.is_file() else p
    try:
        stamp = (str(p.resolve()), os.stat(d / CONFIG).st_mtime_ns, os.stat(p if p.is_file() else d).st_mtime_ns)
    except OSError:
        stamp = None
    if stamp is not None and stamp in _LOADED:
        return _LOADED[stamp]
    net, meta = load_metanet(p)
    check_score_metanet(net, str(p))
    if stamp is not None:
        _LOADED.clear()
        _LOADED[stamp] = (net, meta)
    return net, meta


def predict_scores(net, model: nn.Module, config=None, example_input: Tensor | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, int]]:
    """``({group key: score per root channel}, {group key: channels})`` of ``model`` by one metanetwork pass."""
    from metaprune.graph import to_graph

    check_score_metanet(net)
    graph = to_graph(model)
    groups = group_nodes(model, graph, config, example_input)
    dev = next(net.parameters()).device
    with torch.no_grad():
        node_scores = net.eval()(graph.to(dev))
    scores = group_scores(node_scores.float(), groups, net.score_prior[-1].detach().float())
    return ({g.key: s.detach().cpu() for g, s in zip(groups, scores)}, {g.key: g.n_root for g in groups})


def attach_metanet_scores(model: nn.Module, metanet, config=None, example_input: Tensor | None = None) -> dict:
    """Run the score metanetwork (a :class:`Metanet` or a checkpoint folder) once on ``model`` and attach its
    scores for :class:`metaprune.pruning.criteria.ScoreImportance`. Returns ``{"seconds", "groups", "metanet"}``."""
    from metaprune.pruning.criteria import SCORES_ATTR

    t0 = time.perf_counter()
    src = None
    if isinstance(metanet, (str, os.PathLike)):
        src = str(metanet)
        metanet, _ = load_score_metanet(metanet)
    scores, initial = predict_scores(metanet, model, config, example_input)
    if not all(bool(torch.isfinite(s).all()) for s in scores.values()):
        raise PruningError("the metanetwork produced NaN or infinite channel scores for this model")
    # "global": False -- the scores rank channels within their group only (trained per group)
    setattr(model, SCORES_ATTR, {"scores": scores, "initial": initial, "global": False})
    return {"seconds": round(time.perf_counter() - t0, 3), "groups": len(scores), "metanet": src}


# ------------------------------------------------------------------------------------------------ training


@dataclass
class RankTrainConfig:
    """Options of :func:`rank_train`.

    Attributes:
        steps: gradient steps (one member each, members in a shuffled cycle).
        lr, weight_decay: AdamW settings (cosine decay to 5 % of ``lr``).
        loss: ``listnet`` (the whole ranking: :func:`listnet_loss`) or ``pairwise`` (only the keep / remove
            split at ``speedup``'s per-group ratio: :func:`pairwise_keep_loss`).
        tau: temperature of the target distribution (on standardised targets; smaller focuses the loss
            on the top of each group's ranking); for ``pairwise`` the temperature of the score differences.
        average_from: the saved weights are the mean of the weights after every step from this fraction
            of ``steps`` on (checkpoint averaging instead of selection).
        speedup: which cached gate target to learn (its MAC speed-up).
        seed: member order and initialisation.
        log_every, save_every: progress lines and resume checkpoints (steps).
    """

    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 5e-4
    loss: str = "listnet"
    tau: float = 1.0
    average_from: float = 0.5
    speedup: float = 3.0
    seed: int = 0
    log_every: int = 25
    save_every: int = 50

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed)
        check_int("log_every", self.log_every, 1)
        check_int("save_every", self.save_every, 1)
        check_float("lr", self.lr, above=0)
        check_float("weight_decay", self.weight_decay, minimum=0)
        check_float("tau", self.tau, above=0)
        if self.loss not in RANK_LOSSES:
            raise ConfigError(f"unknown ranking loss {self.loss!r}; valid: {', '.join(RANK_LOSSES)}")
        check_float("average_from", self.average_from, minimum=0, maximum=1)
        check_float("speedup", self.speedup, above=1)


def listnet_loss(pred: list[Tensor], target: list[Tensor], tau: float) -> Tensor:
    """Mean over groups of ``CE(softmax(z(target) / tau), softmax(pred))`` (groups of < 2 channels skipped)."""
    losses = []
    for p, t in zip(pred, target):
        if p.numel() < 2:
            continue
        t = t.to(p.device).float()
        z = (t - t.mean()) / t.std().clamp_min(1e-6)
        q = torch.softmax(z / tau, 0)
        losses.append(-(q * torch.log_softmax(p.float(), 0)).sum() + (q * q.clamp_min(1e-12).log()).sum())
    if not losses:
        raise ConfigError("no pruning group with at least two channels to learn a ranking from")
    return torch.stack(losses).mean()


def pairwise_keep_loss(pred: list[Tensor], target: list[Tensor], tau: float, ratio: float) -> Tensor:
    """Mean over groups of ``mean softplus((pred[j] - pred[i]) / tau)`` over every pair of a channel ``i`` the
    target keeps at removal ``ratio`` and a channel ``j`` it removes: only the keep / remove split is learned,
    not the order inside either side (groups the ratio leaves whole are skipped)."""
    losses = []
    for p, t in zip(pred, target):
        n = p.numel()
        k = max(1, int(n * (1 - ratio)))
        if k >= n:
            continue
        keep = torch.zeros(n, dtype=torch.bool, device=p.device)
        keep[torch.topk(t.to(p.device).float(), k).indices] = True
        pf = p.float()
        losses.append(F.softplus((pf[~keep][None, :] - pf[keep][:, None]) / tau).mean())
    if not losses:
        raise ConfigError(f"no pruning group loses a channel at removal ratio {ratio:.3f}: nothing to learn")
    return torch.stack(losses).mean()


def keep_overlap(pred: list[Tensor], target: list[Tensor], ratio: float) -> float:
    """Share of the channels the target keeps at removal ``ratio`` (per group) that ``pred`` keeps too."""
    hit = tot = 0
    for p, t in zip(pred, target):
        n = p.numel()
        k = max(1, int(n * (1 - ratio)))
        if k >= n:
            continue
        a = set(torch.topk(p.float().cpu(), k).indices.tolist())
        b = set(torch.topk(t.float().cpu(), k).indices.tolist())
        hit += len(a & b)
        tot += k
    return hit / max(1, tot)


def spearman(pred: list[Tensor], target: list[Tensor]) -> float:
    """Mean over groups of Spearman's rank correlation."""
    vals = []
    for p, t in zip(pred, target):
        if p.numel() < 3:
            continue
        rp = torch.argsort(torch.argsort(p.float().cpu())).float()
        rt = torch.argsort(torch.argsort(t.float().cpu())).float()
        vals.append(float(torch.corrcoef(torch.stack([rp, rt]))[0, 1]))
    return sum(vals) / max(1, len(vals))


@dataclass
class RankMember:
    """A training / validation member: its graph, group nodes and gate targets (and baseline scores)."""

    path: Path
    graph: object
    groups: list[GroupNodes]
    targets: list[Tensor]
    baselines: dict[str, list[Tensor]]


def load_rank_member(path: Path, targets: dict[str, Tensor]) -> RankMember:
    """Graph, groups and per-group targets of a zoo member (groups without a target or nodes are dropped)."""
    import torch_pruning as tp

    from metaprune.graph import to_graph
    from metaprune.metanet.zoo import load_member
    from metaprune.pruning import PruneConfig
    from metaprune.pruning.criteria import FunctionalImportance
    from metaprune.pruning.gate import make_pruner, pruning_groups

    model, _ = load_member(path)
    graph = to_graph(model)
    groups = group_nodes(model, graph)
    keep = [g for g in groups if g.fallback is None and g.key in targets and len(targets[g.key]) == g.n_root]
    missing = sorted({g.key for g in groups} - set(targets))
    if missing:
        raise ConfigError(f"{path}: the gate targets have no scores for groups {missing[:3]}; recompute them")
    base = {"l2": [], "functional": []}
    shape = tuple(graph.spec.get("input_shape") or ())[-3:]
    pruner = make_pruner(model, PruneConfig(ratio=0.5), torch.randn(1, *shape))
    names = {m: n for n, m in model.named_modules()}
    by_key = {key: grp for grp, key, _, _ in pruning_groups(pruner, names)}  # the keys group_nodes uses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in keep:
            grp = by_key[g.key]
            base["l2"].append(tp.importance.GroupMagnitudeImportance(p=2)(grp).float().cpu())
            base["functional"].append(FunctionalImportance()(grp).float().cpu())
    return RankMember(Path(path), graph, keep, [targets[g.key].float() for g in keep], base)


def evaluate_ranking(net, members: list[RankMember], ratio: float) -> dict:
    """Keep-set overlap with the gate ranking at ``ratio`` and Spearman, for the metanetwork and the baselines."""
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for m in members:
            preds = ({"metanet": group_scores(net.eval()(m.graph).float(), m.groups, net.score_prior[-1].float())}
                     if net is not None else {})
            preds.update(m.baselines)
            for name, p in preds.items():
                out.setdefault(f"{name}_overlap", []).append(keep_overlap(p, m.targets, ratio))
                out.setdefault(f"{name}_spearman", []).append(spearman(p, m.targets))
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def _averaged(avg: dict[str, Tensor] | None, net: nn.Module, n: int) -> dict[str, Tensor]:
    sd = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    if avg is None or n == 0:
        return sd
    return {k: avg[k] + (sd[k] - avg[k]) / (n + 1) if sd[k].is_floating_point() else sd[k] for k in sd}


def rank_train(train: list[RankMember], val: list[RankMember], out_dir: str | Path, cfg: RankTrainConfig,
               net_cfg=None, resume: bool = True, identity: dict | None = None, log=print) -> dict:
    """Train a score metanetwork on ``train`` members; write ``OUT/metanet.safetensors`` + ``config.json``
    (the averaged weights), ``OUT/log.jsonl`` and a resume checkpoint ``OUT/last.pt`` (tensors and plain
    values, loaded with ``weights_only=True``; a rerun with another fingerprint is refused)."""
    from metaprune.fingerprint import canonical, check_resume, dumps
    from metaprune.io import atomic_path
    from metaprune.metanet.checkpoint import save_metanet
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet

    if not train:
        raise ConfigError("rank training needs at least one training member with gate targets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net_cfg = net_cfg or MetanetConfig(hidden=32, layers=4)
    net_cfg.output = "score"
    torch.manual_seed(cfg.seed)
    net = Metanet.for_graph(train[0].graph, net_cfg)
    ratio = 1 - cfg.speedup ** -0.5
    fp = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("log_every", "save_every")},
          "metanet": net.cfg.to_dict(), "train": [str(m.path) for m in train], "val": [str(m.path) for m in val],
          "targets": identity or {}}
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    start, avg, n_avg, history, seconds = 0, None, 0, [], 0.0
    last = out / "last.pt"
    if resume and last.exists():
        try:
            st = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: one clear error
            raise ModelFileError(f"{last} is not a readable resume checkpoint ({str(e)[:200]}); pass --no-resume "
                                 "to start afresh") from None
        check_resume(last, st.get("fingerprint") if isinstance(st, dict) else None, canonical(fp), "rank-training run")
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, n_avg, history, seconds = int(st["step"]), int(st["n_avg"]), list(st["history"]), float(st["seconds"])
        avg = st["avg"] if st["avg"] else None
        log(f"resumed at step {start}")
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    for _ in range(start):  # the same member order as an uninterrupted run
        if not order:
            order = torch.randperm(len(train), generator=gen).tolist()
        order.pop()
    avg_start = int(cfg.average_from * cfg.steps)
    t0 = time.perf_counter() - seconds
    run_loss = []
    for step in range(start, cfg.steps):
        if not order:
            order = torch.randperm(len(train), generator=gen).tolist()
        m = train[order.pop()]
        net.train()
        pred = group_scores(net(m.graph), m.groups, net.score_prior[-1])
        loss = (listnet_loss(pred, m.targets, cfg.tau) if cfg.loss == "listnet"
                else pairwise_keep_loss(pred, m.targets, cfg.tau, ratio))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss.append(float(loss.detach()))
        if step + 1 > avg_start:
            avg = _averaged(avg, net, n_avg)
            n_avg += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, "loss": round(sum(run_loss) / len(run_loss), 5),
                   "seconds": round(time.perf_counter() - t0, 1)}
            run_loss = []
            if val:
                rec["val"] = evaluate_ranking(net, val, ratio)
            history.append(rec)
            log(json.dumps(rec))
        if done % cfg.save_every == 0 or done == cfg.steps:
            st = {"fingerprint": dumps(fp), "net": net.state_dict(), "opt": opt.state_dict(),
                  "sched": sched.state_dict(), "step": done, "avg": avg or {}, "n_avg": n_avg, "history": history,
                  "seconds": time.perf_counter() - t0}
            with atomic_path(last, track=False) as tmp:
                torch.save(st, tmp)
            with atomic_path(out / "log.jsonl", track=False) as tmp:
                tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    seconds = time.perf_counter() - t0
    if avg:
        net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in avg.items()})
    summary = {"steps": cfg.steps, "train_seconds": round(seconds, 1), "averaged_steps": n_avg,
               "train_members": [str(m.path) for m in train], "val_members": [str(m.path) for m in val],
               "final": evaluate_ranking(net, val, ratio) if val else {},
               "final_train": evaluate_ranking(net, train, ratio), "fingerprint": fingerprint(fp)}
    save_metanet(net, out, extra={"rank_train": asdict(cfg), "summary": summary, "targets": identity or {}})
    return summary


def zoo_members(zoos: list[str | Path]) -> list[Path]:
    """The finished members (``member_*/model.safetensors``) of the given zoo folders, in order."""
    out = []
    for z in map(Path, zoos):
        if not (z / "zoo.json").exists():
            raise ConfigError(f"{z} is not a zoo folder (no zoo.json); build one with `metaprune zoo`")
        out += sorted(p for p in z.glob("member_*") if (p / "model.safetensors").exists())
    return out


def rank_meta_train(train_zoos: list[str | Path], val_zoos: list[str | Path], out_dir: str | Path,
                    cfg: RankTrainConfig, net_cfg=None, cache: str | Path = "runs/gate_targets",
                    compute_targets: bool = False, resume: bool = True, log=print,
                    accept_gate_sha: tuple[str, ...] = (), only_members: list[str | Path] | None = None) -> dict:
    """Train a score metanetwork on the members of ``train_zoos`` against their cached ``gate`` targets
    (:mod:`metaprune.metanet.targets`; computed here with ``compute_targets``, else a missing or stale target
    is an error; ``accept_gate_sha`` names earlier gate.py hashes whose entries are accepted, see
    :func:`metaprune.metanet.targets.load_cached`), monitoring the ranking agreement on ``val_zoos``.
    The identity of every target used (its gate.py hash included) goes into the run's fingerprint and the
    checkpoint's ``config.json``. See :func:`rank_train`."""
    from metaprune.metanet.targets import cached_identity, load_cached
    from metaprune.metanet.targets import compute_targets as compute

    cache = Path(cache)

    def members(zoos, what, only=None):
        out, ident = [], {}
        paths = zoo_members(zoos)
        if only is not None:
            want = {Path(m).resolve() for m in only}
            unknown = sorted(str(m) for m in only if Path(m).resolve() not in {p.resolve() for p in paths})
            if unknown:
                raise ConfigError(f"--members {', '.join(unknown)} are not finished members of --zoo")
            paths = [p for p in paths if p.resolve() in want]
        for p in paths:
            t = load_cached(cache, p, cfg.speedup, cfg.seed, accept_gate_sha)
            if t is None:
                if not compute_targets:
                    raise ConfigError(f"{p} has no up-to-date gate target at {cfg.speedup:g}x in {cache} (missing, or "
                                      "computed by another gate.py / member / data); compute them with "
                                      "tools/gate_targets.py or pass --compute-targets")
                log(f"computing the gate target of {p} ({what})")
                t, _ = compute(p, cfg.speedup, cfg.seed, cache=cache)
            ident[str(p)] = cached_identity(cache, p, cfg.speedup, cfg.seed)
            out.append(load_rank_member(p, t))
        return out, ident

    train, ident = members(train_zoos, "training", only_members)
    if not train:
        raise ConfigError(f"no finished members in {', '.join(map(str, train_zoos))}")
    val, vident = members(val_zoos, "validation") if val_zoos else ([], {})
    log(f"rank training: {len(train)} training members, {len(val)} validation members")
    return rank_train(train, val, out_dir, cfg, net_cfg, resume=resume, identity={**ident, **vident}, log=log)
