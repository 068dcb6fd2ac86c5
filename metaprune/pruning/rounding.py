"""Hardware-friendly widths: what ``round_to="auto"`` (the default of ``metaprune prune``) keeps.

A pruned layer of 41 channels costs the kernels about what 48 cost: CPU convolutions (oneDNN) and GPU
tensor cores work on blocks of channels, so widths off a block boundary buy MACs but little time.
``round_to="auto"`` picks a multiple for the device and dtype the model is on, from :data:`TABLE`:

==========  =====================  ========  =================================================================
device      dtype                  multiple  why
==========  =====================  ========  =================================================================
cpu         float32, AVX-512       8         oneDNN blocks channels by 16 on AVX-512; 8 keeps 16- and 32-wide
                                             layers prunable (16 would leave CIFAR ResNets' first stage whole)
                                             and measured 0.86-0.90 of the MAC ratio (results/round_to_auto.md)
cpu         float32, AVX2          8         8 fp32 lanes per 256-bit register (oneDNN's nChw8c blocks)
cpu         float32, other ISA     4         128-bit vectors (NEON / VSX / ZVECTOR, and the scalar default)
cpu         bfloat16 / float16     16        AVX-512-BF16 / AMX tiles take 16-32 channels per step
cuda        float16 / bfloat16     8         tensor cores need channels that are multiples of 8 (NVIDIA's
                                             "Deep Learning Performance" guide, cuDNN >= 7.6.3)
cuda        float32 (TF32)         4         TF32 tensor cores need multiples of 4 (same guide)
cuda        int8                   16        int8 tensor cores need multiples of 16
other       any                    8         no measured entry: a safe block size
==========  =====================  ========  =================================================================

Per layer the multiple is never larger than makes sense: a layer at least ``multiple`` wide keeps a
multiple of it and never rounds down to nothing (at least one multiple: a 16-wide layer with multiple 8
keeps 8 or 16; torch-pruning's own ``round_to`` instead leaves a layer that would round to 0 whole, which
makes the MAC-vs-ratio curve jump); a layer narrower than the multiple uses the largest power of two at
most half its width (a 6-wide layer with multiple 8 keeps 2, 4 or 6; 1-3 channels: not rounded).

``round_to="block"`` (``--round-to block``, opt-in) uses the CPU's convolution block instead: 16 with
AVX-512, 8 with AVX2 (4 otherwise; the ``auto`` multiple on other devices), which is what onnxruntime's
CPU provider needs: its MLAS NCHWc kernels pad every output width up to the block, so a 24-wide layer
costs what a 32-wide one does (``auto``'s 8 wastes up to a third of the pruned MACs there; measured on
ResNet-56 at 2.5x fewer MACs: results/round_to_auto.ort.md). Its *block rule* (:class:`BlockMultiple`)
differs from the rule above in two points, both needed to reach a MAC target with a multiple as coarse as
a whole block: a layer exactly one block wide may keep half a block (a 16-wide layer keeps 8 or 16:
onnxruntime reads inputs narrower than a block without padding), and a layer keeps the multiple
*nearest* to the count the ratio asks for (rounding down would halve every 32-wide layer at any ratio, so
a search could never land in between). So a small ``--ratio`` may prune nothing with ``block``; a missed
speed-up / params target retries with half the block and the plain rule, as ``auto`` does. Not the
default: at batch 64 it gained onnxruntime 0.07-0.2x and PyTorch nothing measurable on ResNet-56, and a
uniform ratio curve (``metaprune curve``) needs every ratio step to prune something. Attention heads are removed whole and are not rounded (torch-pruning skips
width rounding for head groups). When a speed-up / params target cannot be met within the tolerance
with the table's multiple, ``"auto"`` halves it (8, 4, 2, then exact widths) and the report lists the
multiples that missed. ``round_to=1`` (``--round-to 1``) gives the exact, unrounded widths;
an explicit ``round_to=N > 1`` is torch-pruning's ``round_to`` unchanged.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError

AUTO = "auto"

# (device type, dtype kind, cpu capability or "*") -> (multiple, why)
TABLE: dict[tuple[str, str, str], tuple[int, str]] = {
    ("cpu", "float32", "AVX512"): (8, "CPU fp32 with AVX-512: oneDNN blocks channels by 16, but 8 keeps 16/32-wide "
                                      "layers prunable and measured 0.86-0.90 of the MAC ratio on ResNet-56"),
    ("cpu", "float32", "AVX2"): (8, "CPU fp32 with AVX2: 8 fp32 lanes per 256-bit register (oneDNN nChw8c blocks)"),
    ("cpu", "float32", "*"): (4, "CPU fp32 without AVX2/AVX-512: 128-bit vectors hold 4 fp32 lanes"),
    ("cpu", "low", "*"): (16, "CPU bf16/fp16: AVX-512-BF16 / AMX tiles process 16-32 channels per step"),
    ("cuda", "low", "*"): (8, "CUDA fp16/bf16: tensor cores need channel counts that are multiples of 8"),
    ("cuda", "float32", "*"): (4, "CUDA fp32 (TF32 tensor cores): channel counts that are multiples of 4"),
    ("cuda", "int8", "*"): (16, "CUDA int8: tensor cores need channel counts that are multiples of 16"),
}
DEFAULT = (8, "no table entry for this device/dtype: 8, a block size most kernels handle well")


class AutoMultiple(int):
    """The multiple ``round_to="auto"`` resolved to (an ``int``; its type selects the per-layer rule)."""


class BlockMultiple(AutoMultiple):
    """An :class:`AutoMultiple` with the block rule: a layer one block wide may keep half of it, and a
    layer keeps the nearest multiple (not the one below)."""


BLOCK = "block"
# CPU fp32 convolution block (oneDNN's nChw16c / nChw8c, onnxruntime MLAS's NCHWc block) by vector ISA
CPU_BLOCK = {"AVX512": 16, "AVX2": 8}


def parse_round_to(value) -> int | str:
    """``"auto"``, ``"block"`` or an int >= 1 (``None`` means 1: unrounded); raises :class:`ConfigError`
    otherwise."""
    if value is None:
        return 1
    if isinstance(value, str):
        if value.strip().lower() in (AUTO, BLOCK):
            return value.strip().lower()
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"--round-to {value!r} must be 'auto', 'block' or a whole number >= 1 (1: exact "
                              "widths)") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--round-to {value!r} must be 'auto', 'block' or a whole number >= 1 (1: exact widths)")
    return int(value)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "low"
    if dtype in (torch.int8, torch.uint8, torch.qint8, torch.quint8):
        return "int8"
    return "float32"


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def table_multiple(device: torch.device | str, dtype: torch.dtype) -> tuple[int, dict]:
    """The table's multiple for ``device`` / ``dtype`` and a JSON-ready note of why."""
    dev = torch.device(device)
    kind = _dtype_kind(dtype)
    cap = cpu_capability() if dev.type == "cpu" else "*"
    isa = "AVX512" if cap.startswith("AVX512") else cap
    entry = TABLE.get((dev.type, kind, isa)) or TABLE.get((dev.type, kind, "*")) or DEFAULT
    info = {"requested": AUTO, "multiple": entry[0], "reason": entry[1], "device": dev.type,
            "dtype": str(dtype).removeprefix("torch.")}
    if dev.type == "cpu":
        info["cpu_capability"] = cap
    return entry[0], info


def block_multiple(device: torch.device | str, dtype: torch.dtype) -> tuple[int, dict]:
    """``round_to="block"``: the convolution block of this CPU for fp32 (16 with AVX-512, 8 with AVX2, else
    4), the ``auto`` table's multiple elsewhere; and a JSON-ready note of why."""
    m, info = table_multiple(device, dtype)
    info["requested"] = BLOCK
    if torch.device(device).type == "cpu" and _dtype_kind(dtype) == "float32":
        isa = "AVX512" if info["cpu_capability"].startswith("AVX512") else info["cpu_capability"]
        m = CPU_BLOCK.get(isa, 4)
        info["reason"] = (f"CPU fp32 with {info['cpu_capability']}: convolution kernels block channels by {m} "
                          "(onnxruntime's MLAS NCHWc kernels pad output widths up to the block; oneDNN nChw"
                          f"{m}c)" if isa in CPU_BLOCK else "CPU fp32 without AVX2/AVX-512: 4 fp32 lanes")
    info["multiple"] = m
    return m, info


def layer_multiple(width: int, multiple: int) -> int:
    """The multiple used for a layer ``width`` channels wide: ``multiple`` itself for a layer at least that
    wide (block rule: wider), else the largest power of two at most ``width / 2`` (1: not rounded)."""
    if width > multiple or (width == multiple and not isinstance(multiple, BlockMultiple)):
        return int(multiple)
    cap = width // 2
    m = 1
    while m * 2 <= cap:
        m *= 2
    return m


def kept_channels(width: int, keep: int, multiple: int) -> int:
    """Channels a ``width``-channel layer keeps when ``keep`` were asked, under ``round_to="auto"``:
    rounded down to the layer's multiple (block rule: to the nearest one), but never below one multiple
    (nor above ``width``)."""
    m = layer_multiple(width, multiple)
    if m <= 1 or keep >= width:
        return min(keep, width)
    if isinstance(multiple, BlockMultiple):
        return min(max((2 * keep + m) // (2 * m) * m, m), width)  # nearest multiple, halves up
    return max(keep - keep % m, m)


class RoundingPruner(tp.pruner.BasePruner):
    """torch-pruning's pruner with ``round_to="auto"``'s per-layer rounding (:func:`kept_channels`)."""

    def _round_to(self, n_pruned, current_channels, round_to):
        keep = kept_channels(int(current_channels), int(current_channels) - int(n_pruned), round_to)
        return max(int(current_channels) - keep, 0)


def finer(round_to: AutoMultiple) -> AutoMultiple | None:
    """The next multiple ``"auto"`` tries when ``round_to`` misses the MAC / params target (None: exact):
    half of it, with the plain rule (also after the block rule)."""
    half = int(round_to) // 2
    return AutoMultiple(half) if half > 1 else None


def pruner_class(round_to) -> type[tp.pruner.BasePruner]:
    """The pruner to build for a resolved ``round_to``."""
    return RoundingPruner if isinstance(round_to, AutoMultiple) else tp.pruner.BasePruner


def tp_round_to(round_to) -> int | None:
    """What torch-pruning's ``round_to`` gets (None: unrounded)."""
    if round_to is None or round_to in (AUTO, BLOCK) or int(round_to) <= 1:
        return None
    return round_to


def resolve(round_to, model: nn.Module) -> tuple[int, dict]:
    """Resolve ``PruneConfig.round_to`` for ``model`` (its device and dtype): ``(multiple, info)``; the
    multiple is an :class:`AutoMultiple` for ``"auto"`` (a :class:`BlockMultiple` for ``"block"``) and
    ``info`` says which and why (for the report)."""
    value = parse_round_to(round_to)
    if value not in (AUTO, BLOCK):
        why = ("--round-to 1: exact (unrounded) widths" if value == 1 else
               f"--round-to {value} given: torch-pruning's round_to (a layer that would keep fewer than {value} "
               "channels keeps all of them)")
        return value, {"requested": value, "multiple": value, "reason": why}
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    if value == BLOCK:
        m, info = block_multiple(device, dtype)
        info["rule"] = ("block rule: a layer wider than `multiple` keeps the nearest multiple of it (at least one); "
                        "a layer exactly `multiple` wide keeps a multiple of half of it; narrower layers the "
                        "largest power of two <= width/2; attention heads are kept whole; a missed target "
                        "retries with half the multiple and the plain rule")
        return BlockMultiple(m), info
    m, info = table_multiple(device, dtype)
    info["rule"] = ("a layer at least `multiple` wide keeps a multiple of it (at least one); a narrower layer "
                    "the largest power of two <= width/2; attention heads are kept whole")
    return AutoMultiple(m), info
