"""Export a model for deployment (ONNX, TorchScript, ``torch.export``), checked against PyTorch.

Every export is verified before it is kept: the written file is loaded again (onnxruntime for
ONNX, ``torch.jit.load`` / ``torch.export.load`` otherwise), the same random batches are run
through it and through the PyTorch model, at batch 1 and at a larger batch (the batch dimension
is dynamic), and the largest absolute difference of the outputs must be within ``tolerance``.
Otherwise :class:`ExportCheckError` is raised and nothing is left at the output path.

ONNX uses the TorchScript-based exporter of ``torch.onnx.export`` (``dynamo=False``) by default:
it needs only the ``onnx`` package and works offline; the ``torch.export``-based exporter
(``exporter="dynamo"``) additionally needs ``onnxscript``. ``onnx`` and ``onnxruntime`` are the
optional extra ``pip install metaprune[export]``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaprune.errors import ConfigError, MetapruneError
from metaprune.io import atomic_path

FORMATS = ("onnx", "torchscript", "export")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "export": ".pt2"}
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.14 runs it
DEFAULT_TOLERANCE = 1e-4
CHECK_BATCHES = (1, 3)
EXTRA_HINT = "pip install metaprune[export]  (or: pip install onnx onnxruntime)"


class ExportCheckError(MetapruneError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


def require_onnx(runtime: bool = True):
    """``(onnx, onnxruntime)``; a :class:`ConfigError` naming the extra when either is missing."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(f"ONNX export needs the `onnx` package, which is not installed: {EXTRA_HINT}") from None
    if not runtime:
        return onnx, None
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("checking an ONNX export needs the `onnxruntime` package, which is not installed: "
                          f"{EXTRA_HINT}") from None
    return onnx, onnxruntime


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)`` (the shape of one input, without the batch)."""
    try:
        shape = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(f"--input-shape {text!r} is not a shape; give C,H,W without the batch, e.g. 3,32,32")
    return shape


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) from the model's own facts (its spec / the registry's default size)."""
    from metaprune.engine.report import input_shape

    try:
        return tuple(int(v) for v in input_shape(model))
    except Exception:  # noqa: BLE001 - an arch the registry does not know
        raise ConfigError("cannot tell the input shape of this model from its file; pass --input-shape C,H,W "
                          "(e.g. 3,224,224)") from None


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for k in out for t in _flat(out[k])]
    raise ConfigError(f"the model returns {type(out).__name__}; only tensors (or tuples/lists/dicts of them) "
                      "can be exported")


def _batches(shape: tuple[int, ...], batches: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *shape, generator=g) for b in batches]


# ----------------------------------------------------------------------------- loaded runtimes
class OrtModule(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call interface (``module(x) -> tensor``), so
    that :func:`metaprune.engine.measure.compare_latency` can time it interleaved with PyTorch.
    CPU tensors go in and out through numpy without copies; on CUDA the input and the output are
    bound on the device (IOBinding).

    With ``threads`` the session gets that many intra-op threads (as PyTorch gets), runs sequentially, and
    its worker threads do not spin-wait between runs (``session.intra_op.allow_spinning = 0``): spinning
    threads would keep the cores busy after a run and slow whatever is timed next (the PyTorch model in
    an interleaved round, or other jobs on a shared machine). The graph optimisation level is
    onnxruntime's default, ORT_ENABLE_ALL (which includes the NCHWc layout transformer on the CPU)."""

    def __init__(self, path: str | os.PathLike, provider: str = "CPUExecutionProvider", threads: int | None = None):
        super().__init__()
        _, ort = require_onnx()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if provider not in ort.get_available_providers():
            raise ConfigError(f"onnxruntime here has no {provider} (available: {ort.get_available_providers()}); "
                              "for CUDA install onnxruntime-gpu")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportCheckError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.provider = provider
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, x: torch.Tensor):
        if x.device.type == "cuda" and self.provider == "CUDAExecutionProvider":
            import numpy as np

            binding = self.session.io_binding()
            x = x.contiguous()
            binding.bind_input(self.input_name, "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
            for name in self.output_names:
                binding.bind_output(name, "cuda", x.device.index or 0)
            self.session.run_with_iobinding(binding)
            outs = [torch.from_numpy(o) for o in binding.copy_outputs_to_cpu()]
        else:
            outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: x.detach().cpu().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load_exported(path: str | os.PathLike, fmt: str, threads: int | None = None,
                  provider: str = "CPUExecutionProvider") -> nn.Module:
    """The exported file loaded back as a callable module (onnxruntime for ONNX)."""
    if fmt == "onnx":
        return OrtModule(path, provider=provider, threads=threads)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "export":
        with open(path, "rb") as f:
            ep = torch.export.load(io.BytesIO(f.read()))
        return ep.module()
    raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- writers
def _write_onnx(model: nn.Module, x: torch.Tensor, n_out: int, path: Path, opset: int, exporter: str) -> None:
    onnx, _ = require_onnx()
    outs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ConfigError("--exporter dynamo needs the `onnxscript` package (pip install onnxscript); the "
                              "default --exporter torchscript needs only onnx") from None
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                 output_names=outs, dynamic_shapes=({0: batch},), external_data=False)
        prog.save(str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=outs, dynamic_axes={n: {0: "batch"} for n in ["input", *outs]},
                              do_constant_folding=True)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx's checker raises its own types
        raise ExportCheckError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from None


def _write_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path))


def _write_torch_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    path.write_bytes(buf.getvalue())


def _compare(model: nn.Module, loaded: nn.Module, xs: list[torch.Tensor]) -> tuple[float, dict[str, float], float]:
    """Largest absolute difference of the outputs (overall and per batch size) and the largest
    absolute PyTorch output."""
    worst, per_batch, scale = 0.0, {}, 0.0
    with torch.no_grad():
        for x in xs:
            ref = _flat(model(x))
            try:
                got = _flat(loaded(x))
            except Exception as e:  # noqa: BLE001 - onnxruntime / torch.jit raise their own types
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportCheckError(f"the exported model fails on a batch of {x.shape[0]}: {why}") from None
            if len(ref) != len(got) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(ref, got)):
                raise ExportCheckError(
                    f"at batch {x.shape[0]} the exported model returns shapes {[tuple(b.shape) for b in got]}, "
                    f"PyTorch {[tuple(a.shape) for a in ref]} (is the batch dimension dynamic?)")
            d = max(float((a.float() - b.float()).abs().max()) if a.numel() else 0.0 for a, b in zip(ref, got))
            if not all(torch.isfinite(b).all() for b in got) or math.isnan(d):
                d = math.inf
            per_batch[str(x.shape[0])] = d
            worst = max(worst, d)
            scale = max([scale, *(float(a.abs().max()) for a in ref if a.numel())])
    return worst, per_batch, scale


def export_model(model: nn.Module, path: str | os.PathLike, fmt: str = "onnx", input_shape: tuple[int, ...] | None = None,
                 opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 check_batches: tuple[int, ...] = CHECK_BATCHES, seed: int = 0, exporter: str = "torchscript") -> dict:
    """Export ``model`` (on the CPU, eval mode) to ``path`` and check the file against PyTorch.

    The file is written atomically: it appears at ``path`` only after the check passed. Returns
    ``{"format", "output", "opset", "input_shape", "max_abs_diff", "max_abs_diff_per_batch",
    "tolerance", "check_batches", ...}``. Raises :class:`ExportCheckError` (and leaves no file) if
    the outputs differ by more than ``tolerance`` (absolute; times the largest absolute output when
    that exceeds 1, as float32 rounding grows with the values) or are not finite.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"--tolerance must be a finite number >= 0, not {tolerance}")
    if fmt == "onnx" and not 7 <= int(opset) <= 25:
        raise ConfigError(f"--opset {opset} is not an ONNX opset (7..25); the default {DEFAULT_OPSET} suits "
                          "onnxruntime >= 1.14")
    if fmt == "onnx":
        require_onnx()  # before any work
    model = model.eval().cpu()
    shape = tuple(input_shape) if input_shape else model_input_shape(model)
    xs = _batches(shape, tuple(check_batches), seed)
    example = xs[-1]  # a batch > 1 as the example: nothing is specialised to batch 1
    try:
        with torch.no_grad():
            n_out = len(_flat(model(example)))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a shape the model does not take
        raise ConfigError(f"the model does not run on inputs of shape (N, {', '.join(map(str, shape))}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; pass --input-shape C,H,W") from None
    out = Path(path)
    with atomic_path(out) as tmp:
        try:
            if fmt == "onnx":
                _write_onnx(model, example, n_out, tmp, int(opset), exporter)
            elif fmt == "torchscript":
                _write_torchscript(model, example, tmp)
            else:
                _write_torch_export(model, example, tmp)
        except (MetapruneError, OSError):  # an OSError (full disk) becomes atomic_path's OutputError
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            raise ExportCheckError(f"{fmt} export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                   + ("; try --format onnx or --format export" if fmt == "torchscript" else "")) from None
        loaded = load_exported(tmp, fmt)
        worst, per_batch, scale = _compare(model, loaded, xs)
        del loaded
        allowed = tolerance * max(1.0, scale)
        if not worst <= allowed:
            scaled = f" x the largest output {scale:.3g}" if scale > 1 else ""
            raise ExportCheckError(
                f"the {fmt} export does not match PyTorch: max abs diff of the outputs {worst:.3g} > tolerance "
                f"{tolerance:g}{scaled} (per batch size: {', '.join(f'{k}: {v:.3g}' for k, v in per_batch.items())}); "
                f"nothing was written to {out}. Raise --tolerance if this is expected")
        size = tmp.stat().st_size
    rep = {"format": fmt, "output": str(out), "bytes": size, "input_shape": list(shape), "dynamic_batch": True,
           "max_abs_diff": worst, "max_abs_diff_per_batch": per_batch, "output_max_abs": scale,
           "tolerance": tolerance, "allowed_abs_diff": allowed,
           "check_batches": list(check_batches), "check_seed": seed, "torch": torch.__version__}
    if fmt == "onnx":
        onnx, ort = require_onnx()
        rep.update(opset=int(opset), exporter=exporter, onnx=onnx.__version__, onnxruntime=ort.__version__,
                   check_provider="CPUExecutionProvider")
    return rep


# ----------------------------------------------------------------------------- latency
@contextlib.contextmanager
def _temp_export(model: nn.Module, fmt: str, shape: tuple[int, ...], opset: int, exporter: str, tolerance: float):
    """Export ``model`` to a temporary file (for a baseline's latency), checked, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="metaprune-export-") as d:
        p = Path(d) / f"baseline{SUFFIXES[fmt]}"
        yield p, export_model(model, p, fmt, shape, opset=opset, tolerance=tolerance, exporter=exporter)


def export_latency(model: nn.Module, path: str | os.PathLike, fmt: str, input_shape: tuple[int, ...],
                   baseline: nn.Module | None = None, batches: tuple[int, ...] = (1, 64), threads: int = 1,
                   rounds: int = 10, repeats: int = 3, warmup: int = 3, device: str = "cpu",
                   opset: int = DEFAULT_OPSET, exporter: str = "torchscript", tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """PyTorch vs exported-runtime latency, measured interleaved (see
    :func:`metaprune.engine.measure.compare_latency`) with ``threads`` fixed for both (torch's
    intra-op threads and onnxruntime's ``intra_op_num_threads``).

    With ``baseline`` (e.g. the model before pruning) the baseline is exported the same way to a
    temporary file and all four (PyTorch and runtime, baseline and model) are timed in the same
    rounds; ``speedup`` then gives baseline ms / model ms for each runtime (median over rounds).
    ONNX runs on onnxruntime's CPUExecutionProvider on the CPU and on its CUDAExecutionProvider
    with ``device="cuda"`` (when onnxruntime-gpu is installed).
    """
    from metaprune.engine.measure import compare_latency, round_ratio

    dev = torch.device(device)
    provider = "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider"
    runtime = {"onnx": "onnxruntime", "torchscript": "torchscript", "export": "torch_export"}[fmt]
    with contextlib.ExitStack() as stack:
        models = {}
        if baseline is not None:
            base_path, base_rep = stack.enter_context(
                _temp_export(baseline.eval().cpu(), fmt, input_shape, opset, exporter, tolerance))
            models["pytorch_baseline"] = baseline.to(dev)
            models[f"{runtime}_baseline"] = load_exported(base_path, fmt, threads, provider).to(dev)
        models["pytorch"] = model.to(dev)
        models[runtime] = load_exported(path, fmt, threads, provider).to(dev)
        out: dict[str, Any] = {"device": str(dev), "threads": threads, "runtime": runtime, "batches": {}}
        if fmt == "onnx":
            out["provider"] = provider
        if baseline is not None:
            out["baseline_max_abs_diff"] = base_rep["max_abs_diff"]
        try:
            for b in batches:
                r = compare_latency(models, input_shape, batch_size=b, device=dev, rounds=rounds, repeats=repeats,
                                    warmup=warmup, threads=threads)
                m = r["models"]
                entry = {"ms": {n: m[n]["ms"] for n in models},
                         "runtime_speedup_over_pytorch": {"model": round_ratio(m["pytorch"]["ms_rounds"], m[runtime]["ms_rounds"])},
                         "rounds": rounds, "repeats_per_round": repeats, "interleaved": True}
                if baseline is not None:
                    entry["runtime_speedup_over_pytorch"]["baseline"] = round_ratio(m["pytorch_baseline"]["ms_rounds"],
                                                                    m[f"{runtime}_baseline"]["ms_rounds"])
                    entry["speedup"] = {
                        "pytorch": round_ratio(m["pytorch_baseline"]["ms_rounds"], m["pytorch"]["ms_rounds"]),
                        runtime: round_ratio(m[f"{runtime}_baseline"]["ms_rounds"], m[runtime]["ms_rounds"])}
                entry["ms_rounds"] = {n: m[n]["ms_rounds"] for n in models}
                out["batches"][str(b)] = entry
        finally:
            model.cpu()
            if baseline is not None:
                baseline.cpu()
    return out
