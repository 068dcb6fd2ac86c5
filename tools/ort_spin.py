"""onnxruntime with fixed intra-op threads, spin-waiting workers on and off, timed in the same interleaved rounds
as PyTorch (unpruned ResNet-56, random init): why ``metaprune.export.OrtModule`` sets
``session.intra_op.allow_spinning = 0`` (results/export_latency.md).

    OMP_NUM_THREADS=2 python tools/ort_spin.py --threads 2 --batches 64
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from metaprune.engine.measure import compare_latency
from metaprune.export import OrtModule, export_model, require_onnx
from metaprune.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="64")
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    _, ort = require_onnx()
    torch.manual_seed(0)
    m = create_model("cifar_resnet56", num_classes=10).eval()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        export_model(m, p, "onnx", (3, 32, 32))
        nospin = OrtModule(p, threads=a.threads)  # allow_spinning = 0
        spin = OrtModule(p, threads=a.threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = a.threads, 1, 3
        spin.session = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])  # onnxruntime's default
        for b in (int(v) for v in a.batches.split(",")):
            r = compare_latency({"pytorch_a": m, "ort_spin": spin, "pytorch_b": m, "ort_nospin": nospin}, (3, 32, 32),
                                b, "cpu", rounds=a.rounds, repeats=2, threads=a.threads)
            print(f"batch {b}: " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in r["models"].items()))
            print("  per round: " + "; ".join(f"{k} {[round(x, 1) for x in v['ms_rounds']]}"
                                              for k, v in r["models"].items()))


if __name__ == "__main__":
    main()
