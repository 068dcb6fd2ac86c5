"""How much two cached gate rankings of the same member agree (keep-set overlap at the target's per-group
ratio, and Spearman), i.e. the ceiling for any predictor of one member's gate ranking.

    .venv/bin/python tools/gate_agreement.py runs/gate_targets/zoo_train_r20/member_001/gate_s3.safetensors \\
        runs/gate_targets/zoo_train_r20/member_001/gate_s3_seed1.safetensors -o results/gate_agreement.json

Each .safetensors is read with its .json beside it (the identity: gate settings, seed, gate.py sha256), and
both identities go into the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--speedup", type=float, default=3.0, help="the targets' MAC speed-up (sets the keep ratio)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    from safetensors.torch import load_file

    from metaprune.io import write_json
    from metaprune.metanet.rank import keep_overlap, spearman

    ta, tb = load_file(a.a), load_file(a.b)
    keys = sorted(set(ta) & set(tb))
    if not keys:
        raise SystemExit("the two files share no group keys")
    ratio = 1 - a.speedup ** -0.5
    pa, pb = [ta[k] for k in keys], [tb[k] for k in keys]
    out = {"a": a.a, "b": a.b, "groups": len(keys), "keep_ratio_removed": round(ratio, 4),
           "keep_overlap": round(keep_overlap(pa, pb, ratio), 4), "spearman": round(spearman(pa, pb), 4),
           "chance_keep_overlap": round(1 - ratio, 4),
           "identity_a": json.loads(Path(a.a).with_suffix(".json").read_text()).get("identity"),
           "identity_b": json.loads(Path(a.b).with_suffix(".json").read_text()).get("identity")}
    write_json(a.output, out)
    print(json.dumps({k: out[k] for k in ("groups", "keep_overlap", "spearman", "chance_keep_overlap")}))


if __name__ == "__main__":
    main()
