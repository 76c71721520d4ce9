"""OpenCLIP's text transformer: SD 2.x's text encoder (ViT-H/14, `cond_stage_model.model.*`) and SDXL's second
one (ViT-bigG/14, `conditioner.embedders.1.model.*`).

Attribute names are OpenCLIP's own, which are how those checkpoints store it, so a file loads with `strict=True`
and no renaming: `token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn, ln_2,
mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`. The attention keeps the names of torch's
`nn.MultiheadAttention`, which OpenCLIP uses: one fused `in_proj_weight` (q, k and v stacked) and `out_proj`.

Both models condition on an earlier layer than the last: SD 2.x on the penultimate layer's output through the
final norm, SDXL on the penultimate layer's output as it is (`hidden`), and SDXL's pooled embedding is the final
layer's, final-normed, at each prompt's end token, through `text_projection` (`pooled`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .layers import attention


class Attention(nn.Module):
    """Causal self-attention under nn.MultiheadAttention's names (and initialisation). `adapter`, when booth.lora
    sets one, adds its low-rank q, k and v updates to the fused projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.register_module("adapter", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.adapter is not None:
            qkv = qkv + self.adapter(x)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))  # causal, as CLIP was trained


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, intermediate), gelu=nn.GELU(),
                                             c_proj=nn.Linear(intermediate, width)))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(cfg.width, cfg.heads, cfg.intermediate) for _ in range(cfg.layers)]
        )


class OpenCLIPText(nn.Module):
    """Token ids (B, 77) -> hidden states (B, 77, width), and the pooled, projected embedding (B, projection)."""

    def __init__(self, cfg: CLIPConfig, projection: int):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, projection))
        # OpenCLIP's own initialisation of the two bare parameters (the layers bring theirs)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """SD 2.x's conditioning: the penultimate layer's output through the final norm; `clip_skip` N stops
        N layers before the last (1, SD 2.x's own, is the penultimate)."""
        return self.hidden(ids, clip_skip, final_norm=True)

    def layers(self, ids: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """The output of the transformer without its last `skip` layers (no final norm)."""
        return self.states(ids, skip, to_end=False)[0]

    def states(
        self, ids: torch.Tensor, skip: int, to_end: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the output without the last `skip` layers, and with `to_end` the last layer's) in one pass."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        blocks = self.transformer.resblocks
        stop = len(blocks) - skip
        early = x if stop <= 0 else None
        for i, block in enumerate(blocks if to_end else blocks[:stop]):
            x = block(x)
            early = x if i == stop - 1 else early
        return early, x if to_end else None

    def hidden(self, ids: torch.Tensor, skip: int = 1, final_norm: bool = False) -> torch.Tensor:
        """The conditioning: the penultimate layer's output (`skip` 1), through the final norm if `final_norm`
        (SD 2.x) or as it is (SDXL)."""
        x = self.layers(ids, skip)
        return self.ln_final(x) if final_norm else x

    def pooled(self, ids: torch.Tensor, eos: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed last layer at each row's end token (the first `eos` id; by default the largest id,
        which CLIP's tokenizer gives the end token), through `text_projection`."""
        return self.project(self.layers(ids), ids, eos)

    def project(self, last: torch.Tensor, ids: torch.Tensor, eos: torch.Tensor | None = None) -> torch.Tensor:
        """`pooled` from the last layer's output `last`."""
        x = self.ln_final(last)
        where = ids.argmax(-1) if eos is None else (ids == eos).int().argmax(-1)
        return x[torch.arange(len(ids), device=ids.device), where] @ self.text_projection

    def sdxl(self, ids: torch.Tensor, skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's use of it, in one pass: (the penultimate layer's output as it is, the pooled embedding)."""
        early, last = self.states(ids, skip)
        return early, self.project(last, ids)
