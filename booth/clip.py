"""CLIP ViT-L/14 text encoder, the conditioning model of Stable Diffusion v1.

Attribute names are those of `transformers.CLIPTextModel` under `text_model.`, which is also how SD1
single-file checkpoints store it (`cond_stage_model.transformer.text_model.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CLIPConfig
from .layers import attention


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal for text: CLIP was trained autoregressively-masked, and SD relies on it (no padding mask is
        # used). The image tower attends everywhere.
        h = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(h)


class MLP(nn.Module):
    def __init__(self, width: int, intermediate: int, act: str):
        super().__init__()
        self.act = quick_gelu if act == "quick_gelu" else nn.functional.gelu
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = SelfAttention(cfg.width, cfg.heads, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.intermediate, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg, causal) for _ in range(cfg.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) -> hidden states (B, 77, width)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.text_model = TextModel(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """`clip_skip=2` stops one layer early ("CLIP skip" in AUTOMATIC1111), still applying the final norm."""
        return self.hidden(ids, clip_skip - 1, final_norm=True)

    def hidden(self, ids: torch.Tensor, skip: int = 1, final_norm: bool = False) -> torch.Tensor:
        """The output without the last `skip` layers, through the final norm if `final_norm`; SDXL conditions
        on the penultimate layer's as it is (`skip` 1)."""
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - skip]:
            x = layer(x)
        return tm.final_layer_norm(x) if final_norm else x
