"""booth.openclip (issue 13, item 1): OpenCLIP's text transformer under its own names loads an SDXL-layout state
dict with strict=True, and gives transformers' CLIPTextModelWithProjection's numbers on the weights diffusers'
own converter makes of it: the penultimate hidden state, with and without the final norm, and the pooled
projection."""

import pytest
import torch

from booth.config import CLIPConfig
from booth.openclip import OpenCLIPText

CFG = CLIPConfig(width=64, layers=3, heads=4, intermediate=256, act="gelu")
PREFIX = "conditioner.embedders.1.model."  # SDXL's second text encoder
PROJECTION = 48


@pytest.fixture(scope="module")
def models():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    gen = torch.Generator().manual_seed(0)
    ours = OpenCLIPText(CFG, PROJECTION)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in ours.state_dict().items()}
    state.update(
        {k: 1 + v for k, v in state.items() if k.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight"))}
    )
    ours.load_state_dict(state, strict=True)
    config = CLIPTextConfig(hidden_size=CFG.width, num_hidden_layers=CFG.layers, num_attention_heads=CFG.heads,
                            intermediate_size=CFG.intermediate, hidden_act="gelu", projection_dim=PROJECTION,
                            vocab_size=CFG.vocab_size, max_position_embeddings=77, eos_token_id=49407)  # fmt: skip
    theirs = CLIPTextModelWithProjection(config)
    converted = convert_open_clip_checkpoint(theirs, {PREFIX + k: v for k, v in state.items()}, prefix=PREFIX)
    missing, unexpected = theirs.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return ours.eval(), theirs.eval()


def ids(*lengths: int) -> torch.Tensor:
    """Rows of BOS, some words, EOS, then OpenCLIP's padding (0)."""
    rows = [[49406, *range(400, 400 + n), 49407] for n in lengths]
    return torch.tensor([r + [0] * (77 - len(r)) for r in rows])


def test_the_state_dict_has_openclips_names():
    names = set(OpenCLIPText(CFG, PROJECTION).state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
            "transformer.resblocks.2.mlp.c_fc.weight", "transformer.resblocks.2.mlp.c_proj.bias",
            "transformer.resblocks.1.ln_2.bias"} <= names  # fmt: skip


def test_hidden_states_and_pooled_equal_transformers(models):
    ours, theirs = models
    x = ids(3, 10, 0)
    with torch.no_grad():
        out = theirs(input_ids=x, output_hidden_states=True)
        penultimate = out.hidden_states[-2]
        torch.testing.assert_close(ours.hidden(x), penultimate, rtol=1e-5, atol=1e-5)  # SDXL
        torch.testing.assert_close(ours.hidden(x, final_norm=True), theirs.text_model.final_layer_norm(penultimate),
                                   rtol=1e-5, atol=1e-5)  # SD 2.x  # fmt: skip
        torch.testing.assert_close(ours.layers(x), out.hidden_states[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pooled(x), out.text_embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ours.pooled(x, eos=torch.tensor(49407)), out.text_embeds, rtol=1e-5, atol=1e-5
        )


def test_half_precision_runs_and_stays_close(models):
    ours, _ = models
    x = ids(5)
    with torch.no_grad():
        full = ours.hidden(x)
        half = OpenCLIPText(CFG, PROJECTION).to(torch.bfloat16)
        half.load_state_dict(ours.state_dict())
        assert torch.isfinite(half.hidden(x)).all()
        torch.testing.assert_close(half.hidden(x).float(), full, rtol=0.05, atol=0.05)
