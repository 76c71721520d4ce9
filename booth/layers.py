"""Pieces shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """Multi-head attention over (B, L, C) tensors; the only attention kernel in booth."""
    b, lq, c = q.shape
    q, k, v = (t.view(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    if (
        q.is_meta
    ):  # a memory forecast: SDPA's math path there keeps the scores, which devices' fused kernels never make
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, lq, c)


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)
