"""Prunable building blocks shared by the registered architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``qkv`` and ``proj`` linear layers.

    A drop-in replacement for ``nn.MultiheadAttention`` as used by torchvision's ViT encoder
    (``attn(x, x, x, need_weights=False) -> (out, None)``, batch first). Unlike
    ``nn.MultiheadAttention`` it can lose whole heads: the head count is ``num_heads`` and the
    head size is derived from ``qkv.out_features`` at run time, so the structured-pruning engine
    may shrink heads or remove them. State dicts written by ``nn.MultiheadAttention``
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) load into it unchanged.

    Args:
        embed_dim: width of the residual stream.
        num_heads: number of heads; ``embed_dim`` must be divisible by it.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.batch_first = True

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // (3 * self.num_heads)

    def forward(self, query: torch.Tensor, key=None, value=None, need_weights: bool = False, **_):
        b, n, _c = query.shape
        # unbind (not indexing) so torch-pruning maps qkv rows to heads and to proj columns
        q, k, v = self.qkv(query).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, n, -1))
        return out, None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        renames = {"in_proj_weight": "qkv.weight", "in_proj_bias": "qkv.bias",
                   "out_proj.weight": "proj.weight", "out_proj.bias": "proj.bias"}
        for old, new in renames.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"
