"""Full-size SD 2.x and SDXL on random weights, output for output against diffusers and transformers (issue 13):
the UNets, the VAE and every text encoder, at their published shapes.

An SDXL UNet is 10.3 GB in fp32, so the frameworks run one at a time: booth's UNet runs, is written to disk and
freed, and diffusers' is built on the meta device and given the file's tensors. The whole file needs about
12 GB of memory and some minutes on 2 cores, more than CI's budget holds, so it runs only when asked:

    BOOTH_FULL_SIZE=1 python -m pytest tests/test_full_size.py
"""

import gc
import os

import pytest
import safetensors.torch
import torch
from helpers import (
    ldm_original_config,
    perturb_norms,
    transformers_clip,
    transformers_openclip,
    transformers_sd2_text,
)
from test_models import check_vae, close

from booth.config import SD2, SDXL
from booth.model import build, unet_inputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("BOOTH_FULL_SIZE"), reason="full size: BOOTH_FULL_SIZE=1 runs it"),
]


def materialized(cfg, parts: tuple[str, ...], seed: int = 0):
    """The model on the meta device, with `parts` (attribute paths) built on the CPU with PyTorch's default
    initialisation (norms perturbed), so that only what a test compares takes memory."""
    model = build(cfg)
    torch.manual_seed(seed)
    for path in parts:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        meta = getattr(owner, name)
        with torch.device("cpu"):
            real = type(meta)(*_arguments(cfg, path))
        perturb_norms(real, seed)
        setattr(owner, name, real.eval())
    return model


def _arguments(cfg, path: str) -> tuple:
    if path.endswith("diffusion_model"):
        return (cfg.unet,)
    if path == "first_stage_model":
        return (cfg.vae,)
    if path == "conditioner":
        return (cfg,)
    return (cfg.clip, cfg.clip.projection)  # SD 2.x's OpenCLIP ViT-H


def unet_against_diffusers(model, tmp_path, cond: dict, diffusers_kwargs: dict) -> None:
    """booth's UNet output, then diffusers' from the same tensors through a file, one framework at a time."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 24, 32, generator=g), torch.tensor([981.0])
    with torch.no_grad():
        ours = model.unet(x, t, **cond)
    path = tmp_path / "unet.safetensors"
    safetensors.torch.save_file(
        {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}, path
    )
    config = model.config
    model.model.diffusion_model = None
    gc.collect()
    sd = safetensors.torch.load_file(path)
    unet_config = create_unet_diffusers_config_from_ldm(
        ldm_original_config(config), sd, image_size=config.sample_size
    )
    if config.unet.adm_in_channels:
        unet_config.update(
            addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None
        )
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_config), strict=True, assign=True)
    del sd
    with torch.no_grad():
        ref = theirs.eval()(x, t, **diffusers_kwargs).sample
    close(ours, ref, 1e-4)


def test_the_full_size_sdxl_unet_equals_diffusers(tmp_path):
    model = materialized(SDXL, ("model.diffusion_model",))
    assert round(sum(p.numel() for p in model.unet.parameters()) / 1e9, 2) == 2.57
    g = torch.Generator().manual_seed(1)
    context, pooled, size = (
        torch.randn(1, 77, 2048, generator=g),
        torch.randn(1, 1280, generator=g),
        (1024, 1024),
    )
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32)
    unet_against_diffusers(model, tmp_path, unet_inputs({"context": context, "pooled": pooled}, size),
                           dict(encoder_hidden_states=context,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}))  # fmt: skip


def test_the_full_size_sdxl_vae_and_text_encoders_equal_diffusers_and_transformers():
    """CLIP-L's penultimate layer and bigG's (both as SDXL conditions on them), bigG's pooled projection, and
    the VAE both ways."""
    model = materialized(SDXL, ("conditioner", "first_stage_model"))
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 49407  # an end token, where bigG's pooled embedding is read
    with torch.no_grad():
        context, pooled = model.text_encoder(torch.stack([ids, ids], dim=1))
        clip_l = transformers_clip(model, "conditioner.embedders.0.transformer.text_model.")
        first = clip_l(ids, output_hidden_states=True).hidden_states[-2]
        del clip_l
        big_g = transformers_openclip(model)
        out = big_g(ids, output_hidden_states=True)
    close(context, torch.cat([first, out.hidden_states[-2]], dim=-1))
    close(pooled, out.text_embeds)
    del big_g, out
    model.conditioner = None
    gc.collect()
    check_vae(model, size=64)


def test_the_full_size_sd2_unet_and_text_encoder_equal_diffusers_and_transformers(tmp_path):
    """SD 2.x's UNet (linear projections, 64-channel heads) and OpenCLIP ViT-H's penultimate layer through the
    final norm, which diffusers' SD 2.x text encoder (one layer less) gives as its last hidden state."""
    model = materialized(SD2, ("cond_stage_model.model", "model.diffusion_model"))
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.text_encoder(ids)
        close(ours, transformers_sd2_text(model)(ids).last_hidden_state)
    context = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(4))
    unet_against_diffusers(model, tmp_path, {"context": context}, dict(encoder_hidden_states=context))
