"""The whole pipeline in one go, on the shipped checkpoints (``metaprune demo``).

convert -> transform (metanetwork) -> prunability curves of original vs edited -> channel choice
at the largest speed-up by L2 magnitude vs ``functional`` (prune's default) vs the per-network ``gate``
ranking vs the ranking metanetwork vs functional with prune-time reconstruction (no finetuning, BN
recalibrated, seconds side by side) -> prune at 2x and 3x MACs with prune's defaults given training data
(functional + reconstruction) -> short finetune -> adapt to two tasks (SPLoRA bundles) -> merge -> one summary table and
``report.json``. Every number in the table is read back from the per-output reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from metaprune.errors import DataError

log = logging.getLogger("metaprune.demo")
DEFAULT_TASKS = ("fmnist-tops", "fmnist-groups")


@dataclass
class DemoConfig:
    """Sizes of the demo. ``fast`` keeps everything to a few optimisation steps (about 2 minutes)."""

    source: str = ""
    metanet: str = ""
    rank_metanet: str = ""  # ranking (score) metanetwork for the criteria comparison; "" = leave that arm out
    output: str = "demo_out"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS
    speedups: tuple[float, ...] = (2.0, 3.0)
    fast: bool = False
    device: str = "auto"
    seed: int = 0
    train_subset: int = 6000
    finetune_epochs: int = 1
    finetune_steps: int | None = 50
    adapt_ratio: float = 0.5
    adapt_steps_per_epoch: int | None = 40
    eval_batches: int | None = None
    curve_steps: int = 5
    curve_val_batches: int = 4
    adapt_prune_steps: int = 2
    gate_steps: int = 250
    latency_repeats: int = 30  # timed runs per model (10 interleaved rounds of 3); cheap, also with --fast
    stages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fast:
            self.train_subset = min(self.train_subset, 2000)
            self.finetune_steps = 6
            self.adapt_steps_per_epoch = 4
            self.eval_batches = 4
            self.curve_steps = 2
            self.curve_val_batches = 1
            self.adapt_prune_steps = 1
            self.gate_steps = 10


def _row(name: str, kind: str, path: Path, report: Path, acc: float | None, params: int, macs: int,
         latency_ms: float, nbytes: int, data: str) -> dict:
    return {"name": name, "kind": kind, "path": str(path), "report": str(report), "acc": acc, "params": params,
            "macs": macs, "latency_ms_b1": latency_ms, "bytes": nbytes, "data": data}


def _measure(model: nn.Module, data, device, cfg: DemoConfig, split: str = "test") -> dict:
    """Params, MACs, bytes and accuracy; latency is measured later for all models together."""
    from metaprune.engine.report import model_summary

    return model_summary(model.to(device), data, device, split=split, eval_batches=cfg.eval_batches, latency=False)


def _latency_rounds(cfg: DemoConfig) -> tuple[int, int]:
    """(rounds, runs per round) giving about ``latency_repeats`` timed runs per model."""
    rounds = max(1, min(10, cfg.latency_repeats))
    return rounds, max(1, round(cfg.latency_repeats / rounds))


def _load_data(cfg: DemoConfig, model: nn.Module, say):
    from metaprune.data import load_dataset

    args = model.metaprune_arch["args"]
    try:
        data = load_dataset(cfg.data, cfg.data_dir, seed=cfg.seed, train_subset=cfg.train_subset,
                            in_chans=args["in_chans"], image_size=28, num_classes=args["num_classes"])
    except DataError as e:
        say(f"note: {e}")
        say("note: running the demo on SYNTHETIC data instead; accuracies below are not Fashion-MNIST figures")
        data = load_dataset("synthetic", seed=cfg.seed, in_chans=args["in_chans"], image_size=28,
                            num_classes=args["num_classes"])
    return data


def run_demo(cfg: DemoConfig, say=print) -> dict:
    """Run the pipeline; write every output and ``report.json`` under ``cfg.output``; return the report."""
    from metaprune.data.loader import BatchLoader
    from metaprune.engine import TrainConfig, train
    from metaprune.engine.measure import compare_latency
    from metaprune.engine.report import write_report
    from metaprune.engine.runtime import resolve_device
    from metaprune.graph import to_graph
    from metaprune.io import check_output, load_model, save_model
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.transform import transform_model
    from metaprune.pruning import PruneConfig, plot_curves, prunability_curve, prune
    from spa.api import AdaptConfig, adapt_task

    t_all = time.time()
    out = Path(cfg.output)
    check_output(out / "report.json", (cfg.source,))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    source, info = load_model(cfg.source)
    net, _ = load_metanet(cfg.metanet)  # before any work: a missing metanetwork fails now, not after minutes
    data = _load_data(cfg, source, say)
    tag = data.name + (" (synthetic)" if data.synthetic else "")
    rows, stages = [], {}

    def stage(name: str, t0: float, msg: str) -> None:
        stages[name] = round(time.time() - t0, 2)
        say(f"[{name}] {msg} ({stages[name]:.1f}s)")

    # 1. source
    t0 = time.time()
    s = _measure(source, data, device, cfg)
    timed = {"source": source}  # every model of the table, timed together at the end
    rows.append(_row("source", "model", Path(cfg.source), Path(cfg.source), s["test_acc"], s["params"], s["macs"],
                     None, Path(cfg.source).stat().st_size, tag))
    stage("source", t0, f"{info.arch}: {s['test_acc']:.2f}% test, {s['params']:,} params")

    # 2. convert
    t0 = time.time()
    graph = to_graph(source.cpu())
    gpath = graph.save(out / "graph.safetensors")
    d = graph.describe()
    stage("convert", t0, f"graph with {d['nodes']:,} nodes, {d['edges']:,} edges in groups {sorted(d['edge_groups'])} -> {gpath}")

    # 3. transform
    t0 = time.time()
    edited = transform_model(net, source.cpu(), data.train, calib_batches=8, device=device)
    epath = save_model(edited, out / "edited.safetensors", extra={"metanet": cfg.metanet, "source": cfg.source})
    e = _measure(edited, data, device, cfg)
    timed["edited"] = edited
    sub_reports = {"edited": ("edited_report.json", {"command": "transform", "model": e})}
    rows.append(_row("edited", "model", epath, out / "edited_report.json", e["test_acc"], e["params"], e["macs"],
                     None, epath.stat().st_size, tag))
    stage("transform", t0, f"metanetwork edit: {e['test_acc']:.2f}% test before pruning")

    # 4. prunability curves (validation split, no finetuning, BN recalibrated)
    t0 = time.time()
    curves = {}
    for name, m in (("original", source), ("edited", edited)):
        curves[name] = prunability_curve(m.cpu(), data, max_speedup=max(cfg.speedups), steps=cfg.curve_steps,
                                         val_batches=cfg.curve_val_batches, device=device, seed=cfg.seed)
    cpath = plot_curves(curves, out / "curves.png", "prunability: original vs metanetwork-edited")
    stage("curve", t0, "prunability AUC original {:.1f} vs edited {:.1f} -> {}".format(
        curves["original"]["auc"], curves["edited"]["auc"], cpath))

    # 5. channel choice at the largest speed-up: L2 vs functional (the default) vs the gate ranking vs the
    # ranking metanetwork
    t0 = time.time()
    criteria = compare_criteria(source, data, cfg, device)
    stage("criteria", t0, f"{max(cfg.speedups):g}x, no finetune: " + ", ".join(
        f"{k} {v['test_acc']:.2f}% ({v['seconds']:.1f} s)" for k, v in criteria.items()))

    # 6. prune the edited network at each speed-up, then finetune briefly
    for sp in cfg.speedups:
        t0 = time.time()
        calib = BatchLoader(data.train, 128, shuffle=True, augment=False, seed=cfg.seed)
        res = prune(edited.cpu(), PruneConfig(speedup=sp, seed=cfg.seed), input_shape=(data.in_chans, 28, 28),
                    calibration=calib)  # prune's defaults with --data: functional ranking + reconstruction
        pruned = res.model
        if cfg.finetune_epochs > 0:
            tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=0.01, schedule="cosine", device=str(device),
                               seed=cfg.seed, resume=False, max_steps_per_epoch=cfg.finetune_steps)
            pruned = train(pruned.train(), data, tcfg, desc=f"finetune {sp:g}x").model
        name = f"pruned_{sp:g}x"
        ppath = save_model(pruned, out / f"{name}.safetensors", extra={"speedup_target": sp, "source": cfg.source})
        p = _measure(pruned, data, device, cfg)
        timed[name] = pruned
        sub_reports[name] = (f"{name}_report.json", {"command": "prune", "speedup_target": sp,
                                                     "mac_speedup": s["macs"] / p["macs"], "model": p, "before": s,
                                                     "reconstruct": {k: v for k, v in res.info.get("reconstruct", {}).items()
                                                                     if k != "per_layer"}})
        rows.append(_row(name, "model", ppath, out / f"{name}_report.json", p["test_acc"], p["params"], p["macs"],
                         None, ppath.stat().st_size, tag))
        rec = res.info.get("reconstruct", {})
        stage(f"prune {sp:g}x", t0, f"{s['macs'] / p['macs']:.2f}x fewer MACs, reconstructed "
              f"{rec.get('layers', 0)} layers, {p['test_acc']:.2f}% test after finetune")

    # 7. adapt to tasks (SPLoRA bundles) and merge to dense models
    tasks = list(cfg.tasks) if not data.synthetic else ["synthetic", "synthetic"]
    for i, task in enumerate(tasks):
        t0 = time.time()
        bdir = out / "bundles" / (task if not data.synthetic else f"synthetic-{i}")
        acfg = AdaptConfig(method="splora", rank=8, ratio=cfg.adapt_ratio, steps=cfg.adapt_prune_steps, warmup_epochs=1,
                           recovery_epochs=1, lr=0.05, train_subset=cfg.train_subset, seed=cfg.seed + i,
                           device=str(device), data_dir=cfg.data_dir,
                           max_steps_per_epoch=cfg.adapt_steps_per_epoch)
        r = adapt_task(cfg.source, task, bdir, acfg).report
        merged_path = _merge_bundle(bdir, source, out / f"merged_{bdir.name}.safetensors")
        timed[f"bundle {bdir.name}"] = load_model(merged_path)[0]
        nbytes = sum(f.stat().st_size for f in bdir.iterdir() if f.name.startswith("adapter_"))
        rows.append(_row(f"bundle {bdir.name}", "bundle", bdir, bdir / "report.json", r["test_acc"],
                         r["params"]["pruned"], r["macs"]["pruned"], None, nbytes, r["data"]))
        stage(f"adapt {bdir.name}", t0, f"{r['test_acc']:.2f}% test, bundle {nbytes / 1024:.1f} KiB vs dense "
              f"{r['dense_pruned_bytes'] / 1024:.1f} KiB, merged -> {merged_path.name}")

    # 8. latency of every model of the table, measured together: interleaved rounds, fixed threads, one input
    t0 = time.time()
    rounds, per_round = _latency_rounds(cfg)
    lat = compare_latency({k: m.to(device) for k, m in timed.items()}, (data.in_chans, 28, 28), 1, device, warmup=5,
                          rounds=rounds, repeats=per_round)
    for row in rows:
        row["latency_ms_b1"] = lat["models"][row["name"]]["ms"]
        row["latency_speedup_b1"] = lat["ratios"][row["name"]]
    s["latency"] = {"1": lat["models"]["source"]}
    for name, (fname, sub) in sub_reports.items():
        sub["model"]["latency"] = {"1": {**lat["models"][name], "speedup_vs_source": lat["ratios"][name]}}
        write_report(out, sub, name=fname, device=device)
    stage("latency", t0, "batch 1: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in lat["models"].items())
          + f" ({rounds} interleaved rounds, {lat['threads']} threads)")
    latency = {k: v for k, v in lat.items() if k != "models"}

    report = {"command": "demo", "fast": cfg.fast, "data": tag, "source": cfg.source, "metanet": cfg.metanet,
              "rows": rows, "latency": latency, "curves": {k: {kk: v[kk] for kk in ("speedups", "accs", "auc", "auc_rel", "base_acc")}
                                       for k, v in curves.items()},
              "criteria": criteria, "stages_seconds": stages, "seconds": round(time.time() - t_all, 1),
              "eval": "test split" + (f", first {cfg.eval_batches} batches of 512" if cfg.eval_batches else "")}
    write_report(out, report, device=device)
    return report


def compare_criteria(source: nn.Module, data, cfg: DemoConfig, device) -> dict[str, dict]:
    """Prune ``source`` to the largest speed-up with each channel ranking (``l2``; ``functional``, prune's
    default; ``gate``, learned on training batches; ``metanet``, one pass of the ranking metanetwork when
    ``cfg.rank_metanet`` is set) and with ``functional`` plus prune-time reconstruction (what ``prune`` does
    by default with training data), recalibrate BatchNorm on 8 training batches and measure test accuracy
    without finetuning.
    ``seconds`` is the whole prune call (ranking + target search)."""
    from metaprune.data.loader import BatchLoader
    from metaprune.engine import evaluate
    from metaprune.pruning import PruneConfig, prune
    from metaprune.pruning.curve import recalibrate_bn

    sp = max(cfg.speedups)
    off = {"reconstruct": False}
    arms = {"l2": ("l2", off), "functional": ("functional", off), "gate": ("gate", {"gate_steps": cfg.gate_steps, **off})}
    if cfg.rank_metanet:
        arms["metanet"] = ("metanet", {"metanet": cfg.rank_metanet, **off})
    arms["functional+reconstruct"] = ("functional", {"reconstruct": True})  # prune's default with --data
    out = {}
    for name, (criterion, extra) in arms.items():
        t0 = time.time()
        calib = (BatchLoader(data.train, 128, shuffle=True, augment=False, seed=cfg.seed, device=device)
                 if criterion == "gate" or extra["reconstruct"] else None)
        res = prune(source.to(device), PruneConfig(speedup=sp, criterion=criterion, seed=cfg.seed, **extra),
                    input_shape=(data.in_chans, 28, 28), calibration=calib)
        seconds = time.time() - t0
        m = res.model
        recalibrate_bn(m, data.train, 8, 128, device)
        acc = evaluate(m.eval(), data.test, device=device, max_batches=cfg.eval_batches, desc=f"eval {name}")["acc"]
        out[name] = {"test_acc": acc, "seconds": round(seconds, 2), "mac_speedup": res.macs_before / res.macs_after,
                     "macs": res.macs_after, "params": res.params_after}
    return out


def _merge_bundle(bundle: Path, source: nn.Module, path: Path) -> Path:
    from metaprune.io import save_model
    from spa.bundle import merge

    return save_model(merge(bundle, source.cpu()), path, extra={"bundle": str(bundle)})


def format_summary(report: dict) -> str:
    """The demo's summary table (one line per produced model or bundle)."""
    head = (f"{'output':22s} {'accuracy':>9s} {'params':>10s} {'MACs (M)':>9s} {'lat b1 ms':>9s} {'vs src':>7s} "
            f"{'bytes':>10s}")
    lines = [f"data: {report['data']} ({report['eval']})", head, "-" * len(head)]
    for r in report["rows"]:
        acc = "-" if r["acc"] is None else f"{r['acc']:.2f}%"
        ms = "-" if r.get("latency_ms_b1") is None else f"{r['latency_ms_b1']:.2f}"
        sp = "-" if r.get("latency_speedup_b1") is None else f"{r['latency_speedup_b1']:.2f}x"
        lines.append(f"{r['name']:22s} {acc:>9s} {r['params']:>10,d} {r['macs'] / 1e6:>9.2f} {ms:>9s} {sp:>7s} "
                     f"{r['bytes']:>10,d}")
    lat = report.get("latency")
    if lat:
        lines.append(f"latency: batch 1 on {lat['device']}, {lat['threads']} threads, all models interleaved in "
                     f"{lat['rounds']} rounds of {lat['repeats'] // max(1, lat['rounds'])} runs after {lat['warmup']} "
                     "warm-up runs; ms = median of the per-round fastest runs, 'vs src' = median per-round ratio to the "
                     "source")
    c = report["curves"]
    lines.append(f"prunability AUC (val, 1..{max(c['original']['speedups'][-1], 1):.1f}x): original "
                 f"{c['original']['auc']:.2f}, edited {c['edited']['auc']:.2f}")
    crit = report.get("criteria")
    if crit:
        lines.append("channel choice at the largest speed-up, no finetune (BN recalibrated): " + ", ".join(
            f"{k} {v['test_acc']:.2f}% in {v['seconds']:.1f} s" for k, v in crit.items()))
    lines.append(f"total {report['seconds']:.0f}s")
    return "\n".join(lines)
