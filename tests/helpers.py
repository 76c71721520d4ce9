"""Oracles: turn booth weights into diffusers/transformers models with *their* converters."""

from __future__ import annotations

import torch

from booth.config import ModelConfig
from booth.model import LatentDiffusion


def ldm_original_config(cfg: ModelConfig) -> dict:
    """The `v1-inference.yaml` structure diffusers' single-file converters read."""
    u, v = cfg.unet, cfg.vae
    unet = dict(
        image_size=32, in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
        attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
        channel_mult=list(u.channel_mult), num_heads=u.num_heads, transformer_depth=u.transformer_depth,
        context_dim=u.context_dim, use_linear_in_transformer=False,
    )  # fmt: skip
    ddconfig = dict(
        double_z=True, z_channels=v.z_channels, resolution=256, in_channels=v.in_channels, out_ch=v.out_ch,
        ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, attn_resolutions=[], dropout=0.0,
    )  # fmt: skip
    return {
        "model": {
            "params": {
                "scale_factor": cfg.scale_factor,
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
            }
        }
    }


def diffusers_unet(model: LatentDiffusion):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
    config = create_unet_diffusers_config_from_ldm(ldm_original_config(model.config), sd, image_size=256)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    return unet.eval()


def diffusers_vae(model: LatentDiffusion):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    sd = {k: v for k, v in model.state_dict().items() if k.startswith("first_stage_model.")}
    config = create_vae_diffusers_config_from_ldm(ldm_original_config(model.config), sd, image_size=256)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae.eval()


def transformers_clip(model: LatentDiffusion):
    from transformers import CLIPTextConfig, CLIPTextModel

    c = model.config.clip
    config = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_positions, hidden_act=c.act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    clip = CLIPTextModel(config)
    prefix = "cond_stage_model.transformer.text_model."
    sd = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    theirs = clip.state_dict()
    if any(k.startswith("text_model.") for k in theirs):  # transformers < 5 keeps a text_model. level
        sd = {"text_model." + k: v for k, v in sd.items()}
    sd.update({k: v for k, v in theirs.items() if k.endswith("position_ids")})
    clip.load_state_dict(sd, strict=True)
    return clip.eval()


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Default init leaves norms at 1/0 and some layers zero; randomise them so parity tests see every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or p.abs().sum() == 0:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
