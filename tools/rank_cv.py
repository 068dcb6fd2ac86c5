"""Leave-one-member-out validation of the ranking-metanetwork recipe on training-zoo members.

For every member K of --members: train a score metanetwork (`metaprune meta-train --output-mode score`'s
recipe, metaprune.metanet.rank.rank_train) on the other members' cached gate targets, then measure on K
(which it never saw): the keep-set agreement with K's gate ranking, and the no-finetune 3x accuracy on K's
validation split of l2 / functional / gate / metanet (tools/rank_eval.py). Used because the validation zoos
(runs/zoo_val_*) were not trained in time; the shipped checkpoint is trained on all members with the same
recipe (no checkpoint selection: weight averaging).

    OMP_NUM_THREADS=1 .venv/bin/python tools/rank_cv.py --members runs/zoo_train_r20/member_00{0,1,2,3} \\
        -o results/metanet_rank_cv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", nargs="+", required=True)
    p.add_argument("--folds", nargs="*", default=None, help="members held out in turn (default: every member)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--rank-loss", default="listnet", choices=["listnet", "pairwise"])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cache", default=str(ROOT / "runs" / "gate_targets"))
    p.add_argument("--work", default=str(ROOT / "runs" / "rank_cv"))
    p.add_argument("--accept-gate-sha", nargs="*", default=[], help="earlier gate.py hashes (>= 8 hex digits) whose "
                   "cached targets are accepted (recorded in the output)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from metaprune.io import read_json, write_json
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.rank import RankTrainConfig, load_rank_member, rank_train
    from metaprune.metanet.targets import load_cached

    members = [Path(m) for m in a.members]
    loaded = {}
    for m in members:
        t = load_cached(Path(a.cache), m, 3.0, 0, tuple(a.accept_gate_sha))
        if t is None:
            raise SystemExit(f"{m}: no up-to-date gate target; run tools/gate_targets.py")
        loaded[m] = load_rank_member(m, t)
    out = {"setup": vars(a), "folds": []}
    for k in [Path(f) for f in a.folds] if a.folds else members:
        tag = f"{k.parent.name}_{k.name}"
        d = Path(a.work) / tag
        cfg = RankTrainConfig(steps=a.steps, lr=a.lr, tau=a.tau, loss=a.rank_loss, weight_decay=a.weight_decay,
                              log_every=max(1, a.steps // 3), save_every=a.steps)
        s = rank_train([loaded[m] for m in members if m != k], [loaded[k]], d, cfg,
                       MetanetConfig(hidden=a.hidden, layers=a.layers), resume=False, log=lambda msg: None)
        ev = d / "eval.json"
        ev.unlink(missing_ok=True)  # rank_eval resumes from an existing file: this fold's model is new
        subprocess.run([sys.executable, str(ROOT / "tools" / "rank_eval.py"), "--members", str(k), "--metanet",
                        str(d), "--cache", a.cache, "-o", str(ev), "--accept-gate-sha", *a.accept_gate_sha], check=True)
        r = read_json(ev)["members"][str(k)]
        fold = {"held_out": str(k), "train_seconds": s["train_seconds"], "ranking": s["final"],
                "ranking_train": s["final_train"],
                "val_acc": {c: r[c]["val_acc"] for c in ("l2", "functional", "gate", "metanet")},
                "metanet_seconds": r["metanet"]["info"].get("metanet", {}).get("seconds")}
        out["folds"].append(fold)
        print(json.dumps(fold), flush=True)
        write_json(a.output, out)
    f = out["folds"]
    mean = {c: round(statistics.mean(x["val_acc"][c] for x in f), 2) for c in ("l2", "functional", "gate", "metanet")}
    out["summary"] = {"mean_val_acc": mean,
                      "share_of_l2_to_gate_gap_closed": round((mean["metanet"] - mean["l2"]) / (mean["gate"] - mean["l2"]), 3)
                      if mean["gate"] != mean["l2"] else None,
                      "metanet_minus_functional": [round(x["val_acc"]["metanet"] - x["val_acc"]["functional"], 2) for x in f],
                      "metanet_overlap": round(statistics.mean(x["ranking"]["metanet_overlap"] for x in f), 4),
                      "functional_overlap": round(statistics.mean(x["ranking"]["functional_overlap"] for x in f), 4),
                      "l2_overlap": round(statistics.mean(x["ranking"]["l2_overlap"] for x in f), 4),
                      "metanet_train_overlap": round(statistics.mean(x["ranking_train"]["metanet_overlap"] for x in f), 4)}
    write_json(a.output, out)
    print(json.dumps(out["summary"]))


if __name__ == "__main__":
    main()
