"""Select a score (ranking) metanetwork checkpoint on VALIDATION members by the primary metric.

Every candidate checkpoint is run as the `metanet` arm of tools/baselines.py (uniform pruning at --speedup
MACs, BatchNorm recalibrated, the 80-step finetune) on every member of the validation zoos, next to the
free baselines `l2` and `functional` (the untrained metanetwork ranks like `functional`: the "no training"
reference). The metric that selects is the **validation accuracy after the finetune** (`ft_val_acc`, on the
member's validation split; the test split is measured by baselines.py too but never read here). Held-out
zoos are refused. Output: -o results/metanet_selection.json (+ .md): per candidate the mean over members,
the paired difference vs `functional` (mean, standard error, wins/ties/losses) and the chosen one (the
highest mean; the table says when its lead over the runner-up is within 2 SE of the paired difference).

Resumable (the per-candidate baselines.py outputs beside -o are; a checkpoint that changed is re-run, as
baselines.py's fingerprints say). --jobs runs that many baselines.py processes at once (one per candidate).

    OMP_NUM_THREADS=1 .venv/bin/python tools/select_metanet.py --zoo runs/zoo_val_r20 runs/zoo_val_r32 \\
        --candidates shipped=checkpoints/metanet_rank_fmnist pair7=runs/rank_pair7 -o results/metanet_selection.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.heldout import refuse_held_out  # noqa: E402

BASELINES = ("l2", "functional")
METRIC = "ft_val_acc"


def _paired(d: list[float]) -> dict:
    n = len(d)
    return {"n": n, "mean": statistics.mean(d), "se": statistics.stdev(d) / n ** 0.5 if n > 1 else None,
            "wins": sum(x > 0.005 for x in d), "ties": sum(abs(x) <= 0.005 for x in d),
            "losses": sum(x < -0.005 for x in d)}


def _values(members_dir: Path, arm: str, key: str, metric: str) -> dict[str, float]:
    from metaprune.io import read_json

    out = {}
    for f in sorted(members_dir.glob("*.json")):
        r = read_json(f)["arms"].get(f"{arm}@{key}")
        if r and not r.get("stale") and r.get(metric) is not None:
            out[f.stem] = float(r[metric])
    return out


def summarize(out: Path, names: list[str], key: str) -> dict:
    """Per candidate and baseline: mean ``ft_val_acc`` and no-finetune ``val_acc``; paired vs functional."""
    base_dir = out.with_name(out.stem + "_baselines_members")
    rows = {}
    ref = _values(base_dir, "functional", key, METRIC)
    for name in (*BASELINES, *names):
        mdir = base_dir if name in BASELINES else out.with_name(f"{out.stem}_{name}_members")
        arm = name if name in BASELINES else "metanet"
        ft, nf = _values(mdir, arm, key, METRIC), _values(mdir, arm, key, "val_acc")
        if not ft:
            continue
        common = sorted(set(ft) & set(ref))
        rows[name] = {"n": len(ft), METRIC: statistics.mean(ft.values()), "val_acc": statistics.mean(nf.values()),
                      "members": ft, "vs_functional": _paired([ft[m] - ref[m] for m in common]) if common else None}
    cands = [n for n in names if n in rows]
    chosen = max(cands, key=lambda n: rows[n][METRIC]) if cands else None
    verdict = None
    if chosen and len(cands) > 1:
        second = max((n for n in cands if n != chosen), key=lambda n: rows[n][METRIC])
        common = sorted(set(rows[chosen]["members"]) & set(rows[second]["members"]))
        d = _paired([rows[chosen]["members"][m] - rows[second]["members"][m] for m in common])
        verdict = {"runner_up": second, "lead": d,
                   "resolved": d["se"] is not None and d["mean"] > 2 * d["se"]}
    return {"metric": METRIC, "speedup": key, "rows": rows, "chosen": chosen, "chosen_vs_runner_up": verdict}


def table(res: dict) -> str:
    s = res["summary"]
    lines = ["# Ranking-metanetwork checkpoint selection (validation members only)", "",
             f"Metric: validation accuracy after the 80-step finetune at {s['speedup']} MACs (uniform pruning, BN "
             f"recalibrated; tools/baselines.py protocol), mean over {len(res['setup']['members'])} validation "
             "members; paired differences vs `functional` (the untrained metanetwork's ranking): mean ± SE "
             "(wins/ties/losses). Made by tools/select_metanet.py; command in setup.command.", "",
             "| candidate | checkpoint | n | after finetune (val) | vs functional | no finetune (val) |",
             "|---|---|---|---|---|---|"]
    for name, r in s["rows"].items():
        p = r["vs_functional"]
        pc = "-" if not p or name == "functional" else (
            f"{p['mean']:+.2f}" + (f" ± {p['se']:.2f}" if p["se"] is not None else "")
            + f" ({p['wins']}/{p['ties']}/{p['losses']})")
        ck = res["setup"]["candidates"].get(name, "(baseline)")
        lines.append(f"| {'**' + name + '**' if name == s['chosen'] else name} | `{ck}` | {r['n']} | "
                     f"{r[METRIC]:.2f} | {pc} | {r['val_acc']:.2f} |")
    v = s.get("chosen_vs_runner_up")
    if v:
        d = v["lead"]
        lines += ["", f"Chosen: **{s['chosen']}**; lead over {v['runner_up']}: {d['mean']:+.2f} ± {d['se'] or 0:.2f} "
                  f"({d['wins']}/{d['ties']}/{d['losses']}) — "
                  + ("more than 2 SE." if v["resolved"] else "within 2 SE: the validation members do not resolve it.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", nargs="+", required=True, help="validation zoo folders")
    p.add_argument("--candidates", nargs="+", required=True, help="NAME=CHECKPOINT_FOLDER")
    p.add_argument("--speedup", type=float, default=3.0)
    p.add_argument("--jobs", type=int, default=1, help="baselines.py processes at once")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "metanet_selection.json"))
    a = p.parse_args()
    refuse_held_out(zoos=a.zoo)
    cands = {}
    for c in a.candidates:
        name, sep, path = c.partition("=")
        if not sep or not name.isidentifier() or name in BASELINES or not Path(path).is_dir():
            raise SystemExit(f"--candidates {c!r}: expected NAME=FOLDER (a score-metanetwork folder, NAME an "
                             f"identifier other than {', '.join(BASELINES)})")
        cands[name] = path
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    py, tool = sys.executable, str(ROOT / "tools" / "baselines.py")
    common = ["--zoo", *a.zoo, "--speedups", f"{a.speedup:g}"]
    jobs = [[py, tool, *common, "--arms", *BASELINES, "-o", str(out.with_name(out.stem + "_baselines.json"))]]
    jobs += [[py, tool, *common, "--arms", "metanet", "--metanet", ck, "-o", str(out.with_name(f"{out.stem}_{n}.json"))]
             for n, ck in cands.items()]
    if not a.summary_only:
        with ThreadPoolExecutor(max(1, a.jobs)) as ex:
            for rc, cmd in zip(ex.map(lambda c: subprocess.call(c, cwd=ROOT), jobs), jobs):
                if rc:
                    raise SystemExit(f"baselines.py failed (exit {rc}): {' '.join(cmd[1:])}")
    from metaprune.io import write_json
    from metaprune.metanet.zoo import list_members

    members = [str(m) for z in a.zoo for m in list_members(z)]
    res = {"setup": {"zoos": a.zoo, "members": members, "candidates": cands, "speedup": a.speedup,
                     "command": "tools/select_metanet.py " + " ".join(sys.argv[1:])},
           "summary": summarize(out, list(cands), f"{a.speedup:g}x")}
    write_json(out, res)
    out.with_suffix(".md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
