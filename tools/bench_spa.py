"""SPLoRA bundles vs fine-pruning at several pruning ratios (same schedule, same epochs, same data).

For each ratio and seed, trains one SPLoRA bundle and one fine-pruned model (method ``full``: every
weight trained, the same masks, criterion and iterative schedule) on a task derived from the
source's dataset, then records test accuracy of the merged dense model (which is what the bundle
reproduces: float16 values, BatchNorm statistics folded), validation accuracy, learned parameters
(the SPA paper's counting rule), bundle bytes with and without ``adapter_config.json`` vs the dense
pruned model's bytes, and MACs. Results go to JSON (and a markdown table) after every run, so a
killed run keeps what finished. Bundles are kept under ``--bundles``.

Learning rates are chosen on the validation split only (``--tune``: one ratio, several rates, the
best validation accuracy per method is printed; test accuracy is not looked at for the choice).

``--criteria l2,functional,gate`` compares channel criteria instead (SPLoRA only, the same schedule, data and
seeds; the gate's seconds are in each run's ``gate_seconds``): one row per ratio and seed, and per criterion
the paired difference against the best weight criterion (mean, standard error, wins / ties / losses).

Sized for a 2-core CPU: a training subset and a few epochs. Examples::

    OMP_NUM_THREADS=1 nohup .venv/bin/python tools/bench_spa.py --task fmnist-tops --train-subset 5000 \\
        --batch-size 64 --steps 3 --recovery-epochs 2 -o results/spa_bench.json > bench.log 2>&1 &
    .venv/bin/python tools/bench_spa.py --collect runs/spa -o results/spa_tasks.json   # per-task table
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_spa.py --criteria l2,functional,gate --ratios 0.7 --seeds 3 \
        --lr-adapter 0.2 --steps 3 --recovery-epochs 2 --train-subset 5000 --batch-size 64 \
        -o results/spa_criteria.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metaprune.io import atomic_path, read_json, write_json  # noqa: E402
from spa.api import AdaptConfig, adapt_task  # noqa: E402
from tools.baselines import _paired  # noqa: E402

DEFAULT_SOURCE = "checkpoints/cifar_resnet20_fmnist.safetensors"
KEYS = ("test_acc", "val_acc", "learned_params", "bundle_bytes", "dense_pruned_bytes", "bundle_to_dense", "params",
        "macs", "seconds", "epochs")


def _row(report: dict, bundle: Path) -> dict:
    """The numbers of one ``adapt`` report, plus the weights-only bundle bytes read from the folder."""
    weights = (bundle / "adapter_model.safetensors").stat().st_size
    cfg = read_json(bundle / "adapter_config.json")
    return {**{k: report[k] for k in KEYS},
            # test_acc_masked of adapt is measured before save_bundle rounds the model: fp32, not the bundle
            "test_acc_fp32_before_rounding": report["test_acc_masked"],
            "bundle_weights_bytes": weights, "bundle_weights_to_dense": weights / report["dense_pruned_bytes"],
            "config_bytes": report["bundle_bytes"] - weights, "value_dtype": cfg.get("value_dtype", "float32"),
            "bundle_format": cfg.get("format_version")}


def command_of(report: dict, bundle: str) -> str:
    """The ``metaprune adapt`` command line that reproduces a report (shipped source = no SOURCE)."""
    c = report["config"]
    src = "" if Path(report["source"]).resolve() == Path(DEFAULT_SOURCE).resolve() else f" {report['source']}"
    return (f"OMP_NUM_THREADS=1 .venv/bin/metaprune adapt{src} --task {report['task']} --method {c['method']} "
            f"--rank {c['rank']} --ratio {c['ratio']} --train-subset {c['train_subset']} --batch-size {c['batch_size']} "
            f"--steps {c['steps']} --warmup-epochs {c['warmup_epochs']} --recovery-epochs {c['recovery_epochs']} "
            f"--lr {c['lr']} --seed {c['seed']} -o {bundle}")


def _write_md(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def collect(bundles: Path, output: str) -> int:
    """Gather the ``report.json`` of every bundle folder under ``bundles`` into JSON and a markdown table."""
    rows = []
    for rep in sorted(bundles.glob("*/report.json")):
        r = read_json(rep)
        rows.append({"task": r["task"], "bundle": str(rep.parent), "method": r["method"], "rank": r["rank"],
                     "ratio": r["ratio"], "lr": r["config"]["lr"], "seed": r["config"]["seed"],
                     "train_subset": r["config"]["train_subset"], "steps": r["config"]["steps"],
                     "command": command_of(r, str(rep.parent)), **_row(r, rep.parent)})
    write_json(output, {"description": "one source, one bundle per task (metaprune adapt, one command each); "
                        "test_acc is the merged dense model built from the bundle", "tasks": rows})
    lines = ["# One source, one SPLoRA bundle per task", "",
             f"Source: `{DEFAULT_SOURCE}` (ResNet-20, Fashion-MNIST, 93.57% test). CPU, one thread. "
             "Accuracy: test split of the task, merged dense model rebuilt from the bundle (float16 values). "
             "Learned parameters: the SPA paper's rule (adapter factors on kept channels + norm affine + head). "
             "Bundle bytes: `adapter_model.safetensors` alone / with `adapter_config.json`; dense = the merged "
             "pruned model saved as float32 safetensors.", "",
             "| task | classes | pruned | test acc (merged) | val acc | learned params | bundle B (w/o / with JSON) "
             "| dense pruned B | bundle/dense (w/o / with JSON) | MACs (pruned / source) | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {read_json(Path(r['bundle']) / 'adapter_config.json')['num_classes']} "
                     f"| {100 * r['ratio']:.0f}% | {r['test_acc']:.2f}% | {r['val_acc']:.2f}% "
                     f"| {r['learned_params']['total']:,} | {r['bundle_weights_bytes']:,} / {r['bundle_bytes']:,} "
                     f"| {r['dense_pruned_bytes']:,} | {100 * r['bundle_weights_to_dense']:.1f}% / "
                     f"{100 * r['bundle_to_dense']:.1f}% | {r['macs']['pruned'] / 1e6:.2f} M / "
                     f"{r['macs']['source'] / 1e6:.2f} M | {r['seconds']:.0f} s |")
    lines += ["", "Commands (one per task):", "", "```bash", *[r["command"] for r in rows], "```", ""]
    _write_md(Path(output).with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


def bench_md(out: dict) -> str:
    """Markdown table of a bench JSON: one row per ratio and seed, SPLoRA next to fine-pruning."""
    a = out["args"]
    lines = ["# SPLoRA vs fine-pruning", "",
             f"Task `{out['task']}`, source `{out['source']}`. Same masks criterion, pruning schedule, epochs and "
             f"data for both arms: {a['train_subset']} training images (10% of them held out as validation), "
             f"warm-up {a['warmup_epochs']} epoch(s), {a['steps']} pruning steps × {a['recovery_epochs']} recovery "
             f"epoch(s), batch {a['batch_size']}, rank {a['rank']}; learning rates SPLoRA {a['lr_adapter']}, "
             f"fine-pruning {a['lr_full']} (chosen on the validation split). Seeds: {a['seeds']}. "
             "Accuracy = test split, merged dense model rebuilt from the bundle (float16 values). Bundle bytes = "
             "SPLoRA bundle's `adapter_model.safetensors` (with `adapter_config.json` in brackets); dense = the "
             "pruned model as float32 safetensors. Command: `" + out["command"] + "`", "",
             "| pruned | seed | SPLoRA acc | fine-pruning acc | Δ (SPLoRA − FP) | SPLoRA learned | FP learned "
             "| SPLoRA bundle B | FP bundle B | dense B | SPLoRA bundle/dense | MACs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {(r["ratio"], r["seed"], r["method"]): r for r in out["runs"]}
    for ratio, seed in sorted({(r["ratio"], r["seed"]) for r in out["runs"]}):
        s, f = runs.get((ratio, seed, "splora")), runs.get((ratio, seed, "full"))

        def acc(r):
            return f"{r['test_acc']:.2f}%" if r else "—"

        def lp(r):
            return f"{r['learned_params']['total']:,}" if r else "—"

        ref = s or f
        cells = [f"{100 * ratio:.0f}%", str(seed), acc(s), acc(f),
                 f"{s['test_acc'] - f['test_acc']:+.2f}" if s and f else "—", lp(s), lp(f),
                 f"{s['bundle_weights_bytes']:,} ({s['bundle_bytes']:,})" if s else "—",
                 f"{f['bundle_weights_bytes']:,}" if f else "—", f"{ref['dense_pruned_bytes']:,}",
                 f"{100 * s['bundle_weights_to_dense']:.1f}% ({100 * s['bundle_to_dense']:.1f}%)" if s else "—",
                 f"{ref['macs']['pruned'] / 1e6:.2f} M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def criteria_md(out: dict) -> str:
    """Markdown table of a ``--criteria`` JSON: one row per ratio and seed, one column per criterion, and the
    paired differences of every criterion against the best weight criterion (l2 / functional / random)."""
    a = out["args"]
    crits = a["criteria"].split(",")
    lines = ["# Channel criteria of `metaprune adapt` (SPLoRA)", "",
             f"Task `{out['task']}`, source `{out['source']}`: {a['train_subset']} training images (10% held out as "
             f"validation), warm-up {a['warmup_epochs']} epoch(s), {a['steps']} pruning steps × {a['recovery_epochs']} "
             f"recovery epoch(s), batch {a['batch_size']}, rank {a['rank']}, lr {a['lr_adapter']}; the same for every "
             "criterion. Accuracy = test split, merged dense model rebuilt from the bundle. `gate`: "
             f"{out.get('gate_steps')} gate steps per pruning step. Command: `{out['command']}`", "",
             "| pruned | seed | " + " | ".join(crits) + " | gate seconds |", "|---|---|" + "---|" * (len(crits) + 1)]
    runs = {(r["ratio"], r["seed"], r["criterion"]): r for r in out["runs"]}
    for ratio, seed in sorted({(r["ratio"], r["seed"]) for r in out["runs"]}):
        cells = [f"{100 * ratio:.0f}%", str(seed)]
        for c in crits:
            r = runs.get((ratio, seed, c))
            cells.append(f"{r['test_acc']:.2f}%" if r else "—")
        g = runs.get((ratio, seed, "gate"))
        cells.append(f"{g['gate_seconds']:.1f}" if g else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for ratio in sorted({r["ratio"] for r in out["runs"]}):
        seeds = sorted({r["seed"] for r in out["runs"] if r["ratio"] == ratio
                        and all((ratio, r["seed"], c) in runs for c in crits)})
        free = [c for c in crits if c in ("l2", "functional", "random")]
        if not seeds or not free:
            continue
        best = max(free, key=lambda c: sum(runs[(ratio, s, c)]["val_acc"] for s in seeds))
        lines.append(f"{100 * ratio:.0f}% pruned, {len(seeds)} seed(s), test accuracy paired against `{best}` (the "
                     "weight criterion with the best validation accuracy over these seeds):")
        for c in crits:
            if c == best:
                continue
            d = _paired([runs[(ratio, s, c)]["test_acc"] - runs[(ratio, s, best)]["test_acc"] for s in seeds])
            se = f"{d['se']:.2f}" if d["se"] is not None else "n/a"
            lines.append(f"- `{c}` − `{best}`: {d['mean']:+.2f} ± {se} ({d['wins']}/{d['ties']}/{d['losses']})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", help="only gather the report.json of the bundle folders under this folder")
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--task", default="fmnist-tops")
    p.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    p.add_argument("--methods", default="splora,full")
    p.add_argument("--criteria", help="comma-separated adapt criteria (l2, functional, random, gate): compare them "
                   "with SPLoRA instead of comparing methods")
    p.add_argument("--gate-steps", type=int, default=AdaptConfig.gate_steps, help="gate steps per pruning step")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-adapter", type=float, default=0.05)
    p.add_argument("--lr-full", type=float, default=0.01)
    p.add_argument("--tune", help="comma-separated learning rates: run each method at the first ratio with each "
                   "rate and report validation accuracy only")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, …)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bundles", default="runs/spa_bench", help="folder the bundles are kept in")
    p.add_argument("-o", "--output", default="results/spa_bench.json")
    a = p.parse_args(argv)
    if a.criteria and a.tune:
        p.error("--criteria compares criteria at the given --lr-adapter; tune the learning rate without it")
    if a.collect:
        return collect(Path(a.collect), a.output)
    out = {"description": "SPLoRA vs fine-pruning (method full) with the same masks criterion and schedule",
           "source": a.source, "task": a.task, "args": vars(a), "command": " ".join(["tools/bench_spa.py", *sys.argv[1:]]),
           "runs": []}
    ratios = [float(r) for r in a.ratios.split(",")]
    plan = []
    if a.tune:
        plan = [(ratios[0], m, float(lr), a.seed) for m in a.methods.split(",") for lr in a.tune.split(",")]
    elif a.criteria:
        out["description"] = "channel criteria of adapt (SPLoRA), same schedule, data and seeds"
        out["gate_steps"] = a.gate_steps
        plan = [(r, "splora", a.lr_adapter, a.seed + s, c)
                for s in range(a.seeds) for r in ratios for c in a.criteria.split(",")]
    else:
        plan = [(r, m, a.lr_full if m == "full" else a.lr_adapter, a.seed + s)
                for s in range(a.seeds) for r in ratios for m in a.methods.split(",")]
    for ratio, method, lr, seed, *crit in plan:
        criterion = crit[0] if crit else "l2"
        cfg = AdaptConfig(method=method, rank=a.rank, ratio=ratio, steps=a.steps, warmup_epochs=a.warmup_epochs,
                          recovery_epochs=a.recovery_epochs, lr=lr, train_subset=a.train_subset, seed=seed,
                          device=a.device, batch_size=a.batch_size, criterion=criterion, gate_steps=a.gate_steps,
                          min_steps=0)  # the epochs given, as when the README figures were measured
        t0 = time.time()
        bundle = Path(a.bundles) / (f"{a.task}_{method}_r{int(round(100 * ratio))}_lr{lr:g}_s{seed}"
                                    + (f"_{criterion}" if crit else ""))
        if bundle.exists():
            shutil.rmtree(bundle)
        r = adapt_task(a.source, a.task, bundle, cfg).report
        if a.tune:
            run = {"method": method, "ratio": ratio, "lr": lr, "seed": seed, "val_acc": r["val_acc"]}
        else:
            run = {"method": method, "ratio": ratio, "lr": lr, "seed": seed, "bundle": str(bundle), **_row(r, bundle)}
        if crit:
            run["criterion"] = criterion
            run["gate_seconds"] = sum(h["gate"]["seconds"] for h in r["history"] if "gate" in h)
        out["runs"].append(run)
        write_json(a.output, out)
        if a.criteria:
            _write_md(Path(a.output).with_suffix(".md"), criteria_md(out))
        elif not a.tune:
            _write_md(Path(a.output).with_suffix(".md"), bench_md(out))
        print(f"{method:7s} {criterion:10s} ratio {ratio:.1f} lr {lr:g} seed {seed}: val {r['val_acc']:.2f}%"
              + ("" if a.tune else f"  test {r['test_acc']:.2f}%  learned {r['learned_params']['total']:,}  "
                 f"bundle {run['bundle_weights_bytes']:,} B / dense {r['dense_pruned_bytes']:,} B")
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    if a.tune:
        for m in a.methods.split(","):
            best = max((x for x in out["runs"] if x["method"] == m), key=lambda x: x["val_acc"])
            print(f"best {m}: lr {best['lr']:g} (val {best['val_acc']:.2f}%)")
        out["best_lr"] = {m: max((x for x in out["runs"] if x["method"] == m), key=lambda x: x["val_acc"])["lr"]
                          for m in a.methods.split(",")}
        write_json(a.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
