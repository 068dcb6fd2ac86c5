"""The prune report: before / after / ratio of params, MACs, file size, latency and accuracy,
plus per-layer widths; and its text table."""

from __future__ import annotations

from pathlib import Path

from metaprune.errors import ModelFileError


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
    for b, lat in before.get("latency", {}).items():
        if b in after.get("latency", {}):
            la = after["latency"][b]
            # measured together (interleaved rounds): the median of the per-round ratios
            out[f"latency_b{b}"] = la["speedup"] if "speedup" in la else _ratio(lat["ms"], la["ms"])
            if out[f"latency_b{b}"] and out["macs"]:  # how much of the MAC cut the hardware turns into time
                out[f"latency_per_mac_b{b}"] = out[f"latency_b{b}"] / out["macs"]
    for key in ("test_acc", "val_acc"):
        if key in before and key in after:
            out[f"{key}_delta"] = after[key] - before[key]
    return out


def add_latency(before: dict, after: dict, model_before, model_after, input_shape: tuple[int, ...],
                device="cpu", batches: tuple[int, ...] = (1, 64), rounds: int = 5, repeats: int = 2,
                threads: int | None = None) -> None:
    """Measure the latency of the model before and after pruning together (interleaved rounds, fixed
    threads, :func:`metaprune.engine.measure.compare_latency`) and store it in the two summaries:
    ``before["latency"][b]``, ``after["latency"][b]`` (with ``speedup``, before / after)."""
    from metaprune.engine.measure import compare_latency

    for b in batches:
        r = compare_latency({"before": model_before, "after": model_after}, input_shape, b, device,
                            rounds=rounds, repeats=repeats, threads=threads)
        before.setdefault("latency", {})[str(b)] = r["models"]["before"]
        after.setdefault("latency", {})[str(b)] = {**r["models"]["after"], "speedup": r["ratios"]["after"]}


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
    if b.get("latency"):
        lat = next(iter(b["latency"].values()))
        how = (f"before and after interleaved in {lat['rounds']} rounds; ms = median of the per-round fastest "
               "runs, ratio = median of the per-round ratios"
               if lat.get("interleaved") else "each model measured alone")
        lines.append(f"  (latency: {lat['device']}, {lat['dtype']}, {lat.get('threads', '?')} threads, warm-up "
                     f"{lat['warmup']}, {lat['repeats']} runs; {how})")
    for key in ("val_acc", "test_acc"):
        if key in b or key in a:
            d = r.get(f"{key}_delta")
            lines.append(f"{key.replace('_', ' '):24s}{_fmt(key, b.get(key)):>16s}{_fmt(key, a.get(key)):>16s}"
                         f"{(f'{d:+.2f} pt' if d is not None else '-'):>10s}")
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
