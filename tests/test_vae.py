"""--vae (issue 13): a VAE of the user's choosing in place of the model's own, in every layout VAEs are shared in;
SDXL's VAE, which overflows in float16, runs in float32 beside an fp16 model."""

import numpy as np
import pytest
import torch
from helpers import diffusers_vae, dreambooth_argv, error_of, perturb_norms
from PIL import Image

from booth.checkpoint import read_checkpoint, read_safetensors, save_checkpoint
from booth.cli import main
from booth.config import TINY, TINY_SDXL
from booth.images import parse_infotext
from booth.model import random_weights
from booth.pipeline import StableDiffusion

IMG = ["-p", "a red circle", "--hw", "32", "32", "--steps", "2", "--seed", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, and another VAE for it saved as VAEs are shared: bare (A1111's .vae.safetensors), inside a
    whole model file, and as a diffusers VAE folder."""
    d = tmp_path_factory.mktemp("vae")
    model = random_weights(TINY, seed=1)
    save_checkpoint(model.state_dict(), d / "model.safetensors")
    other = random_weights(TINY, seed=2)
    perturb_norms(other.vae, seed=3)
    vae = {k: v for k, v in other.state_dict().items() if k.startswith("first_stage_model.")}
    save_checkpoint(
        {k.removeprefix("first_stage_model."): v for k, v in vae.items()}, d / "bare.vae.safetensors"
    )
    torch.save({"state_dict": {**vae, "model_loss.logvar": torch.zeros(())}}, d / "whole.ckpt")
    diffusers_vae(other).save_pretrained(d / "diffusers-vae")
    return d


def render(files, out, *extra):
    assert main(["txt2img", "-c", str(files / "model.safetensors"), *IMG, "-o", str(out), *extra]) == 0
    png = out / "run0" / "samples" / "0000.png"
    return np.asarray(Image.open(png), dtype=np.int16), parse_infotext(Image.open(png).info["parameters"])[2]


def test_a_vae_in_any_layout_replaces_the_models_own(files, tmp_path):
    own, params = render(files, tmp_path / "own")
    assert "VAE" not in params
    bare, params = render(files, tmp_path / "bare", "--vae", str(files / "bare.vae.safetensors"))
    assert params["VAE"] == "bare.vae.safetensors" and len(params["VAE hash"]) == 10
    assert np.abs(bare - own).max() > 10, "the other VAE decodes differently"
    for name in ("whole.ckpt", "diffusers-vae", "diffusers-vae/diffusion_pytorch_model.safetensors"):
        image, _ = render(files, tmp_path / name.replace("/", "-"), "--vae", str(files / name))
        assert np.abs(image - bare).max() <= 1, name


def test_a_vae_that_does_not_fit_is_refused_before_anything_is_made(files, tmp_path, capsys):
    wrong = tmp_path / "sdxl-sized.safetensors"
    save_checkpoint({k: v for k, v in random_weights(TINY_SDXL).state_dict().items() if "first_stage" not in k},
                    wrong)  # fmt: skip
    for vae, message in (
        (wrong, "is not a VAE for model (no first_stage_model."),
        (tmp_path / "missing.pt", "VAE not found"),
    ):
        assert main(["txt2img", "-c", str(files / "model.safetensors"), *IMG, "-o", str(tmp_path / "o"),
                     "--vae", str(vae)]) == 1  # fmt: skip
        assert message in error_of(capsys)
        assert not (tmp_path / "o").exists()


def test_dreambooth_trains_with_the_vae_given_and_its_checkpoints_keep_it(files, tmp_path):
    fast = ["--hw", "32", "32", "--class-img-count", "2", "--gb", "2", "--ddim-steps", "2", "--iterations", "1"]  # fmt: skip
    vae = files / "bare.vae.safetensors"
    assert main(dreambooth_argv(files / "model.safetensors", tmp_path, *fast, "--vae", str(vae))) == 0
    saved = read_checkpoint(tmp_path / "run0" / "ckpts" / "step-000001.safetensors").state_dict
    given = read_safetensors(vae)[0]["decoder.conv_in.weight"]
    assert torch.equal(saved["first_stage_model.decoder.conv_in.weight"].float(), given.half().float())


def test_sdxls_vae_runs_in_float32_beside_an_fp16_model_unless_one_is_given(tmp_path):
    model = random_weights(TINY_SDXL, seed=3)
    path = tmp_path / "xl.safetensors"
    save_checkpoint(model.state_dict(), path, config=TINY_SDXL, dtype=torch.float16)
    sd = StableDiffusion.from_pretrained(str(path), dtype=torch.float16)
    assert sd.vae_dtype == torch.float32
    sd.decode(torch.zeros(1, 4, 4, 4))
    assert next(sd.model.vae.decoder.parameters()).dtype == torch.float32
    vae = tmp_path / "fixed.safetensors"
    save_checkpoint({k: v for k, v in model.state_dict().items() if k.startswith("first_stage_model.")}, vae)
    given = StableDiffusion.from_pretrained(str(path), dtype=torch.float16, vae=str(vae))
    given.decode(torch.zeros(1, 4, 4, 4))
    assert (
        given.vae_dtype == torch.float16 and next(given.model.vae.decoder.parameters()).dtype == torch.float16
    )


def test_a_vae_that_overflows_in_float16_is_decoded_again_in_float32(tmp_path, capsys):
    """As AUTOMATIC1111 does: NaN pixels from an fp16 VAE are made again in fp32 (and fp32 is kept) rather than
    failing; the same weights are finite in fp32."""
    model = random_weights(TINY, seed=4)
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(3e4)  # activations past float16's 65504
    path = tmp_path / "big.safetensors"
    save_checkpoint(model.state_dict(), path, dtype=torch.float32)
    sd = StableDiffusion.from_pretrained(str(path), dtype=torch.float16)
    images = sd.decode(torch.ones(1, 4, 4, 4))
    assert "the VAE overflowed in float16, decoding in float32" in capsys.readouterr().err
    assert sd.vae_dtype == torch.float32 and images[0].size == (8, 8)
