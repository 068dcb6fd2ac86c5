"""The adapted-layer base class shared by every method.

An adapted layer holds the frozen source weight (``weight``, shared with the source model's
values), an optional bias, two channel masks (``out_mask``, ``in_mask``; float 0/1 buffers) and
the method's own factors. Its function is always

    y = op(x, (m_out m_inᵀ) ⊙ (W + ΔW),  m_out ⊙ (b + Δb))

where ``op`` is ``conv2d`` or ``linear`` and ``ΔW``/``Δb`` come from the method's fuse rule
(:meth:`AdaptedLayer.delta`). Masks are applied in every forward pass, so a pruned channel has
no effect during training, evaluation and after fusion alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metaprune.errors import ConfigError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

@dataclass
class MethodConfig:
    """Options common to every method."""

    rank: int = 8

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1 (got {self.rank})")


class AdaptedLayer(nn.Module):
    """A frozen Conv2d or Linear plus channel masks and a method-specific additive update.

    Subclasses set ``method`` and implement :meth:`delta` (the update of the full-size weight and
    bias), :meth:`slice_out` / :meth:`slice_in` (drop channels from their factors) and
    :meth:`factor_names` with the dimension each factor is indexed by.
    """

    method = "base"

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.kind = "conv"
            self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation,
                              "groups": base.groups}
            self.kernel_size = tuple(base.kernel_size)
            if base.groups != 1:
                raise ConfigError("grouped convolutions are not adapted (groups != 1)")
            if base.padding_mode not in PADDING_MODES:
                raise ConfigError(f"cannot adapt a convolution with padding_mode {base.padding_mode!r}; "
                                  f"supported: {', '.join(PADDING_MODES)}")
            # the base layer's own padding: non-zero modes pad explicitly, exactly as nn.Conv2d does
            self.padding_mode = base.padding_mode
            self._explicit_pad = tuple(base._reversed_padding_repeated_twice)
        elif isinstance(base, nn.Linear):
            self.kind = "linear"
            self.conv_args = {}
            self.kernel_size = ()
            self.padding_mode = "zeros"
            self._explicit_pad = ()
        else:
            raise ConfigError(f"cannot adapt a {type(base).__name__}; only Conv2d and Linear")
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
        self.register_buffer("out_mask", torch.ones(self.weight.shape[0]))
        self.register_buffer("in_mask", torch.ones(self.weight.shape[1]))

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        """Whether this method can adapt ``base``."""
        if isinstance(base, nn.Linear):
            return True
        return (isinstance(base, nn.Conv2d) and base.groups == 1 and all(k % 2 for k in base.kernel_size)
                and base.padding_mode in PADDING_MODES)

    # ------------------------------------------------------------------ shape
    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:  # nn.Linear's names, for code that reads an adapted Linear as one (ViT attention)
        if self.kind != "linear":
            raise AttributeError("an adapted Conv2d has out_channels, not out_features")
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        if self.kind != "linear":
            raise AttributeError("an adapted Conv2d has in_channels, not in_features")
        return self.weight.shape[1]

    def centre(self, dw: torch.Tensor) -> torch.Tensor:
        """Place an (out × in) pointwise update on the kernel's centre tap (identity for Linear)."""
        if self.kind == "linear":
            return dw
        kh, kw = self.kernel_size
        full = dw.new_zeros(self.weight.shape)
        full[:, :, kh // 2, kw // 2] = dw
        return full

    # ------------------------------------------------------------------ method hooks
    def delta(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(ΔW, Δb)`` of the full-size layer (``None`` = no update). Masks are applied by the caller."""
        return None, None

    def factor_dims(self) -> dict[str, tuple[str | None, ...]]:
        """Each trainable factor's name -> per-dimension channel space ("out", "in" or None)."""
        return {}

    # ------------------------------------------------------------------ fused weights
    def fused(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masked fused ``(weight, bias)`` this layer computes with."""
        dw, db = self.delta()
        w = self.weight if dw is None else self.weight + dw
        mask = self.out_mask[:, None] * self.in_mask[None, :]
        if self.kind == "conv":
            mask = mask[:, :, None, None]
        w = w * mask
        b = self.bias
        if db is not None:
            b = db if b is None else b + db
        if b is not None:
            b = b * self.out_mask
        return w, b

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The base convolution with weight ``w``: ``nn.Conv2d._conv_forward`` of the source layer, padding mode included."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.conv_args["stride"], 0, self.conv_args["dilation"], self.conv_args["groups"])
        return F.conv2d(x, w, b, **self.conv_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.fused()
        if self.kind == "conv":
            return self.conv(x, w, b)
        return F.linear(x, w, b)

    def to_module(self) -> nn.Module:
        """A plain ``nn.Conv2d``/``nn.Linear`` with the fused, masked weights (no adapter left).

        Raises :class:`ConfigError` when a fused value is not finite (a diverged or damaged adapter).
        """
        with torch.no_grad():
            w, b = self.fused()
        for t, what in ((w, "weight"), (b, "bias")):
            if t is not None and not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                raise ConfigError(f"fusing a {self.method} adapter gives {n} non-finite {what} value(s) "
                                  f"({self.kind} {self.in_channels}->{self.out_channels}); the adapter diverged "
                                  "or its values are damaged — retrain with a lower learning rate")
        if self.kind == "conv":
            m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=b is not None,
                          padding_mode=self.padding_mode, **self.conv_args)
        else:
            m = nn.Linear(self.in_channels, self.out_channels, bias=b is not None)
        m = m.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def keep_channels(self, dim: str, keep: torch.Tensor) -> None:
        """Physically keep only the channels ``keep`` of ``dim`` ("out" or "in") in every tensor."""
        def sl(t: torch.Tensor, axis: int) -> torch.Tensor:
            return t.index_select(axis, keep.to(t.device))

        axis = 0 if dim == "out" else 1
        self.weight = nn.Parameter(sl(self.weight, axis), requires_grad=self.weight.requires_grad)
        if dim == "out" and self.bias is not None:
            self.bias = nn.Parameter(sl(self.bias, 0), requires_grad=self.bias.requires_grad)
        name = f"{dim}_mask"
        setattr(self, name, sl(getattr(self, name), 0))
        for fname, dims in self.factor_dims().items():
            p = getattr(self, fname)
            for ax, d in enumerate(dims):
                if d == dim:
                    p = nn.Parameter(sl(p, ax), requires_grad=p.requires_grad)
            setattr(self, fname, p)

    def extra_repr(self) -> str:
        pm = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}"
        return f"{self.kind}, in={self.in_channels}, out={self.out_channels}, method={self.method}{pm}"


class FullLayer(AdaptedLayer):
    """Every weight trainable, no adapter: the task head, and fine-pruning's layers (method ``full``)."""

    method = "full"

    def __init__(self, base: nn.Module, cfg: MethodConfig | None = None):
        super().__init__(base)
        self.weight.requires_grad_(True)

    def factor_dims(self) -> dict[str, tuple[str | None, ...]]:
        return {}
