"""Our text encoder, UNet and VAE against transformers/diffusers on the same random weights."""

import dataclasses

import pytest
import torch
from helpers import diffusers_unet, diffusers_vae, perturb_norms, transformers_clip

from booth.config import SD1, TINY
from booth.model import encode_text, random_weights

FEW_GROUPS = dataclasses.replace(  # small models (the demo) use fewer GroupNorm groups
    TINY, unet=dataclasses.replace(TINY.unet, norm_groups=8), vae=dataclasses.replace(TINY.vae, norm_groups=8)
)


@pytest.fixture(scope="module", params=[TINY, FEW_GROUPS], ids=["tiny", "tiny-8-groups"])
def tiny(request):
    model = random_weights(request.param, seed=0).eval()
    perturb_norms(model)
    return model


def close(a, b, tol=1e-4):
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= tol * scale, f"max diff {(a - b).abs().max()} (scale {scale})"


def check_unet(model, size=8, batch=2, seq=77):
    torch.manual_seed(1)
    x = torch.randn(batch, 4, size, size)
    t = torch.tensor([999.0, 17.5])[:batch]
    ctx = torch.randn(batch, seq, model.config.unet.context_dim)
    ref = diffusers_unet(model)
    with torch.no_grad():
        close(model.unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)


def check_vae(model, size=32):
    torch.manual_seed(2)
    img = torch.rand(1, 3, size, size) * 2 - 1
    ref = diffusers_vae(model)
    with torch.no_grad():
        mean, logvar = model.vae.encode(img)
        post = ref.encode(img).latent_dist
        close(mean, post.mean)
        close(logvar, post.logvar)
        z = torch.randn_like(mean)
        close(model.vae.decode(z), ref.decode(z).sample)


def check_clip(model):
    ids = torch.randint(0, model.config.clip.vocab_size, (2, 77))
    ref = transformers_clip(model)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        close(model.text_encoder(ids), out.last_hidden_state)
        # clip skip 2: penultimate layer, then the final norm
        final_norm = getattr(ref, "text_model", ref).final_layer_norm  # transformers 5 flattened it
        skip2 = final_norm(out.hidden_states[-2])
        close(model.text_encoder(ids, clip_skip=2), skip2)


def test_unet_matches_diffusers(tiny):
    check_unet(tiny)


def test_unet_odd_latent_size_matches_diffusers(tiny):
    check_unet(tiny, size=9, batch=1)


# SD 2.x's UNet (issue 13): linear proj_in/proj_out and heads of a fixed width (64 in SD 2.x, 16 here), so each
# level has its own head count (2 and 4 here), as diffusers builds it from the CompVis config
SD2_LIKE = dataclasses.replace(
    TINY,
    unet=dataclasses.replace(
        TINY.unet, num_head_channels=16, linear_proj=True, transformer_depth=2, attention_resolutions=(1, 2)
    ),
)


def test_an_sd2_unet_matches_diffusers():
    model = random_weights(SD2_LIKE, seed=4).eval()
    perturb_norms(model)
    assert model.unet.state_dict()["input_blocks.1.1.proj_in.weight"].ndim == 2, (
        "linear, as SD 2.x files store it"
    )
    assert model.unet.input_blocks[1][1].transformer_blocks[0].attn1.heads == 2
    assert model.unet.middle_block[1].transformer_blocks[0].attn1.heads == 4
    check_unet(model)
    check_unet(model, size=9, batch=1)


def test_vae_matches_diffusers(tiny):
    check_vae(tiny)


def test_clip_matches_transformers(tiny):
    check_clip(tiny)


def test_chunked_encoding_is_per_chunk(tiny):
    ids = torch.randint(0, 49408, (2, 154))
    with torch.no_grad():
        both = encode_text(tiny.text_encoder, ids)["context"]
        assert both.shape == (2, 154, 128)
        close(both[:, 77:], tiny.text_encoder(ids[:, 77:]))


def test_sd1_shapes_and_parameter_counts():
    from booth.model import build

    m = build(SD1)  # meta device: no memory
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert count(m.unet) == 859_520_964
    assert round(count(m.vae.encoder) / 1e6, 2) == 34.16
    assert round(count(m.vae.decoder) / 1e6, 2) == 49.49
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.slow
def test_full_sd1_matches_references():
    model = random_weights(SD1, seed=0).eval()
    check_clip(model)
    check_unet(model, size=8, batch=1)
    check_vae(model, size=16)


def test_an_sd2_unet_config_is_read_from_shapes_and_from_diffusers_config():
    """Single files: linear projections from proj_in's shape, 64-channel heads for 1024-wide text (as ComfyUI
    and the CompVis configs); diffusers: the per-level head counts of SD 2.x's config."""
    from booth.checkpoint import _diffusers_unet, _infer_unet
    from booth.unet import UNetModel

    sd2 = dataclasses.replace(SD1.unet, context_dim=1024, num_head_channels=64, linear_proj=True)
    with torch.device("meta"):
        state = {"model.diffusion_model." + k: v for k, v in UNetModel(sd2).state_dict().items()}
    assert _infer_unet(state) == sd2
    assert _infer_unet({k: v for k, v in state.items()}).heads(1280) == 20
    sd2_config = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
                  "use_linear_projection": True, "cross_attention_dim": 1024,
                  "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}  # fmt: skip
    assert _diffusers_unet(sd2_config) == sd2
    sd1_list = {**sd2_config, "attention_head_dim": [8, 8, 8, 8], "use_linear_projection": False,
                "cross_attention_dim": 768}  # fmt: skip
    assert _diffusers_unet(sd1_list) == SD1.unet, "a list of head counts without linear projections is SD1's"
