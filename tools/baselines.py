"""Per-network pruning baselines on Fashion-MNIST ResNet-20s: L2 / functional / random / gate (± --reconstruct).

For every network (zoo members given by --zoo/--members, or model files given by --models), every
criterion and every target MAC speed-up: prune uniformly (same share per group, torch-pruning DepGraph)
with `metaprune.pruning.prune`, recalibrate BatchNorm on the first 8 un-augmented training batches of 128
(the protocol of `prunability_curve`), and measure validation accuracy (whole validation split) and test
accuracy (whole test split) without finetuning; with --finetune-steps, also the test accuracy after the
short finetune of tools/compare_fmnist.py (2 epochs x 40 steps, batch 128, lr 0.01 cosine, best epoch on
validation). Arms `<criterion>+rec` add prune-time reconstruction (`PruneConfig(reconstruct=True)`).

    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --zoo runs/zoo_h7 --members member_000 member_001 \
        --speedups 3 --reconstruct -o results/baselines_r20.json
    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --models checkpoints/cifar_resnet20_fmnist.safetensors \
        --speedups 3 --reconstruct -o results/baselines_r20_shipped.json

Results are written after every arm (JSON and a markdown table next to it); a rerun with the same -o and
setup skips finished arms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _table(res: dict) -> str:
    st = res["setup"]
    arms = [a for a in st["arms"] if any(k.startswith(f"{a}@") for m in res["members"] for k in m["arms"])]
    lines = [f"# Per-network baselines, uniform pruning, {st['data']}", "",
             f"No finetuning: BatchNorm recalibrated on {st['bn_batches']} training batches of 128; validation "
             f"= whole validation split, test = whole test split. gate: {st['gate_steps']} steps of batch "
             f"{st['gate_batch']}, seed {st['seed']}. reconstruction: {st['reconstruct_batches']} batches of "
             f"{st['gate_batch']}." + (f" FT: {st['finetune_epochs']} epochs x {st['finetune_steps']} steps, "
                                       f"lr {st['finetune_lr']}, test accuracy." if st["finetune_steps"] else ""),
             ""]
    for s in st["speedups"]:
        key = f"{s:g}x"
        lines += [f"## {key} MACs", "", "| network | base test | " + " | ".join(arms) + " |",
                  "|---|---|" + "---|" * len(arms)]
        cols = {a: [] for a in arms}
        for m in res["members"]:
            row = [m["name"], f"{m['base_test_acc']:.2f}"]
            for a in arms:
                r = m["arms"].get(f"{a}@{key}")
                if r is None:
                    row.append("-")
                    continue
                cols[a].append(r)
                cell = f"val {r['val_acc']:.2f} / test {r['test_acc']:.2f}"
                if r.get("ft_test_acc") is not None:
                    cell += f" → FT {r['ft_test_acc']:.2f}"
                cell += f" ({r['speedup']:.2f}x, {r['seconds']:.0f} s)"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
        mean = ["mean", f"{statistics.mean(m['base_test_acc'] for m in res['members']):.2f}"]
        for a in arms:
            v = cols[a]
            if not v:
                mean.append("-")
                continue
            cell = (f"val {statistics.mean(r['val_acc'] for r in v):.2f} / test "
                    f"{statistics.mean(r['test_acc'] for r in v):.2f}")
            ft = [r["ft_test_acc"] for r in v if r.get("ft_test_acc") is not None]
            if ft:
                cell += f" → FT {statistics.mean(ft):.2f}"
            mean.append(cell + f" (n={len(v)})")
        lines += ["| " + " | ".join(mean) + " |"]
        diff = ["paired test difference vs l2 (mean, min..max)", ""]
        for a in arms:
            d = [m["arms"][f"{a}@{key}"]["test_acc"] - m["arms"][f"l2@{key}"]["test_acc"] for m in res["members"]
                 if f"{a}@{key}" in m["arms"] and f"l2@{key}" in m["arms"]]
            diff.append(f"{statistics.mean(d):+.2f} ({min(d):+.2f}..{max(d):+.2f})" if d and a != "l2" else "-")
        lines += ["| " + " | ".join(diff) + " |", ""]
    return "\n".join(lines) + "\n"


# setup entries results must share to be merged (and, with "data", to be resumed)
_SETUP_KEYS = ("gate_steps", "gate_batch", "reconstruct_batches", "bn_batches", "finetune_steps", "finetune_epochs",
               "finetune_lr", "seed", "pruning")


def _save(out: Path, res: dict) -> None:
    """The results JSON and its markdown table beside it (each written atomically)."""
    from metaprune.io import atomic_path, write_json

    write_json(out, res)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(_table(res))


def _merge(files: list[str], out: Path) -> None:
    from metaprune.io import read_json

    parts = [read_json(f) for f in files]
    if any(any(q["setup"][k] != parts[0]["setup"][k] for k in _SETUP_KEYS) for q in parts[1:]):
        raise SystemExit("the files to merge hold results of different setups")
    res = {"setup": dict(parts[0]["setup"]), "members": []}
    res["setup"]["data"] = sorted({q["setup"]["data"] for q in parts})
    res["setup"]["data"] = res["setup"]["data"][0] if len(res["setup"]["data"]) == 1 else " + ".join(res["setup"]["data"])
    res["setup"]["arms"] = list(dict.fromkeys(a for q in parts for a in q["setup"]["arms"]))
    res["setup"]["speedups"] = sorted({s for q in parts for s in q["setup"]["speedups"]})
    for q in parts:
        for m in q["members"]:
            if m["name"] not in {x["name"] for x in res["members"]}:
                res["members"].append(m)
    _save(out, res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", help="zoo folder (with --members)")
    p.add_argument("--members", nargs="+", default=[], help="member folders inside --zoo")
    p.add_argument("--models", nargs="+", default=[], help="model files (trained on --data's default split)")
    p.add_argument("--data", default="fashion-mnist", help="dataset of --models")
    p.add_argument("--speedups", type=float, nargs="+", default=[3.0])
    p.add_argument("--criteria", nargs="+", default=["l2", "functional", "random", "gate"])
    p.add_argument("--reconstruct", action="store_true", help="add '<criterion>+rec' arms (prune-time reconstruction)")
    p.add_argument("--reconstruct-criteria", nargs="+", default=None,
                   help="criteria that get a +rec arm (default: all of --criteria)")
    p.add_argument("--gate-steps", type=int, default=250)
    p.add_argument("--gate-batch", type=int, default=128)
    p.add_argument("--reconstruct-batches", type=int, default=8)
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--finetune-steps", type=int, default=0, help="steps per finetune epoch (0: no finetuning); "
                   "tools/compare_fmnist.py uses 40")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "baselines_r20.json"))
    p.add_argument("--merge", nargs="+", help="only merge these result JSONs (same setup) into -o and its table")
    a = p.parse_args()
    if a.merge:
        _merge(a.merge, Path(a.output))
        return
    if not (a.zoo and a.members) and not a.models:
        p.error("give --zoo with --members, or --models")

    import copy

    import torch

    torch.set_num_threads(a.threads)
    from metaprune.data import BatchLoader, load_dataset
    from metaprune.engine import evaluate
    from metaprune.engine.report import input_shape
    from metaprune.io import load_model, read_json
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import PruneConfig, prune, recalibrate_bn
    from metaprune.pruning.reconstruct import reconstruct

    sys.path.insert(0, str(ROOT / "tools"))
    from compare_fmnist import _finetune

    rec_crit = a.reconstruct_criteria if a.reconstruct_criteria is not None else a.criteria
    arms = list(a.criteria) + ([f"{c}+rec" for c in rec_crit] if a.reconstruct else [])
    setup = {"data": a.data if a.models else f"zoo {a.zoo}", "speedups": a.speedups, "arms": arms,
             "gate_steps": a.gate_steps, "gate_batch": a.gate_batch, "reconstruct_batches": a.reconstruct_batches,
             "bn_batches": a.bn_batches, "finetune_steps": a.finetune_steps, "finetune_epochs": a.finetune_epochs,
             "finetune_lr": a.finetune_lr, "seed": a.seed, "pruning": "uniform"}
    out = Path(a.output)
    res = {"setup": setup, "members": []}
    if out.exists():
        old = read_json(out)
        if any(old["setup"].get(k) != setup[k] for k in ("data", *_SETUP_KEYS)):
            raise SystemExit(f"{out} holds results of another setup; choose another -o (or delete it)")
        old["setup"]["arms"] = list(dict.fromkeys(old["setup"]["arms"] + arms))
        old["setup"]["speedups"] = sorted(set(old["setup"]["speedups"]) | set(a.speedups))
        res = old
    nets = []
    if a.zoo:
        zdata = load_zoo_data(a.zoo)
        nets += [(n, Path(a.zoo) / n, zdata) for n in a.members]
    for f in a.models:
        nets.append((Path(f).stem, Path(f), None))

    for name, path, data in nets:
        if path.is_dir():
            model, metrics = load_member(path)
            base_test = float(metrics["test_acc"])
        else:
            model, _ = load_model(path)
            data = load_dataset(a.data)
            base_test = None
        rec = next((m for m in res["members"] if m["name"] == name), None)
        if rec is None:
            if base_test is None:
                base_test = evaluate(model, data.test)["acc"]
            rec = {"name": name, "source": str(path), "base_test_acc": base_test,
                   "base_val_acc": evaluate(model, data.val)["acc"], "arms": {}}
            res["members"].append(rec)
        shape = input_shape(model, data)

        def measure(pruned, r, t0, data=data):
            recalibrate_bn(pruned, data.train, a.bn_batches, 128)
            r.update(val_acc=evaluate(pruned, data.val)["acc"], test_acc=evaluate(pruned, data.test)["acc"])
            if a.finetune_steps:
                ft = _finetune(copy.deepcopy(pruned), data, a.finetune_epochs, a.finetune_steps, a.seed, a.finetune_lr)
                r["ft_test_acc"] = evaluate(ft, data.test)["acc"]
            r["seconds"] = round(time.time() - t0, 2)
            return r

        for s in a.speedups:
            for crit in dict.fromkeys(list(a.criteria) + (list(rec_crit) if a.reconstruct else [])):
                want = [arm for arm in (crit, f"{crit}+rec") if arm in arms and f"{arm}@{s:g}x" not in rec["arms"]]
                if not want:
                    continue
                t0 = time.time()
                # exact widths (round_to=1): the uniform protocol of the audit, whatever the engine default
                cfg = PruneConfig(speedup=s, criterion=crit, gate_steps=a.gate_steps, seed=a.seed, round_to=1)
                torch.manual_seed(a.seed)
                pr = prune(model, cfg, input_shape=shape,
                           calibration=BatchLoader(data.train, a.gate_batch, shuffle=True, augment=False, seed=a.seed))
                base_r = {"criterion": crit, "speedup": pr.speedup, "ratio": pr.ratio, "macs": pr.macs_after,
                          "params": pr.params_after, "prune_seconds": round(time.time() - t0, 2)}
                if "gate" in pr.info:
                    base_r["gate"] = pr.info["gate"]
                for arm in want:
                    t1 = time.time()
                    m = copy.deepcopy(pr.model)
                    r = dict(base_r, reconstruct=arm.endswith("+rec"))
                    if r["reconstruct"]:  # the same pruned network (same ranking), then refitted
                        info = reconstruct(model, m, BatchLoader(data.train, a.gate_batch, shuffle=True, augment=False,
                                                                 seed=a.seed),
                                           a.reconstruct_batches, history=pr.history)
                        r["reconstruct_info"] = {k: v for k, v in info.items() if k != "per_layer"}
                    r = measure(m, r, t1)
                    r["seconds"] = round(r["seconds"] + base_r["prune_seconds"], 2)
                    key = f"{arm}@{s:g}x"
                    rec["arms"][key] = r
                    print(f"{name} {key}: val {r['val_acc']:.2f} test {r['test_acc']:.2f}"
                          + (f" ft {r['ft_test_acc']:.2f}" if "ft_test_acc" in r else "")
                          + f" ({r['speedup']:.2f}x, {r['seconds']:.0f} s)", flush=True)
                    _save(out, res)
    _save(out, res)


if __name__ == "__main__":
    main()
