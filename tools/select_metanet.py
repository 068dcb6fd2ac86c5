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

from tools.baselines import _members_dir, _paired, _value, sha256_path  # noqa: E402
from tools.heldout import refuse_held_out  # noqa: E402

BASELINES = ("l2", "functional")
METRIC = "ft_val_acc"


def _output(out: Path, name: str) -> Path:
    """The baselines.py output of a candidate (``name``) or of the free baselines (``"baselines"``)."""
    return out.with_name(f"{out.stem}_{name}.json")


def _values(out: Path, name: str, arm: str, key: str, metric: str, sha: str | None = None) -> dict[str, float]:
    """``{member file stem: value}`` of one arm; with ``sha``, every result must come from that checkpoint."""
    from metaprune.io import read_json

    res = {}
    for f in sorted(_members_dir(_output(out, name)).glob("*.json")):
        m = read_json(f)
        made = ((m["arms"].get(f"{arm}@{key}") or {}).get("fingerprint") or {}).get("metanet") or {}
        if sha is not None and f"{arm}@{key}" in m["arms"] and made.get("sha256") != sha:
            raise SystemExit(f"{f}: the {arm} result of candidate {name!r} was made with another checkpoint "
                             f"({made.get('path')}); rerun without --summary-only, or give the candidate another name")
        v = _value(m, arm, key, metric)
        if v is not None:
            res[f.stem] = v
    return res


def summarize(out: Path, candidates: dict[str, str], key: str) -> dict:
    """Per candidate and baseline: mean ``ft_val_acc`` and no-finetune ``val_acc``; paired vs functional."""
    rows = {}
    ref = _values(out, "baselines", "functional", key, METRIC)
    for name in (*BASELINES, *candidates):
        src, arm = ("baselines", name) if name in BASELINES else (name, "metanet")
        sha = sha256_path(Path(candidates[name])) if name in candidates else None
        ft, nf = _values(out, src, arm, key, METRIC, sha), _values(out, src, arm, key, "val_acc", sha)
        if not ft:
            continue
        common = sorted(set(ft) & set(ref))
        rows[name] = {"n": len(ft), METRIC: statistics.mean(ft.values()), "val_acc": statistics.mean(nf.values()),
                      "members": ft, "vs_functional": _paired([ft[m] - ref[m] for m in common]) if common else None}
    cands = [n for n in candidates if n in rows]
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
        if not sep or not name.isidentifier() or name in (*BASELINES, "baselines") or not Path(path).is_dir():
            raise SystemExit(f"--candidates {c!r}: expected NAME=FOLDER (a score-metanetwork folder, NAME an "
                             f"identifier other than {', '.join(BASELINES)} and baselines)")
        cands[name] = path
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    py, tool = sys.executable, str(ROOT / "tools" / "baselines.py")
    common = ["--zoo", *a.zoo, "--speedups", f"{a.speedup:g}"]
    jobs = [[py, tool, *common, "--arms", *BASELINES, "-o", str(_output(out, "baselines"))]]
    jobs += [[py, tool, *common, "--arms", "metanet", "--metanet", ck, "-o", str(_output(out, n))]
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
           "summary": summarize(out, cands, f"{a.speedup:g}x")}
    write_json(out, res)
    out.with_suffix(".md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
