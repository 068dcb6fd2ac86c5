"""Transfer: prunability of a network of another depth, original vs. edited by a metanetwork
meta-trained on a different architecture (e.g. ResNet-20 -> ResNet-56).

    .venv/bin/python tools/transfer_metanet.py --zoo runs/zoo_r56 --member member_000 \
        --metanet checkpoints/metanet_cifar_resnet_fmnist -o results/metanet_transfer_r56.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True)
    p.add_argument("--member", default="member_000")
    p.add_argument("--metanet", default=str(ROOT / "checkpoints" / "metanet_cifar_resnet_fmnist"))
    p.add_argument("--curve-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "metanet_transfer_r56.json"))
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from metaprune.io import read_json, write_json
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.transform import transform_model
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import plot_curves, prunability_curve

    zcfg = read_json(Path(a.zoo) / "zoo.json")["config"]
    data = load_zoo_data(a.zoo)
    net, meta = load_metanet(a.metanet)
    model, metrics = load_member(Path(a.zoo) / a.member)
    edited = transform_model(net, model, data.train, 8)
    cb = a.curve_batches
    c0 = prunability_curve(model, data, 3.0, 5, val_batches=cb, calib_batches=cb)
    c1 = prunability_curve(edited, data, 3.0, 5, val_batches=cb, calib_batches=cb)
    c0bn = prunability_curve(model, data, 3.0, 5, criterion="bn", val_batches=cb, calib_batches=cb)  # reference
    out = Path(a.output)
    plot_curves({"original": c0, "metanet-edited": c1}, out.with_suffix(".png"),
                f"transfer: {zcfg['arch']} edited by a metanet trained on {meta.get('zoo', '?')}")
    write_json(out, {"arch": zcfg["arch"], "member": a.member, "member_metrics": metrics, "metanet": a.metanet,
                     "original": c0, "edited": c1, "original_bn": c0bn, "auc_original": c0["auc"],
                     "auc_edited": c1["auc"], "auc_original_bn": c0bn["auc"]})
    print(f"{zcfg['arch']}: prunability original {c0['auc']:.2f} edited {c1['auc']:.2f} "
          f"(original with BN-scale ranking {c0bn['auc']:.2f})")


if __name__ == "__main__":
    main()
