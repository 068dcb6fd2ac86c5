"""The prune report: before / after / ratio of params, MACs, file size, latency and accuracy,
plus per-layer widths; and its text table."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path

from metaprune.errors import ConfigError, ModelFileError


def _ratio(before, after) -> float | None:
    if before is None or after is None or not after:
        return None
    return before / after


def compare(before: dict, after: dict) -> dict:
    """Ratios before / after of two :func:`metaprune.engine.report.model_summary` dicts (speed-ups
    and reductions, > 1 is better), and accuracy differences in points."""
    out = {"params": _ratio(before.get("params"), after.get("params")),
           "macs": _ratio(before.get("macs"), after.get("macs")),
           "bytes": _ratio(before.get("bytes"), after.get("bytes")),
           "file_bytes": _ratio(before.get("file_bytes"), after.get("file_bytes"))}
    for field, tag in (("latency", ""), ("latency_onnxruntime", "_onnxruntime")):
        for b, lat in before.get(field, {}).items():
            if b in after.get(field, {}):
                la = after[field][b]
                # measured together (interleaved rounds): the median of the per-round ratios
                out[f"latency{tag}_b{b}"] = la["speedup"] if "speedup" in la else _ratio(lat["ms"], la["ms"])
                if out[f"latency{tag}_b{b}"] and out["macs"]:  # how much of the MAC cut the runtime turns into time
                    out[f"latency_per_mac{tag}_b{b}"] = out[f"latency{tag}_b{b}"] / out["macs"]
    for key in ("test_acc", "val_acc"):
        if key in before and key in after:
            out[f"{key}_delta"] = after[key] - before[key]
    return out


RUNTIMES = ("torch", "onnxruntime")


def parse_runtimes(value) -> tuple[str, ...]:
    """The runtimes whose latency a prune report measures: ``"torch"`` always, ``"onnxruntime"`` when
    asked (``"torch,onnxruntime"``, a sequence of names, or ``True`` / ``None`` for torch only)."""
    if value is None or value is True:
        return ("torch",)
    items = str(value).split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [{"pytorch": "torch", "ort": "onnxruntime"}.get(v.strip().lower(), v.strip().lower())
             for v in items if v.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise ConfigError(f"--latency-runtime {value!r}: unknown runtime {', '.join(bad) or '(none given)'}; give "
                          "torch or torch,onnxruntime (PyTorch is always measured: the other runtime is timed "
                          "interleaved with it)")
    return tuple(r for r in RUNTIMES if r == "torch" or r in names)


def check_runtimes(runtimes, device="cpu") -> tuple[str, ...]:
    """:func:`parse_runtimes`, and for onnxruntime: the extra is installed and has a provider for
    ``device`` (CPU; CUDA needs onnxruntime-gpu), so that a prune is refused before any work."""
    runtimes = parse_runtimes(runtimes)
    if "onnxruntime" in runtimes:
        import torch

        from metaprune.export import require_onnx

        _, ort = require_onnx()
        provider = _provider(torch.device(device))
        if provider not in ort.get_available_providers():
            raise ConfigError(f"--latency-runtime onnxruntime on {torch.device(device).type}: onnxruntime here has no "
                              f"{provider} (available: {', '.join(ort.get_available_providers())}); install "
                              "onnxruntime-gpu, or measure with --device cpu")
    return runtimes


def _provider(device) -> str:
    return "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"


@contextlib.contextmanager
def _onnxruntime_pair(model_before, model_after, input_shape, device, threads: int):
    """Both models exported to ONNX in a temporary folder (each checked against PyTorch by
    :func:`metaprune.export.export_model`) and loaded into onnxruntime sessions with ``threads``
    intra-op threads: ``(info, {"before_onnxruntime": ..., "after_onnxruntime": ...})``."""
    import torch

    from metaprune.export import export_model, load_exported

    dev = torch.device(device)
    provider = _provider(dev)
    info = {"provider": provider, "graph_optimization": "ORT_ENABLE_ALL", "intra_op_spinning": False}
    with tempfile.TemporaryDirectory(prefix="metaprune-latency-") as d:
        sessions = {}
        for name, m in (("before", model_before), ("after", model_after)):
            path = Path(d) / f"{name}.onnx"
            rep = export_model(copy.deepcopy(m).float().cpu(), path, "onnx", tuple(input_shape))  # the model stays put
            info[f"max_abs_diff_{name}"] = rep["max_abs_diff"]
            info.update(onnxruntime=rep["onnxruntime"], opset=rep["opset"])
            sessions[f"{name}_onnxruntime"] = load_exported(path, "onnx", threads=threads, provider=provider)
        yield info, sessions


def add_latency(before: dict, after: dict, model_before, model_after, input_shape: tuple[int, ...],
                device="cpu", batches: tuple[int, ...] = (1, 64), rounds: int = 5, repeats: int = 2,
                threads: int | None = None, runtimes=("torch",)) -> None:
    """Measure the latency of the model before and after pruning together (interleaved rounds, fixed
    threads, :func:`metaprune.engine.measure.compare_latency`) and store it in the two summaries:
    ``before["latency"][b]``, ``after["latency"][b]`` (with ``speedup``, before / after).

    With ``"onnxruntime"`` in ``runtimes`` both models are also exported to ONNX (checked against
    PyTorch) and their onnxruntime sessions (CPU provider; CUDA provider on a CUDA ``device``, same
    intra-op thread count as PyTorch) are timed in the same rounds as the PyTorch models:
    ``before["latency_onnxruntime"][b]``, ``after["latency_onnxruntime"][b]`` (with ``speedup``,
    before / after in onnxruntime, and ``speedup_over_torch``, PyTorch ms / onnxruntime ms of the
    pruned model; both medians of per-round ratios)."""
    import torch

    from metaprune.engine.measure import compare_latency, round_ratio

    runtimes = parse_runtimes(runtimes)
    threads = int(threads or torch.get_num_threads())
    with contextlib.ExitStack() as stack:
        models = {"before": model_before, "after": model_after}
        ort_info = None
        if "onnxruntime" in runtimes:
            ort_info, sessions = stack.enter_context(_onnxruntime_pair(model_before, model_after, input_shape,
                                                                       device, threads))
            models.update(sessions)
        for b in batches:
            r = compare_latency(models, input_shape, b, device, rounds=rounds, repeats=repeats, threads=threads)
            m = r["models"]
            before.setdefault("latency", {})[str(b)] = {**m["before"], "runtime": "torch"}
            after.setdefault("latency", {})[str(b)] = {**m["after"], "runtime": "torch", "speedup": r["ratios"]["after"]}
            if ort_info is not None:
                mb, ma = m["before_onnxruntime"], m["after_onnxruntime"]
                before.setdefault("latency_onnxruntime", {})[str(b)] = {
                    **mb, **ort_info, "runtime": "onnxruntime",
                    "speedup_over_torch": round_ratio(m["before"]["ms_rounds"], mb["ms_rounds"])}
                after.setdefault("latency_onnxruntime", {})[str(b)] = {
                    **ma, **ort_info, "runtime": "onnxruntime", "speedup": round_ratio(mb["ms_rounds"], ma["ms_rounds"]),
                    "speedup_over_torch": round_ratio(m["after"]["ms_rounds"], ma["ms_rounds"])}


def width_changes(before: dict[str, int], after: dict[str, int]) -> list[tuple[str, int, int]]:
    """``(layer, before, after)`` for every layer (of ``layer_widths``) in model order."""
    return [(k, v, after.get(k, v)) for k, v in before.items()]


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("params", "macs"):
        return f"{v / 1e6:,.3f} M"
    if key in ("bytes", "file_bytes"):
        return f"{v / 1024:,.1f} KiB"
    if key.endswith("acc"):
        return f"{v:.2f} %"
    return f"{v:.3f} ms"


def format_table(report: dict, max_layers: int | None = 40) -> str:
    """A report.json as a text table (what ``metaprune prune`` and ``metaprune report`` print)."""
    if "before" not in report or "after" not in report:
        raise ModelFileError("this report.json holds no before/after comparison (not written by `metaprune prune`)")
    b, a, r = report["before"], report["after"], report.get("ratios") or compare(report["before"], report["after"])
    lines = []
    res = report.get("result", {})
    tgt = res.get("target", {})
    head = f"pruned {report.get('source', '?')} -> {report.get('output', '?')}"
    if tgt:
        head += (f"  [target {tgt['kind']} {tgt['value']:g}, channels removed {res.get('ratio', 0):.3f}, "
                 f"criterion {res.get('criterion') or report.get('config', {}).get('criterion', '?')}"
                 f"{'' if res.get('target_met', True) else ', TARGET NOT MET'}]")
    lines.append(head)
    lines.append(f"{'':24s}{'before':>16s}{'after':>16s}{'ratio':>10s}")
    rows = [("params", "params"), ("MACs / image", "macs"), ("weights in memory", "bytes"), ("file size", "file_bytes")]
    for label, key in rows:
        lines.append(f"{label:24s}{_fmt(key, b.get(key)):>16s}{_fmt(key, a.get(key)):>16s}"
                     f"{(f'{r[key]:.2f}x' if r.get(key) else '-'):>10s}")
    for bs, lat in b.get("latency", {}).items():
        la = a.get("latency", {}).get(bs)
        label = f"latency batch {bs}"
        ratio = r.get(f"latency_b{bs}")
        lines.append(f"{label:24s}{_fmt('ms', lat['ms']):>16s}{_fmt('ms', la['ms'] if la else None):>16s}"
                     f"{(f'{ratio:.2f}x' if ratio else '-'):>10s}")
    for bs, lat in b.get("latency_onnxruntime", {}).items():
        la = a.get("latency_onnxruntime", {}).get(bs)
        ratio = r.get(f"latency_onnxruntime_b{bs}")
        lines.append(f"{'onnxruntime batch ' + bs:24s}{_fmt('ms', lat['ms']):>16s}"
                     f"{_fmt('ms', la['ms'] if la else None):>16s}{(f'{ratio:.2f}x' if ratio else '-'):>10s}")
    if b.get("latency"):
        lat = next(iter(b["latency"].values()))
        how = (f"before and after interleaved in {lat['rounds']} rounds; ms = median of the per-round fastest "
               "runs, ratio = median of the per-round ratios"
               if lat.get("interleaved") else "each model measured alone")
        lines.append(f"  (latency: {lat['device']}, {lat['dtype']}, {lat.get('threads', '?')} threads, warm-up "
                     f"{lat['warmup']}, {lat['repeats']} runs; {how})")
        ort = next(iter(b.get("latency_onnxruntime", {}).values()), None)
        if ort:
            lines.append(f"  (onnxruntime {ort.get('onnxruntime', '?')}, {ort.get('provider', '?')}, same threads and "
                         "rounds as PyTorch; ONNX outputs match PyTorch to "
                         f"{max(ort.get('max_abs_diff_before', 0), ort.get('max_abs_diff_after', 0)):.1e})")
    for key in ("val_acc", "test_acc"):
        if key in b or key in a:
            d = r.get(f"{key}_delta")
            lines.append(f"{key.replace('_', ' '):24s}{_fmt(key, b.get(key)):>16s}{_fmt(key, a.get(key)):>16s}"
                         f"{(f'{d:+.2f} pt' if d is not None else '-'):>10s}")
    rec = res.get("reconstruct")
    if isinstance(rec, dict) and "skipped" in rec:
        lines.append(f"no reconstruction: {rec['skipped']}")
    elif isinstance(rec, dict):
        lines.append(f"reconstructed {rec.get('layers', '?')} layers on {rec.get('batches', '?')} calibration batches "
                     f"in {rec.get('seconds', 0):.1f} s (output error {rec.get('rel_err_before', 0):.3f} -> "
                     f"{rec.get('rel_err_after', 0):.3f}{'; on by default with --data, --no-reconstruct skips it' if rec.get('auto') else ''})")
    ft = report.get("finetune")
    if ft:
        lines.append(f"finetuned {ft['epochs']} epochs on {ft['data']} (best epoch {ft['best_epoch'] + 1}, "
                     f"val {ft['best_val_acc']:.2f} %)")
    widths = report.get("widths", {})
    changes = width_changes(widths.get("before", {}), widths.get("after", {}))
    if changes:
        lines.append("")
        lines.append(f"{'layer (out width / heads)':48s}{'before':>8s}{'after':>8s}")
        shown = changes if max_layers is None else changes[:max_layers]
        for name, wb, wa in shown:
            lines.append(f"{name[:48]:48s}{wb:>8d}{wa:>8d}{'' if wb == wa else '  *'}")
        if len(shown) < len(changes):
            lines.append(f"... {len(changes) - len(shown)} more layers in report.json")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    """Read ``report.json`` from a file or an output folder."""
    from metaprune.io import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.exists():
        raise ModelFileError(f"{p} does not exist; give a report.json or the folder `metaprune prune -o` wrote")
    return read_json(p)
