"""The whole Stable Diffusion v1 model in the CompVis `LatentDiffusion` layout.

`model.diffusion_model` (UNet), `first_stage_model` (VAE) and `cond_stage_model.transformer` (CLIP text
encoder) are exactly the prefixes of SD1 single-file checkpoints, so `state_dict()` of this module *is* a
checkpoint other Stable Diffusion tools load, and such a checkpoint loads here with `strict=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextModel
from .config import ModelConfig
from .openclip import OpenCLIPText
from .unet import UNetModel
from .vae import AutoencoderKL


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # CompVis DiffusionWrapper
        self.model.diffusion_model = UNetModel(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = nn.Module()  # CompVis FrozenCLIPEmbedder, or SD 2.x's FrozenOpenCLIPEmbedder
        if cfg.text_encoder == "openclip":
            self.cond_stage_model.model = OpenCLIPText(cfg.clip, cfg.clip.projection)
        else:
            self.cond_stage_model.transformer = CLIPTextModel(cfg.clip)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextModel | OpenCLIPText:
        return getattr(self.cond_stage_model, TEXT_ATTRIBUTE[self.config.text_encoder])


TEXT_ATTRIBUTE = {
    "clip": "transformer",
    "openclip": "model",
}  # under cond_stage_model, by config.text_encoder


def text_prefix(cfg: ModelConfig) -> str:
    """Where the text encoder's weights are in a checkpoint: cond_stage_model.transformer. (SD1) or .model."""
    return f"cond_stage_model.{TEXT_ATTRIBUTE[cfg.text_encoder]}."


# The networks a pipeline loads and frees on their own, by the state-dict prefixes of their weights: the VAE's
# two halves are separate because txt2img never needs the encoder.
PARTS = {
    "text_encoder": ("cond_stage_model.",),
    "unet": ("model.diffusion_model.",),
    "vae_encoder": ("first_stage_model.encoder.", "first_stage_model.quant_conv."),
    "vae_decoder": ("first_stage_model.decoder.", "first_stage_model.post_quant_conv."),
}


def part_of(key: str) -> str | None:
    """Which of PARTS a weight (by its LatentDiffusion name) belongs to."""
    return next((part for part, prefixes in PARTS.items() if key.startswith(prefixes)), None)


def part_modules(model: LatentDiffusion, part: str) -> list[nn.Module]:
    vae = model.vae
    return {"text_encoder": [model.text_encoder], "unet": [model.unet], "vae_encoder": [vae.encoder, vae.quant_conv],
            "vae_decoder": [vae.decoder, vae.post_quant_conv]}[part]  # fmt: skip


def build(
    cfg: ModelConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> LatentDiffusion:
    """Build the module tree; on the meta device (the default) no memory is allocated and nothing is initialised,
    ready for `load_state_dict(..., assign=True)`."""
    with torch.device(device):
        model = LatentDiffusion(cfg)
    return model.to(dtype) if dtype is not None else model


def random_weights(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """A model with PyTorch's default random initialisation (tests, benchmarks)."""
    torch.manual_seed(seed)
    return build(cfg, device="cpu", dtype=dtype)
