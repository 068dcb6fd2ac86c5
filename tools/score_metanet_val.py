"""Validation prunability of metanetworks on the same validation member(s) and settings (never test).

    .venv/bin/python tools/score_metanet_val.py --zoo runs/zoo_r20 --members member_004 \
        --metanet checkpoints/metanet_cifar_resnet_fmnist runs/sweep/l16_r03_eval --steps 3 --batches 4
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
    p.add_argument("--zoo", required=True)
    p.add_argument("--members", nargs="+", required=True)
    p.add_argument("--metanet", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.config import MetaTrainConfig
    from metaprune.metanet.meta_train import score_members
    from metaprune.metanet.zoo import load_zoo_data

    data = load_zoo_data(a.zoo)
    cfg = MetaTrainConfig(score_steps=a.steps, score_batches=a.batches, device="cpu")  # as its results were made
    paths = [Path(a.zoo) / m for m in a.members]
    out = {"unedited": score_members(None, paths, data, cfg)["scores"]}
    for m in a.metanet:
        net, _ = load_metanet(m)
        net.eval()
        out[m] = score_members(net, paths, data, cfg)["scores"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
