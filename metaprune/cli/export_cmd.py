"""``export``: a model file -> ONNX / TorchScript / torch.export, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from metaprune.cli.common import add_common, guard, model_path, print_json, status


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a model to ONNX (or TorchScript / torch.export), checked against PyTorch",
        description="Export MODEL (any model file the other commands take, a merged SPA model, or an SPA bundle "
        "folder with --source) with a dynamic batch dimension, load the file back (onnxruntime for ONNX) and "
        "compare its outputs with PyTorch's on the same random batches (batch 1 and 3). If the largest absolute "
        "difference exceeds --tolerance the command fails (exit 2) and no file is left. Writes OUTPUT and "
        "STEM.export.json beside it (model.onnx -> model.export.json: format, opset, input shape, max abs diff, and with --latency the runtime's "
        "latency interleaved with PyTorch's). ONNX needs the extra: pip install metaprune[export].")
    p.add_argument("model", nargs="?", help="model file (.safetensors, .pt state dict) or SPA bundle folder "
                   "(default: the shipped checkpoint)")
    p.add_argument("-o", "--output", required=True, help="file to write (e.g. model.onnx, model.pt, model.pt2)")
    p.add_argument("--format", choices=["onnx", "torchscript", "export"], default=None,
                   help="onnx (torch.onnx.export), torchscript (torch.jit.trace) or export (torch.export.save); "
                   "default: from the output's suffix (.onnx, .pt, .pt2), else onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="ONNX exporter: the TorchScript-based one (default; needs only onnx) or the torch.export-"
                   "based one (needs onnxscript)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed absolute difference of the outputs (default 1e-4; scaled by the largest absolute "
                   "output when that exceeds 1)")
    p.add_argument("--input-shape", help="C,H,W of one input (default: from the model file)")
    p.add_argument("--source", help="with an SPA bundle folder as MODEL: the source model it adapts (merged first)")
    p.add_argument("--latency", action="store_true",
                   help="also time the exported runtime against PyTorch (interleaved rounds, fixed threads)")
    p.add_argument("--baseline", help="with --latency: a model to compare against too (e.g. the model before "
                   "pruning); gives the speed-up in PyTorch and in the exported runtime")
    p.add_argument("--batches", default="1,64", help="with --latency: batch sizes (default 1,64)")
    p.add_argument("--threads", type=int, default=1, help="with --latency: CPU threads for both runtimes (default 1)")
    p.add_argument("--rounds", type=int, default=10, help="with --latency: interleaved rounds (default 10)")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(p)
    p.set_defaults(func=cmd_export)


def report_path(output: str | Path) -> Path:
    """Where the export's report goes: ``model.onnx`` -> ``model.export.json`` beside it."""
    p = Path(output)
    return p.with_name(p.stem + ".export.json")


def _format_of(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    return {".pt": "torchscript", ".pts": "torchscript", ".pt2": "export"}.get(Path(args.output).suffix.lower(), "onnx")


def _load(args: argparse.Namespace, src: str):
    """The model to export: a model file, or an SPA bundle merged into ``--source``."""
    from metaprune.errors import ConfigError
    from metaprune.io import load_model

    model_folder = (Path(src) / "model.safetensors").is_file() and not (Path(src) / "adapter_config.json").exists()
    if Path(src).is_dir() and not model_folder:  # a folder holding model.safetensors loads as that model
        from spa.bundle import CONFIG_NAME, merge, read_bundle

        if not (Path(src) / CONFIG_NAME).exists():
            raise ConfigError(f"{src} is a folder but not an SPA bundle (no {CONFIG_NAME}); give a model file")
        if not args.source:
            raise ConfigError(f"{src} is an SPA bundle; add --source SOURCE_MODEL (the model it adapts) or export "
                              "the output of `metaprune merge`")
        read_bundle(src)
        source, _ = load_model(args.source, trust_pickle=args.trust_pickle)
        return merge(src, source.eval()).eval()
    if args.source:
        raise ConfigError("--source is only for an SPA bundle folder as MODEL")
    model, _ = load_model(src, trust_pickle=args.trust_pickle)
    return model


def _batches(text: str) -> tuple[int, ...]:
    from metaprune.errors import ConfigError

    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or any(b < 1 for b in out):
        raise ConfigError(f"--batches {text!r}: give batch sizes >= 1, comma-separated, e.g. 1,64")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from metaprune.errors import ConfigError
    from metaprune.export import (
        DEFAULT_OPSET,
        DEFAULT_TOLERANCE,
        export_latency,
        export_model,
        parse_input_shape,
    )
    from metaprune.io import write_json

    fmt = _format_of(args)
    if args.opset is not None and fmt != "onnx":
        raise ConfigError("--opset is for --format onnx only")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if args.baseline and not args.latency:
        raise ConfigError("--baseline is for --latency; add --latency")
    if args.threads < 1 or args.rounds < 1:
        raise ConfigError("--threads and --rounds must be >= 1")
    batches = _batches(args.batches)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    src = model_path(args)
    rep_file = report_path(args.output)
    guard(args, [src, args.source, args.baseline], files=[args.output, rep_file])
    if fmt == "onnx":
        from metaprune.export import require_onnx

        require_onnx()
    status(args, f"loading {src}")
    model = _load(args, src)
    status(args, f"exporting to {fmt}: {args.output}")
    rep = export_model(model, args.output, fmt, shape, opset=opset, tolerance=tolerance, seed=args.seed,
                       exporter=args.exporter)
    rep["source"] = str(src) if args.source is None else {"bundle": str(src), "source": args.source}
    if args.latency:
        import torch

        from metaprune.engine.runtime import resolve_device

        base = None
        if args.baseline:
            base = _load(argparse.Namespace(**{**vars(args), "source": None}), args.baseline)
        devices = ["cpu"]
        dev = resolve_device(args.device)
        if torch.device(dev).type == "cuda":
            devices.append(str(dev))
        rep["latency"] = {}
        for d in devices:
            status(args, f"timing {fmt} vs PyTorch on {d} (batches {','.join(map(str, batches))}, "
                   f"{args.threads} thread(s), {args.rounds} interleaved rounds)")
            try:
                rep["latency"][d] = export_latency(model, args.output, fmt, tuple(rep["input_shape"]), baseline=base,
                                                   batches=batches, threads=args.threads, rounds=args.rounds,
                                                   device=d, opset=opset, exporter=args.exporter,
                                                   tolerance=tolerance)
            except ConfigError as e:
                if d == "cpu":
                    raise
                rep["latency"][d] = {"skipped": str(e)}
        if args.baseline:
            rep["baseline"] = args.baseline
    from metaprune.engine.report import environment

    rep["environment"] = environment("cpu")
    write_json(rep_file, rep)
    if args.json:
        print_json(rep)
    else:
        status(args, f"export: {fmt} max abs diff {rep['max_abs_diff']:.3g} (tolerance {tolerance:g}) at batch "
               f"{', '.join(rep['max_abs_diff_per_batch'])}, input (N, {', '.join(map(str, rep['input_shape']))}) "
               f"-> {args.output} ({rep['bytes']:,} B); report {rep_file}")
        for d, lat in rep.get("latency", {}).items():
            for b, e in lat.get("batches", {}).items():
                ms = ", ".join(f"{k} {v:.3f} ms" for k, v in e["ms"].items())
                sp = (", speed-up " + ", ".join(f"{k} {v:.2f}x" for k, v in e["speedup"].items())
                      if "speedup" in e else "")
                status(args, f"  {d} batch {b}: {ms}{sp}")
    return 0
