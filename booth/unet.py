"""The Stable Diffusion UNet of every family (SD1, SD 2.x, SDXL), with the module names of CompVis' and SGM's
`openaimodel.UNetModel`; the families differ only in their UNetConfig.

Because the names match, `model.diffusion_model.*` from any single-file checkpoint loads with one
`load_state_dict` call: `input_blocks.N.M`, `middle_block`, `output_blocks`, `in_layers`, `emb_layers`,
`out_layers`, `skip_connection`, `transformer_blocks`, `attn1`/`attn2`, `ff.net`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import attention, group_norm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosine half first as in CompVis (and diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, groups=groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups=groups),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = channels == out_channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """With `linear` (SD 2.x, SDXL) proj_in and proj_out are linear layers over the flattened pixels, as in
    CompVis' use_linear_in_transformer; else 1x1 convolutions before and after the flattening (SD1)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int = 32,
                 linear: bool = False):  # fmt: skip
        super().__init__()
        self.linear = linear
        self.norm = group_norm(channels, eps=1e-6, groups=groups)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        y = (
            self.proj_in(y.flatten(2).transpose(1, 2))
            if self.linear
            else self.proj_in(y).flatten(2).transpose(1, 2)
        )
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            return x + self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the skip connection's size (not blindly x2) keeps odd latent sizes working.
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A block of layers, each given what it needs: the time embedding, the text context or an output size."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """UNet: (x (B,4,h,w), t (B,), context (B,L,C)[, y (B,adm)]) -> the prediction (eps or v) (B,4,h,w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, emb_ch, g = cfg.model_channels, cfg.model_channels * 4, cfg.norm_groups
        self.model_channels = mc
        self.gradient_checkpointing = False
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if (
            cfg.adm_in_channels
        ):  # SDXL: CompVis' num_classes "sequential", one more MLP into the time embedding
            mlp = nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            self.label_emb = nn.Sequential(mlp)

        def transformer(ch, level=None):
            return SpatialTransformer(
                ch, cfg.heads(ch), cfg.depth(level), cfg.context_dim, g, cfg.linear_proj
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch, g), transformer(ch), ResBlock(ch, emb_ch, ch, g)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, groups=g), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`y` (B, adm_in_channels): SDXL's pooled text and size features, for a UNet with label_emb."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("this UNet (SDXL) needs y, the pooled text and size features")
            emb = emb + self.label_emb(y.to(emb.dtype))
        h, skips = x.to(emb.dtype), []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, size)
        return self.out(h)
