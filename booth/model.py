"""The whole Stable Diffusion model in the CompVis `LatentDiffusion` layout (SGM's `DiffusionEngine` for SDXL).

`model.diffusion_model` (UNet), `first_stage_model` (VAE) and the text encoder's prefix (SD1:
`cond_stage_model.transformer`, SD 2.x: `cond_stage_model.model`, SDXL: `conditioner.embedders.0.transformer`
and `conditioner.embedders.1.model`) are exactly those of the families' single-file checkpoints, so
`state_dict()` of this module *is* a checkpoint other Stable Diffusion tools load, and such a checkpoint loads
here with `strict=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextModel
from .config import SIZE_FEATURES, ModelConfig
from .openclip import OpenCLIPText
from .tokenizer import EOS, PAD_OPENCLIP, Tokenizer
from .unet import UNetModel, timestep_embedding
from .vae import AutoencoderKL


class Conditioner(nn.Module):
    """SDXL's two text encoders where SGM's GeneralConditioner keeps them: CLIP-L as embedders.0.transformer,
    OpenCLIP ViT-bigG as embedders.1.model. (Its other embedders, of the image sizes, have no weights: see
    booth.pipeline.size_features.)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedders = nn.ModuleList([nn.Module(), nn.Module()])
        self.embedders[0].transformer = CLIPTextModel(cfg.clip)
        self.embedders[1].model = OpenCLIPText(cfg.clip2, cfg.clip2.projection)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 2, 77), each prompt as the two tokenizers pad it (CLIP-L with the end token, bigG with 0) ->
        (the two penultimate layers side by side (B, 77, 768 + 1280), bigG's pooled embedding (B, 1280))."""
        first = self.embedders[0].transformer.hidden(ids[:, 0], clip_skip)
        second, pooled = self.embedders[1].model.sdxl(ids[:, 1], clip_skip)
        return torch.cat([first, second], dim=-1), pooled


def encode_text(encoder: nn.Module, ids: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """(B, [2,] 77*K) ids of K 77-token chunks -> {"context": (B, 77*K, C)}, and for SDXL "pooled" (B, P), the
    first chunk's. Each chunk goes through the encoder's own forward (so DDP sees the call) on its own."""
    b, k, n = ids.shape[0], ids.shape[-1] // 77, 77
    rows = ids.reshape(b, *ids.shape[1:-1], k, n).movedim(-2, 1).reshape(b * k, *ids.shape[1:-1], n)
    out = encoder(rows, clip_skip)
    context, pooled = out if isinstance(out, tuple) else (out, None)
    cond = {"context": context.reshape(b, k * n, -1)}
    if pooled is not None:
        cond["pooled"] = pooled.reshape(b, k, -1)[:, 0]
    return cond


def tokenize(tokenizer: Tokenizer, cfg: ModelConfig, texts: list[str]) -> torch.Tensor:
    """Token ids (B, 77*K) padded as the model's text encoder was trained (CLIP-L's with the end token,
    OpenCLIP's with 0); for SDXL both paddings, (B, 2, 77*K), for its two encoders."""
    if cfg.text_encoder == "sdxl":
        return torch.stack([tokenizer(texts, pad=EOS), tokenizer(texts, pad=PAD_OPENCLIP)], dim=1)
    return tokenizer(texts, pad=PAD_OPENCLIP if cfg.text_encoder == "openclip" else EOS)


def size_features(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning (SGM's ConcatTimestepEmbedderND): original (h, w), crop (top, left) and target
    (h, w), each number embedded as a timestep in SIZE_FEATURES channels -> (1, 6 * SIZE_FEATURES)."""
    numbers = torch.tensor([*original, *crop, *target], dtype=torch.float32)
    return timestep_embedding(numbers, SIZE_FEATURES).reshape(1, -1)


def unet_inputs(text: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The UNet's conditioning keywords from `encode_text`'s: the `context`, and for SDXL `y`, the pooled text
    and the size features of an uncropped image of `size` (h, w) (diffusers' default time ids)."""
    if "pooled" not in text:
        return {"context": text["context"]}
    pooled = text["pooled"]
    sizes = size_features(size, (0, 0), size).to(pooled)
    return {"context": text["context"], "y": torch.cat([pooled, sizes.expand(len(pooled), -1)], dim=-1)}


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # CompVis DiffusionWrapper
        self.model.diffusion_model = UNetModel(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.text_encoder == "sdxl":
            self.conditioner = Conditioner(cfg)
            return
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
    def text_encoder(self) -> CLIPTextModel | OpenCLIPText | Conditioner:
        """The module that turns token ids into conditioning: for SDXL both encoders together."""
        return self.get_submodule(text_prefix(self.config).rstrip("."))


# Where each family's text encoder is, by config.text_encoder
TEXT_PREFIX = {
    "clip": "cond_stage_model.transformer.",
    "openclip": "cond_stage_model.model.",
    "sdxl": "conditioner.",
}


def text_prefix(cfg: ModelConfig) -> str:
    """Where the text encoder's weights are in a checkpoint (cond_stage_model.transformer. for SD1)."""
    return TEXT_PREFIX[cfg.text_encoder]


# The networks a pipeline loads and frees on their own, by the state-dict prefixes of their weights: the VAE's
# two halves are separate because txt2img never needs the encoder.
PARTS = {
    "text_encoder": ("cond_stage_model.", "conditioner."),
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
