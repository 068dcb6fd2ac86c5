"""Honest per-member evaluation of channel-selection methods: L2 / functional / random / gate / metanet.

The primary metric is the **test accuracy after a short finetune** (fixed steps, fixed seed), paired per
member against the best of the free baselines {l2, functional, random}; the accuracy without finetuning
(validation and test) is reported too, but never selects anything.

Protocol, per network (every finished member of each --zoo, or --members of it; or model files given
by --models), per arm and per target MAC speed-up: prune uniformly (same share of every group, exact
widths, torch-pruning DepGraph) with `metaprune.pruning.prune`, recalibrate BatchNorm on the first
--bn-batches un-augmented training batches of 128 (the protocol of `prunability_curve`), measure validation
accuracy (whole validation split) and test accuracy (whole test split); then finetune a copy with the
short finetune of tools/compare_fmnist.py (--finetune-epochs 2 x --finetune-steps 40 = the issue's
80-step finetune: batch 128, lr 0.01 cosine, seed --seed, augmentation on, best epoch on validation,
the incoming weights included) and measure its test accuracy (`ft_test_acc`). Every member is pruned
and finetuned on its own zoo's data split.

Arms:
  l2, functional, random    free criteria (`PruneConfig.criterion`)
  gate                      per-network ranking optimised on data (--gate-steps steps of --gate-batch)
  metanet                   one forward pass of a score-mode (ranking) metanetwork (--metanet CKPT,
                            `PruneConfig(criterion="metanet", metanet=CKPT)`); its scores rank the channels
                            exactly as the gate's do
  <arm>+rec                 with --reconstruct: the same pruned network, refitted by prune-time
                            reconstruction (`metaprune.pruning.reconstruct`)

Seconds, per arm: `criterion_seconds` (gate: its training; metanet: graph + forward pass + group mapping; the free
criteria are computed inside the pruning search and counted in `prune_seconds` only), `prune_seconds`
(the whole `prune()` call, criterion and speed-up search included), `finetune_seconds`, `eval_seconds`
(BN recalibration and the accuracy measurements), `seconds` (all together): wall-clock seconds, which on a
shared machine depend on its load; `prune_cpu_seconds` / `finetune_cpu_seconds`: the process's CPU time
(time.process_time) for the same two steps, less load-dependent.

Fingerprints: every arm result carries the setup it was made with (protocol options; for `gate` the
sha256 of metaprune/pruning/gate.py; for `metanet` the checkpoint's sha256: the file, or a folder's config.json and weights). A rerun recomputes an arm
whose fingerprint differs from the current one, so results of an older gate (or checkpoint) are never
mixed with new ones (--keep-stale keeps them and leaves them out of the summary instead).
--require-gate-sha SHA256 refuses to run the gate arm unless gate.py has that sha256.

Outputs: -o results/methods_r20.json (setup, members, summary) and results/methods_r20.md beside it;
per-member JSONs in results/methods_r20_members/ (written after every arm; a rerun skips finished arms,
so the tool is resumable per member and arm). Members whose own test accuracy (metrics.json) is below
--min-base-acc are kept but flagged. The summary, per output, speed-up and metric (ft_test_acc, test_acc,
val_acc): mean per arm (n), paired differences per member of every arm vs the best of {l2, functional,
random} (the baseline with the highest mean over exactly the members in the comparison) and vs each
baseline and gate: mean, standard error (sd / sqrt(n)), wins / ties / losses (|d| < 0.005 = tie);
the seconds per arm side by side; and the share of the L2 -> gate no-finetune gap the metanet closes,
(metanet - l2) / (gate - l2), as the mean of the per-member shares (members with |gate - l2| < 1 point
left out of it) and pooled (mean difference / mean difference).

    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --zoo runs/zoo_h7 runs/zoo_h7b \\
        --arms l2 functional random --speedups 3 -o results/methods_r20.json
    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --zoo runs/zoo_h7 runs/zoo_h7b \\
        --arms gate metanet --metanet checkpoints/CKPT --speedups 3 -o results/methods_r20.json
    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --summary-only -o results/methods_r20.json
    # the older no-finetune table with reconstruction (results/baselines_r20.md):
    OMP_NUM_THREADS=1 .venv/bin/python tools/baselines.py --zoo runs/zoo_h7 --members member_000 \\
        --arms l2 functional random gate --reconstruct --finetune-steps 0 -o results/baselines_r20.json
    .venv/bin/python tools/baselines.py --merge a.json b.json -o merged.json   # old single-file results
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FREE = ("l2", "functional", "random")
#: DepGraph's sparse learning (``depgraph``: --sl-steps of training with the group-norm regulariser, then
#: group-L2 pruning) and its equal-budget control (``sl-control``: the same steps without the regulariser)
SL_ARMS = ("depgraph", "sl-control")
KNOWN_ARMS = (*FREE, "gate", "metanet", *SL_ARMS, "l1", "bn", "taylor")
METRICS = (("ft_test_acc", "test accuracy after the finetune (primary)"),
           ("test_acc", "test accuracy, no finetune"),
           ("val_acc", "validation accuracy, no finetune"))
TIE = 0.005
GATE_PY = ROOT / "metaprune" / "pruning" / "gate.py"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a checkpoint folder's config and weights (config.json, *.safetensors: relative
    names and contents, sorted; its card and logs do not count)."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors")):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- statistics

def _paired(d: list[float]) -> dict:
    n = len(d)
    mean = statistics.mean(d) if d else None
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "se": se, "wins": sum(x > TIE for x in d), "ties": sum(abs(x) <= TIE for x in d),
            "losses": sum(x < -TIE for x in d), "min": min(d) if d else None, "max": max(d) if d else None}


def _value(m: dict, arm: str, key: str, metric: str) -> float | None:
    r = m["arms"].get(f"{arm}@{key}")
    if r is None or r.get("stale"):
        return None
    v = r.get(metric)
    return None if v is None else float(v)


def summarize(members: list[dict], arms: list[str], speedups: list[float]) -> dict:
    """Means, paired differences vs the best free baseline (and each), seconds, metanet's share of the gap."""
    out: dict = {"members": len(members), "flagged": [m["name"] for m in members if m.get("flag")], "speedups": {}}
    for s in speedups:
        key = f"{s:g}x"
        per: dict = {"metrics": {}, "seconds": {}, "achieved_speedup": {}}
        present = [a for a in arms if any(_value(m, a, key, "test_acc") is not None for m in members)]
        for metric, _ in METRICS:
            md: dict = {"mean": {}, "paired": {}}
            for a in present:
                v = [x for x in (_value(m, a, key, metric) for m in members) if x is not None]
                if v:
                    md["mean"][a] = {"n": len(v), "mean": statistics.mean(v),
                                     "se": statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None}
            for a in present:
                comp: dict = {}
                # vs the best free baseline: members having the arm and all three free baselines
                rows = [m for m in members if _value(m, a, key, metric) is not None
                        and all(_value(m, b, key, metric) is not None for b in FREE)]
                if rows and a not in FREE:
                    best = max(FREE, key=lambda b: statistics.mean(_value(m, b, key, metric) for m in rows))
                    d = [_value(m, a, key, metric) - _value(m, best, key, metric) for m in rows]
                    comp["best_free"] = dict(_paired(d), baseline=best)
                for b in (*FREE, "gate"):
                    if b == a:
                        continue
                    d = [_value(m, a, key, metric) - _value(m, b, key, metric) for m in members
                         if _value(m, a, key, metric) is not None and _value(m, b, key, metric) is not None]
                    if d:
                        comp[b] = _paired(d)
                if comp:
                    md["paired"][a] = comp
            if md["mean"]:
                per["metrics"][metric] = md
        for a in present:
            rs = [m["arms"][f"{a}@{key}"] for m in members
                  if f"{a}@{key}" in m["arms"] and not m["arms"][f"{a}@{key}"].get("stale")]
            per["seconds"][a] = {k: statistics.mean(float(r.get(k) or 0.0) for r in rs)
                                 for k in ("criterion_seconds", "prune_seconds", "eval_seconds", "finetune_seconds",
                                           "seconds")}
            per["seconds"][a]["n"] = len(rs)
            for k in ("prune_cpu_seconds", "finetune_cpu_seconds"):  # CPU time (recorded since 06:40 UTC)
                v = [float(r[k]) for r in rs if r.get(k) is not None]
                per["seconds"][a][k] = {"n": len(v), "mean": statistics.mean(v)} if v else None
            per["achieved_speedup"][a] = statistics.mean(float(r["speedup"]) for r in rs)
        # share of the L2 -> gate no-finetune gap closed by the metanet
        gap: dict = {}
        for metric in ("val_acc", "test_acc", "ft_test_acc"):
            rows = [(_value(m, "l2", key, metric), _value(m, "gate", key, metric), _value(m, "metanet", key, metric))
                    for m in members]
            rows = [r for r in rows if None not in r]
            if not rows:
                continue
            shares = [(mn - l2) / (g - l2) for l2, g, mn in rows if abs(g - l2) >= 1.0]
            pooled_den = statistics.mean(g - l2 for l2, g, _ in rows)
            gap[metric] = {"n": len(rows), "n_share": len(shares),
                           "mean_share": statistics.mean(shares) if shares else None,
                           "pooled_share": (statistics.mean(mn - l2 for l2, _, mn in rows) / pooled_den
                                            if abs(pooled_den) > 1e-9 else None)}
        if gap:
            per["metanet_gap_share"] = gap
        out["speedups"][key] = per
    return out


# ----------------------------------------------------------------------------------------------- tables

def _f(x, fmt="+.2f"):
    return "-" if x is None else format(x, fmt)


def _pair_cell(p: dict) -> str:
    se = f" ± {p['se']:.2f}" if p.get("se") is not None else ""
    return f"{p['mean']:+.2f}{se} ({p['wins']}/{p['ties']}/{p['losses']}, n={p['n']})"


def _methods_table(res: dict) -> str:
    st, summ = res["setup"], res["summary"]
    fe, fs = st["finetune_epochs"], st["finetune_steps"]
    total = f" = {fe * fs} steps" if isinstance(fe, int) and isinstance(fs, int) else ""
    ft = (f"{fe} epochs x {fs} steps{total}, batch 128, lr {st['finetune_lr']} cosine, seed "
          f"{st['seed']}, best epoch on validation" if fs else "none")
    lines = [f"# Channel selection methods, paired per member: {st['data']}", "",
             f"Uniform pruning (same share per group, exact widths), BatchNorm recalibrated on {st['bn_batches']} "
             f"training batches of 128. Finetune: {ft}. gate: {st['gate_steps']} steps of batch {st['gate_batch']}, "
             f"seed {st['seed']}. Members: {summ['members']}"
             + (f" (flagged as unusable, base test < {st['min_base_acc']:g} %: {', '.join(summ['flagged'])}; "
                "included below)" if summ["flagged"] else "") + ".",
             "", "Paired differences: mean ± standard error (wins/ties/losses, n), per member; 'best free' = the "
             "one of l2 / functional / random with the highest mean over exactly the members compared (named). "
             "Made by tools/baselines.py; the commands are in setup.commands of the JSON (and per arm result).", ""]
    for key, per in summ["speedups"].items():
        lines += [f"## {key} MACs", ""]
        arms = list(per["seconds"])
        for metric, title in METRICS:
            md = per["metrics"].get(metric)
            if not md:
                continue
            lines += [f"### {title}", "", "| arm | n | mean | vs best free | vs l2 | vs functional | vs random | vs gate |",
                      "|---|---|---|---|---|---|---|---|"]
            for a in arms:
                mm = md["mean"].get(a)
                if mm is None:
                    continue
                comp = md["paired"].get(a, {})
                bf = comp.get("best_free")
                cells = [a, str(mm["n"]), f"{mm['mean']:.2f}",
                         f"{_pair_cell(bf)} vs {bf['baseline']}" if bf else "-"]
                cells += [_pair_cell(comp[b]) if b in comp else "-" for b in (*FREE, "gate")]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### seconds per arm (mean per member; wall-clock on a shared 2-core machine)", "",
                  "| arm | n | achieved speed-up | criterion s | prune s (incl. criterion, search) | BN + eval s | "
                  "finetune s | total s | prune CPU s (n) | finetune CPU s (n) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for a, sec in per["seconds"].items():
            crit = f"{sec['criterion_seconds']:.1f}" if a in ("gate", "metanet") else "(in prune)"
            lines.append(f"| {a} | {sec['n']} | {per['achieved_speedup'][a]:.3f} | {crit} | {sec['prune_seconds']:.1f} "
                         f"| {sec['eval_seconds']:.1f} | {sec['finetune_seconds']:.1f} | {sec['seconds']:.1f} | "
                         + " | ".join(f"{sec[k]['mean']:.1f} ({sec[k]['n']})" if sec.get(k) else "-"
                                      for k in ("prune_cpu_seconds", "finetune_cpu_seconds")) + " |")
        lines.append("")
        gap = per.get("metanet_gap_share")
        if gap:
            lines += ["### share of the L2 -> gate gap closed by the metanet, (metanet - l2) / (gate - l2)", "",
                      "| metric | n | mean of per-member shares (n with abs(gate - l2) >= 1) | pooled |", "|---|---|---|---|"]
            for metric, g in gap.items():
                lines.append(f"| {metric} | {g['n']} | {_f(g['mean_share'], '.2f')} (n={g['n_share']}) | "
                             f"{_f(g['pooled_share'], '.2f')} |")
            lines.append("")
        lines += ["### per member", "", "| member | base test | " + " | ".join(arms) + " |",
                  "|---|---|" + "---|" * len(arms)]
        for m in res["members"]:
            row = [m["name"] + (" (FLAGGED)" if m.get("flag") else ""), f"{m['base_test_acc']:.2f}"]
            for a in arms:
                r = m["arms"].get(f"{a}@{key}")
                if r is None or r.get("stale"):
                    row.append("-" if r is None else "stale")
                    continue
                cell = f"{r['val_acc']:.2f} / {r['test_acc']:.2f}"
                if r.get("ft_test_acc") is not None:
                    cell += f" → {r['ft_test_acc']:.2f}"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Cells: val / test without finetuning → test after the finetune.", ""]
    return "\n".join(lines) + "\n"


def _table(res: dict) -> str:
    """The older no-finetune table (results/baselines_r20.md): per network, val / test (→ FT), vs l2."""
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


# ----------------------------------------------------------------------------------------------- files

# setup entries every arm result is fingerprinted with (and old single-file results must share to be merged)
_SETUP_KEYS = ("gate_steps", "gate_batch", "reconstruct_batches", "bn_batches", "finetune_steps", "finetune_epochs",
               "finetune_lr", "seed", "pruning")


def _members_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_members")


def _member_file(out: Path, name: str) -> Path:
    return _members_dir(out) / (name.replace("/", "__") + ".json")


def _write_text(path: Path, text: str) -> None:
    from metaprune.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _save(out: Path, res: dict) -> None:
    """The old single-file results JSON and its markdown table beside it (each written atomically)."""
    from metaprune.io import write_json

    write_json(out, res)
    _write_text(out.with_suffix(".md"), _table(res))


def _save_summary(out: Path, setup: dict) -> dict:
    """Collect every per-member JSON of ``out``, write ``out`` (setup, members, summary) and its table."""
    from metaprune.io import read_json, write_json

    members = [read_json(f) for f in sorted(_members_dir(out).glob("*.json"))]
    arms = list(dict.fromkeys([*setup["arms"], *(k.split("@")[0] for m in members for k in m["arms"])]))
    arms.sort(key=lambda a: (KNOWN_ARMS.index(a.split("+")[0]) if a.split("+")[0] in KNOWN_ARMS else 99, a))
    speedups = sorted({float(k.split("@")[1][:-1]) for m in members for k in m["arms"]} | set(setup["speedups"]),
                      reverse=True)
    # the protocol the results were made with (their fingerprints), not this invocation's flags (--summary-only)
    fps = [r["fingerprint"] for m in members for r in m["arms"].values()
           if isinstance(r.get("fingerprint"), dict) and not r.get("stale")]
    for k in _SETUP_KEYS:
        seen = {repr(fp.get(k)) for fp in fps if k in fp}
        if len(seen) == 1:
            setup = dict(setup, **{k: next(fp[k] for fp in fps if k in fp)})
        elif len(seen) > 1:
            setup = dict(setup, **{k: "mixed: " + ", ".join(sorted(seen))})
    setup = dict(setup, arms=arms, speedups=speedups,
                 data=" + ".join(sorted({m.get("zoo") or m["source"] for m in members})) or setup["data"],
                 commands=sorted({r["command"] for m in members for r in m["arms"].values() if r.get("command")}))
    res = {"setup": setup, "members": members, "summary": summarize(members, arms, speedups)}
    write_json(out, res)
    _write_text(out.with_suffix(".md"), _methods_table(res))
    return res


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


# ----------------------------------------------------------------------------------------------- running

def _finetune(model, data, epochs: int, steps: int, seed: int, lr: float):
    """The short finetune of tools/compare_fmnist.py (same TrainConfig), returning the TrainResult."""
    from metaprune.engine import TrainConfig, train

    cfg = TrainConfig(epochs=epochs, lr=lr, schedule="cosine", max_steps_per_epoch=steps, device="cpu", seed=seed,
                      amp=False)
    return train(model.train(), data, cfg, desc="ft")


def _sparse_train(model, data, shape, steps: int, lam: float, lr: float, seed: int) -> dict:
    """DepGraph's sparse-learning phase on the dense ``model`` (in place): ``steps`` SGD steps (batch 128,
    augmented, momentum 0.9, nesterov, cosine lr from ``lr``, weight decay 0 as in the reference runs) with
    torch-pruning's group-norm regulariser of strength ``lam`` (0: plain training, the control). The final
    weights are kept (no best-epoch selection: the regulariser lowers accuracy on purpose)."""
    import torch
    import torch.nn.functional as F

    from metaprune.data import BatchLoader
    from metaprune.pruning import SparseRegularizer

    torch.manual_seed(seed)
    reg = SparseRegularizer(model, shape, lam) if lam > 0 else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    loader = BatchLoader(data.train, 128, shuffle=True, augment=True, seed=seed)
    model.train()
    step, epoch, losses = 0, 0, []
    if reg is not None:
        reg.on_epoch_start(model, 0)
    while step < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            if step >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if reg is not None:
                reg.after_backward(model)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        epoch += 1
    model.eval()
    return {"steps": step, "lam": lam, "lr": lr, "first_loss": round(losses[0], 4),
            "last_loss": round(statistics.mean(losses[-20:]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--zoo", nargs="+", default=[], help="zoo folders (all finished members, or --members)")
    p.add_argument("--members", nargs="+", default=[], help="only these member folders of each --zoo")
    p.add_argument("--models", nargs="+", default=[], help="model files (trained on --data's default split)")
    p.add_argument("--data", default="fashion-mnist", help="dataset of --models")
    p.add_argument("--speedups", type=float, nargs="+", default=[3.0])
    p.add_argument("--arms", "--criteria", dest="arms", nargs="+", default=["l2", "functional", "random"],
                   help=f"arms, any of {', '.join(KNOWN_ARMS)}")
    p.add_argument("--metanet", help="score-mode metanetwork checkpoint (the metanet arm)")
    p.add_argument("--reconstruct", action="store_true", help="add '<arm>+rec' arms (prune-time reconstruction)")
    p.add_argument("--reconstruct-criteria", nargs="+", default=None,
                   help="arms that get a +rec arm (default: all of --arms)")
    p.add_argument("--gate-steps", type=int, default=250)
    p.add_argument("--gate-batch", type=int, default=128)
    p.add_argument("--require-gate-sha", help="refuse the gate arm unless metaprune/pruning/gate.py has this sha256")
    p.add_argument("--sl-steps", type=int, default=160, help="depgraph / sl-control arms: training steps (batch 128) "
                   "before pruning (160 = 2 epochs of the zoo's 10k-image subset, half the members' own training)")
    p.add_argument("--sl-lam", type=float, default=0.02, help="depgraph arm: regulariser strength, alpha 16 "
                   "(DepGraph's CIFAR reference 5e-4 over ~39k steps; for 160 steps chosen on the validation split "
                   "of one training member, runs/zoo_train_r20/member_000 at 3x without finetune: 5e-3 52.4 %%, "
                   "0.02 58.8 %%, 0.12 37.0 %% (training diverges to loss 1.9); control 47.3 %%)")
    p.add_argument("--sl-lr", type=float, default=0.01, help="depgraph / sl-control arms: initial (cosine) lr")
    p.add_argument("--reconstruct-batches", type=int, default=8)
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--finetune-steps", type=int, default=40, help="steps per finetune epoch (0: no finetuning); "
                   "default 40 x 2 epochs = the 80-step finetune of tools/compare_fmnist.py")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-base-acc", type=float, default=70.0, help="flag members whose own test accuracy is below")
    p.add_argument("--keep-stale", action="store_true",
                   help="keep arm results of another fingerprint (left out of the summary) instead of recomputing")
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "methods_r20.json"))
    p.add_argument("--summary-only", action="store_true", help="only rebuild -o and its table from the member JSONs")
    p.add_argument("--merge", nargs="+", help="only merge these old single-file result JSONs into -o and its table")
    a = p.parse_args()
    out = Path(a.output)
    if a.merge:
        _merge(a.merge, out)
        return
    bad = [x for x in a.arms if x not in KNOWN_ARMS]
    if bad:
        p.error(f"unknown arms {bad}; valid: {', '.join(KNOWN_ARMS)}")
    if "metanet" in a.arms and not a.metanet:
        p.error("the metanet arm needs --metanet CKPT")
    if not a.summary_only and not a.zoo and not a.models:
        p.error("give --zoo (and optionally --members), or --models")
    rec_crit = a.reconstruct_criteria if a.reconstruct_criteria is not None else a.arms
    if a.reconstruct and any(c in SL_ARMS for c in rec_crit):
        p.error("--reconstruct is not available for the depgraph / sl-control arms (their teacher would be the "
                "sparse-trained copy); leave them out of --reconstruct-criteria")
    arms = list(a.arms) + ([f"{c}+rec" for c in rec_crit] if a.reconstruct else [])
    setup = {"data": a.data if a.models else " + ".join(a.zoo), "speedups": a.speedups, "arms": arms,
             "gate_steps": a.gate_steps, "gate_batch": a.gate_batch, "reconstruct_batches": a.reconstruct_batches,
             "bn_batches": a.bn_batches, "finetune_steps": a.finetune_steps, "finetune_epochs": a.finetune_epochs,
             "finetune_lr": a.finetune_lr, "seed": a.seed, "pruning": "uniform, round_to=1",
             "min_base_acc": a.min_base_acc}
    if a.summary_only:
        _save_summary(out, setup)
        return

    import copy

    import torch

    torch.set_num_threads(a.threads)
    from metaprune.data import BatchLoader, load_dataset
    from metaprune.engine import evaluate
    from metaprune.engine.report import input_shape
    from metaprune.errors import MetapruneError
    from metaprune.io import load_model, read_json, write_json
    from metaprune.metanet.zoo import list_members, load_member, load_zoo_data
    from metaprune.pruning import PruneConfig, prune, recalibrate_bn
    from metaprune.pruning import gate as gate_mod
    from metaprune.pruning.reconstruct import reconstruct

    gate_sha = sha256_file(Path(gate_mod.__file__))  # the gate.py this process imported
    if "gate" in a.arms and a.require_gate_sha and gate_sha != a.require_gate_sha:
        raise SystemExit(f"metaprune/pruning/gate.py has sha256 {gate_sha}, not the required {a.require_gate_sha}")
    metanet_sha = sha256_path(Path(a.metanet)) if a.metanet else None
    base_fp = {k: setup[k] for k in _SETUP_KEYS}

    def fingerprint(arm: str) -> dict:
        fp = dict(base_fp)
        crit = arm.split("+")[0]
        if crit == "gate":
            fp["gate_py_sha256"] = gate_sha
        if crit == "metanet":
            fp["metanet"] = {"path": a.metanet, "sha256": metanet_sha}
        if crit in SL_ARMS:
            fp["sparse_learning"] = {"steps": a.sl_steps, "lam": a.sl_lam if crit == "depgraph" else 0.0,
                                     "lr": a.sl_lr, "alpha": 16.0, "weight_decay": 0.0, "then": "l2"}
        if arm.endswith("+rec"):
            fp["reconstruct"] = True
        return fp

    nets = []
    for z in a.zoo:
        try:
            found = list_members(z)
        except MetapruneError as e:  # a zoo still being trained: its members join a later rerun
            print(f"skipping {z}: {e}", flush=True)
            continue
        for path in found:
            if a.members and path.name not in a.members:
                continue
            nets.append((f"{Path(z).name}/{path.name}", path, z, lambda z=z: load_zoo_data(z)))
    for f in a.models:
        nets.append((Path(f).stem, Path(f), None, lambda: load_dataset(a.data)))
    command = " ".join(["tools/baselines.py", *sys.argv[1:]])
    datas: dict = {}
    _save_summary(out, setup)
    for name, path, zoo, get_data in nets:
        if zoo not in datas:
            datas.clear()
            datas[zoo] = get_data()
        data = datas[zoo]
        mfile = _member_file(out, name)
        if path.is_dir():
            model, metrics = load_member(path)
            base_test = float(metrics["test_acc"])
        else:
            model, _ = load_model(path)
            metrics, base_test = {}, None
        rec = read_json(mfile) if mfile.exists() else None
        if rec is None:
            if base_test is None:
                base_test = evaluate(model, data.test)["acc"]
            rec = {"name": name, "zoo": zoo, "source": str(path), "arch": metrics.get("arch"),
                   "base_test_acc": base_test, "base_val_acc": evaluate(model, data.val)["acc"], "arms": {}}
        rec["flag"] = (f"unusable: base test {base_test:.2f} % < {a.min_base_acc:g} %"
                       if base_test < a.min_base_acc else None)
        shape = input_shape(model, data)

        def calib(data=data):
            return BatchLoader(data.train, a.gate_batch, shuffle=True, augment=False, seed=a.seed)

        for s in a.speedups:
            for crit in dict.fromkeys(list(a.arms) + (list(rec_crit) if a.reconstruct else [])):
                want = []
                for arm in (crit, f"{crit}+rec"):
                    if arm not in arms:
                        continue
                    old = rec["arms"].get(f"{arm}@{s:g}x")
                    if old is not None and old.get("fingerprint") == fingerprint(arm):
                        continue
                    if old is not None and a.keep_stale:
                        old["stale"] = True
                        continue
                    if old is not None:
                        print(f"{name} {arm}@{s:g}x: fingerprint changed, recomputing "
                              f"(was {old.get('fingerprint')})", flush=True)
                    want.append(arm)
                if not want:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                torch.manual_seed(a.seed)
                crit_seconds, extra = 0.0, {}
                # exact widths (round_to=1): the uniform protocol of the issue's audit, whatever the engine default
                if crit == "metanet":  # one forward pass; its scores rank the channels as the gate's do
                    cfg = PruneConfig(speedup=s, criterion="metanet", metanet=a.metanet, seed=a.seed, round_to=1)
                    pr = prune(model, cfg, input_shape=shape)
                elif crit in SL_ARMS:  # sparse learning on a copy, then group-L2 pruning (DepGraph's recipe)
                    sl_model = copy.deepcopy(model)
                    extra["sparse_learning"] = _sparse_train(sl_model, data, shape, a.sl_steps,
                                                             a.sl_lam if crit == "depgraph" else 0.0, a.sl_lr, a.seed)
                    crit_seconds = time.perf_counter() - t0
                    extra["sparse_learning"]["seconds"] = round(crit_seconds, 2)
                    cfg = PruneConfig(speedup=s, criterion="l2", seed=a.seed, round_to=1)
                    pr = prune(sl_model, cfg, input_shape=shape)
                else:
                    cfg = PruneConfig(speedup=s, criterion=crit, gate_steps=a.gate_steps, seed=a.seed, round_to=1,
                                      reconstruct=False)  # the +rec arms refit a copy below
                    pr = prune(model, cfg, input_shape=shape, calibration=calib())
                for k in ("gate", "metanet"):
                    if k in pr.info:
                        extra[k] = pr.info[k]
                        crit_seconds = float(pr.info[k].get("seconds") or 0.0)
                prune_seconds = time.perf_counter() - t0
                prune_cpu = time.process_time() - c0
                base_r = {"criterion": crit, "speedup": pr.speedup, "ratio": pr.ratio, "macs": pr.macs_after,
                          "params": pr.params_after, "criterion_seconds": round(crit_seconds, 2),
                          "prune_seconds": round(prune_seconds, 2), "prune_cpu_seconds": round(prune_cpu, 2), **extra}
                for arm in want:
                    t1 = time.perf_counter()
                    m = copy.deepcopy(pr.model)
                    r = dict(base_r, reconstruct=arm.endswith("+rec"), fingerprint=fingerprint(arm))
                    if r["reconstruct"]:  # the same pruned network (same ranking), then refitted
                        info = reconstruct(model, m, calib(), a.reconstruct_batches, history=pr.history)
                        r["reconstruct_info"] = {k: v for k, v in info.items() if k != "per_layer"}
                        r["reconstruct_seconds"] = round(time.perf_counter() - t1, 2)
                    t2 = time.perf_counter()
                    recalibrate_bn(m, data.train, a.bn_batches, 128)
                    r.update(val_acc=evaluate(m, data.val)["acc"], test_acc=evaluate(m, data.test)["acc"])
                    r["eval_seconds"] = round(time.perf_counter() - t2, 2)
                    r["finetune_seconds"] = 0.0
                    if a.finetune_steps:
                        t3, c3 = time.perf_counter(), time.process_time()
                        ftr = _finetune(copy.deepcopy(m), data, a.finetune_epochs, a.finetune_steps, a.seed,
                                        a.finetune_lr)
                        r["finetune_seconds"] = round(time.perf_counter() - t3, 2)
                        r["finetune_cpu_seconds"] = round(time.process_time() - c3, 2)
                        t4 = time.perf_counter()
                        r.update(ft_test_acc=evaluate(ftr.model, data.test)["acc"], ft_best_epoch=ftr.best_epoch,
                                 ft_val_acc=ftr.best_val_acc)
                        r["eval_seconds"] = round(r["eval_seconds"] + time.perf_counter() - t4, 2)
                    r["seconds"] = round(prune_seconds + time.perf_counter() - t1, 2)
                    r["command"] = command
                    key = f"{arm}@{s:g}x"
                    rec["arms"][key] = r
                    print(f"{name} {key}: val {r['val_acc']:.2f} test {r['test_acc']:.2f}"
                          + (f" ft {r['ft_test_acc']:.2f}" if "ft_test_acc" in r else "")
                          + f" ({r['speedup']:.2f}x, crit {r['criterion_seconds']:.0f} s, prune "
                            f"{r['prune_seconds']:.0f} s, ft {r['finetune_seconds']:.0f} s, all {r['seconds']:.0f} s)",
                          flush=True)
                    _member_file(out, name).parent.mkdir(parents=True, exist_ok=True)
                    write_json(mfile, rec)
                    _save_summary(out, setup)
        _member_file(out, name).parent.mkdir(parents=True, exist_ok=True)
        write_json(mfile, rec)
    _save_summary(out, setup)


if __name__ == "__main__":
    main()
