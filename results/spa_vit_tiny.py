"""Figures of a vit_tiny_p4 SPLoRA bundle: merged dense model vs the masked adapted model, sizes, accuracy.

    python results/spa_vit_tiny.py BUNDLE_DIR SOURCE -o results/spa_vit_tiny.json

Reads BUNDLE_DIR/report.json (written by `metaprune adapt`), rebuilds the masked adapted model
from the bundle (``spa.load_bundle``) and the merged dense model (``spa.merge``), runs both on
the whole test split of the bundle's task and records the largest absolute logit difference,
the prediction agreement and both accuracies, next to the report's sizes and MACs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from metaprune.io import load_model
from spa import load_bundle, merge
from spa.api import AdaptConfig, load_task_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("source")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = json.loads((Path(args.bundle) / "report.json").read_text())
    names = {f.name for f in fields(AdaptConfig)}
    cfg = AdaptConfig(**{k: v for k, v in report["config"].items() if k in names})
    source, info = load_model(args.source)
    source.eval()
    data = load_task_data(report["task"], cfg, source, info.extra)
    masked = load_bundle(args.bundle, source).eval()
    merged = merge(args.bundle, source).eval()
    diff, agree, ok_masked, ok_merged, n = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for x, y in DataLoader(data.test, batch_size=500):
            a, b = masked(x), merged(x)
            diff = max(diff, float((a - b).abs().max()))
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            ok_masked += int((a.argmax(1) == y).sum())
            ok_merged += int((b.argmax(1) == y).sum())
            n += len(y)
    heads = [layer.self_attention.num_heads for layer in merged.encoder.layers]
    mlp = [layer.mlp[0].out_features for layer in merged.encoder.layers]
    out = {
        "task": report["task"], "source": args.source, "bundle": args.bundle, "method": report["method"],
        "rank": report["rank"], "ratio": report["ratio"], "config": report["config"],
        "test_images": n, "test_acc_merged": 100.0 * ok_merged / n, "test_acc_masked_from_bundle": 100.0 * ok_masked / n,
        "test_acc_masked_fp32_before_saving": report["test_acc_masked"], "val_acc": report["val_acc"],
        "merged_vs_masked_max_abs_logit_diff": diff, "prediction_agreement": agree / n,
        "bundle_bytes": report["bundle_bytes"], "dense_pruned_bytes": report["dense_pruned_bytes"],
        "bundle_to_dense": report["bundle_to_dense"], "learned_params": report["learned_params"],
        "params": report["params"], "macs": report["macs"], "heads_per_layer": heads, "mlp_hidden_per_layer": mlp,
        "residual_width": merged.hidden_dim, "dependency_groups": report["dependency_groups"],
        "epochs": report.get("epochs"), "phase_epochs": report.get("phase_epochs"), "seconds": report["seconds"],
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
