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
        elif isinstance(base, nn.Linear):
            self.kind = "linear"
            self.conv_args = {}
            self.kernel_size = ()
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
        return isinstance(base, nn.Conv2d) and base.groups == 1 and all(k % 2 for k in base.kernel_size)

    # ------------------------------------------------------------------ shape
    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.fused()
        if self.kind == "conv":
            return F.conv2d(x, w, b, **self.conv_args)
        return F.linear(x, w, b)

    def to_module(self) -> nn.Module:
        """A plain ``nn.Conv2d``/``nn.Linear`` with the fused, masked weights (no adapter left)."""
        w, b = self.fused()
        if self.kind == "conv":
            m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=b is not None, **self.conv_args)
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
        return f"{self.kind}, in={self.in_channels}, out={self.out_channels}, method={self.method}"


class FullLayer(AdaptedLayer):
    """Every weight trainable, no adapter: the task head, and fine-pruning's layers (method ``full``)."""

    method = "full"

    def __init__(self, base: nn.Module, cfg: MethodConfig | None = None):
        super().__init__(base)
        self.weight.requires_grad_(True)

    def factor_dims(self) -> dict[str, tuple[str | None, ...]]:
        return {}
