"""No-finetune accuracy at a MAC speed-up of L2 / functional / gate / metanet on VALIDATION members only.

Uniform pruning (round_to=1, the protocol of tools/baselines.py), BatchNorm recalibrated on the first 8
un-augmented training batches of 128, accuracy on the member's whole validation split (never the test
split: these figures may guide choices). The `gate` arm prunes with the cached gate scores of
tools/gate_targets.py (the same scores `prune(..., criterion="gate", seed=0)` learns; a stale or missing
cache entry is an error), so it costs no gate training here. Also reports the share of the L2 -> gate gap
the metanetwork closes, and the keep-set agreement of each ranking with gate's.

    OMP_NUM_THREADS=1 .venv/bin/python tools/rank_eval.py --members runs/zoo_train_r20/member_003 \\
        --metanet checkpoints/metanet_rank_fmnist -o results/metanet_rank_val.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.heldout import refuse_held_out  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", nargs="+", required=True, help="zoo member folders (validation only)")
    p.add_argument("--metanet", required=True, help="score-metanetwork folder")
    p.add_argument("--criteria", nargs="+", default=["l2", "functional", "gate", "metanet"])
    p.add_argument("--speedup", type=float, default=3.0)
    p.add_argument("--cache", default=str(ROOT / "runs" / "gate_targets"))
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--stale-gate-ok", action="store_true", help="development only: use a cached gate target even "
                   "when its fingerprint does not match (e.g. computed by an earlier gate.py); recorded in the JSON")
    p.add_argument("--accept-gate-sha", nargs="*", default=[], help="earlier gate.py hashes (>= 8 hex digits) whose "
                   "cached targets are accepted (recorded in the output)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    refuse_held_out(members=a.members)

    import torch

    torch.set_num_threads(1)
    import metaprune.metanet.rank as rank
    from metaprune.engine import evaluate
    from metaprune.engine.report import input_shape
    from metaprune.io import read_json, write_json
    from metaprune.metanet.targets import load_cached
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import PruneConfig, prune, recalibrate_bn
    from metaprune.pruning.criteria import SCORES_ATTR

    out = Path(a.output)
    res = read_json(out) if out.exists() else {"setup": vars(a), "members": {}}
    real_attach = rank.attach_metanet_scores
    for mp in map(Path, a.members):
        rec = res["members"].setdefault(str(mp), {})
        model, metrics = load_member(mp)
        data = load_zoo_data(mp.parent)
        shape = input_shape(model, data)
        rec["base_val_acc"] = float(metrics["val_acc"])
        gate = load_cached(Path(a.cache), mp, a.speedup, 0, tuple(a.accept_gate_sha)) if "gate" in a.criteria else None
        if gate is not None:
            from metaprune.metanet.targets import cached_identity

            rec["gate_target_gate_py_sha256"] = cached_identity(Path(a.cache), mp, a.speedup).get("gate_py_sha256")
        if gate is None and "gate" in a.criteria and a.stale_gate_ok:
            from safetensors.torch import load_file

            from metaprune.metanet.targets import cache_paths

            if cache_paths(Path(a.cache), mp, a.speedup)[0].exists():
                gate = load_file(str(cache_paths(Path(a.cache), mp, a.speedup)[0]))
                rec["gate_target_stale"] = True
        if "gate" in a.criteria and gate is None:
            raise SystemExit(f"{mp}: no up-to-date gate target in {a.cache}; run tools/gate_targets.py first")
        for crit in a.criteria:
            if crit in rec:
                continue
            t0 = time.time()
            if crit == "gate":  # the cached gate scores, attached through the metanet criterion's hook
                def attach(m, metanet, config=None, x=None, _g=gate):
                    setattr(m, SCORES_ATTR, {"scores": {k: v.clone() for k, v in _g.items()},
                                             "initial": {k: len(v) for k, v in _g.items()}})
                    return {"seconds": 0.0, "cached_gate": True}
                rank.attach_metanet_scores = attach
                cfg = PruneConfig(speedup=a.speedup, criterion="metanet", metanet="cached-gate", round_to=1)
            else:
                rank.attach_metanet_scores = real_attach
                cfg = PruneConfig(speedup=a.speedup, criterion=crit, round_to=1,
                                  metanet=a.metanet if crit == "metanet" else None)
            torch.manual_seed(0)
            pr = prune(model, cfg, input_shape=shape)
            rank.attach_metanet_scores = real_attach
            secs = time.time() - t0
            recalibrate_bn(pr.model, data.train, a.bn_batches, 128)
            acc = evaluate(pr.model, data.val)["acc"]
            rec[crit] = {"val_acc": acc, "speedup": pr.speedup, "prune_seconds": round(secs, 2),
                         "info": {k: v for k, v in pr.info.items() if k in ("metanet",)}}
            print(f"{mp} {crit}: val {acc:.2f} ({pr.speedup:.2f}x, {secs:.1f} s)", flush=True)
            write_json(out, res)
    # summary
    summ = {}
    for crit in a.criteria:
        v = [r[crit]["val_acc"] for r in res["members"].values() if crit in r]
        if v:
            summ[crit] = round(statistics.mean(v), 2)
    gaps = [(r["metanet"]["val_acc"] - r["l2"]["val_acc"]) / (r["gate"]["val_acc"] - r["l2"]["val_acc"])
            for r in res["members"].values() if all(c in r for c in ("l2", "gate", "metanet"))
            and abs(r["gate"]["val_acc"] - r["l2"]["val_acc"]) > 1e-6]
    if gaps:
        summ["share_of_l2_to_gate_gap_closed"] = round(statistics.mean(gaps), 3)
        means = [summ.get(c) for c in ("l2", "gate", "metanet")]
        if None not in means and means[1] != means[0]:
            summ["share_of_mean_gap_closed"] = round((means[2] - means[0]) / (means[1] - means[0]), 3)
    res["summary"] = summ
    write_json(out, res)
    print(summ)


if __name__ == "__main__":
    main()
