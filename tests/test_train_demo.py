"""`booth train-demo`, the command that reproduces the shipped demo weights, run for a few steps: what it
writes, that the file describes itself, that the VAE stays frozen in stage 2, and that a run cut by Ctrl-C and
resumed ends with bitwise the same weights as one that never stopped."""

import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import interrupt_once_logged, read_jsonl

from booth.checkpoint import read_checkpoint
from booth.cli import main
from booth.data import prepare
from booth.demo import DEMO, SIZE, DemoRecipe
from booth.model import build
from booth.pipeline import StableDiffusion
from booth.shapes import draw, random_sample

UNET_STEPS = 20
FAST = ["--vae-steps", "4", "--unet-steps", str(UNET_STEPS), "--scenes", "64"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert main(["train-demo", "-o", str(out), *FAST]) == 0
    return out / "run0"


def final(run: Path) -> Path:
    return run / "unet" / "ckpts" / f"demo-{UNET_STEPS:06d}.safetensors"


def test_writes_a_model_that_loads_from_its_file_alone(whole):
    assert (whole / "recipe.yaml").is_file()
    vae_log = read_jsonl(whole / "vae" / "metrics.jsonl")
    unet_log = read_jsonl(whole / "unet" / "metrics.jsonl")
    assert [r["step"] for r in vae_log] == [1, 2, 3, 4] and {"reconstruction", "kl"} <= set(vae_log[0])
    assert [r["step"] for r in unet_log] == list(range(1, UNET_STEPS + 1))
    ckpt = read_checkpoint(final(whole))
    assert (ckpt.config.unet, ckpt.config.vae, ckpt.config.clip) == (DEMO.unet, DEMO.vae, DEMO.clip)
    assert all(v.dtype == torch.float16 for v in ckpt.state_dict.values())
    images = StableDiffusion.from_pretrained(str(final(whole))).txt2img("a red circle", seeds=[0, 1], steps=2)
    assert [im.size for im in images] == [(SIZE, SIZE)] * 2


def test_stage_two_keeps_the_vae_and_trains_the_text_encoder(whole):
    vae = read_checkpoint(whole / "vae" / "ckpts" / "vae-000004.safetensors").state_dict
    model = read_checkpoint(final(whole)).state_dict
    assert vae and all(torch.equal(v.half(), model[k]) for k, v in vae.items())
    torch.manual_seed(DemoRecipe().seed + 1)  # the initialisation stage 2 starts from
    init = build(DEMO, device="cpu").state_dict()
    text = [k for k in model if k.startswith("cond_stage_model.") and k.endswith(".weight")]
    changed = [k for k in text if not torch.equal(init[k].half(), model[k])]
    assert len(changed) > len(text) // 2, "the text encoder should train alongside the UNet"


def test_latents_are_scaled_to_the_recipe_std(whole):
    sd = StableDiffusion.from_checkpoint(read_checkpoint(final(whole)))  # the whole model in memory
    rng = random.Random(123)
    x = torch.stack([prepare(draw(random_sample(rng), SIZE), (SIZE, SIZE)) for _ in range(64)])
    with torch.no_grad():
        mean, _ = sd.model.vae.float().encode(x)
    std = float(mean.std()) * sd.model.config.scale_factor
    assert abs(std - DemoRecipe().latent_std) < 0.15 * DemoRecipe().latent_std, std


def test_ctrl_c_then_resume_gives_bitwise_the_same_model(whole, tmp_path):
    cmd = [sys.executable, "-m", "booth", "train-demo", "-o", str(tmp_path), *FAST]
    code, err = interrupt_once_logged(cmd, tmp_path / "run0" / "unet" / "metrics.jsonl")
    assert code == 130, err
    assert "continue with: booth train-demo -r" in err and "Traceback" not in err
    cut = tmp_path / "run0"
    assert 3 <= len(read_jsonl(cut / "unet" / "metrics.jsonl")) < UNET_STEPS
    assert main(["train-demo", "-r", str(cut)]) == 0
    a, b = (read_checkpoint(final(r)).state_dict for r in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_jsonl(cut / "unet" / "metrics.jsonl")] == [
        r["loss"] for r in read_jsonl(whole / "unet" / "metrics.jsonl")
    ]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--unet-steps", "0"], "--unet-steps"),
        (["--scenes", "0"], "--scenes"),
        (["-r", "."], "not a train-demo run"),
        (["-r", "bad-recipe"], "recipe.yaml"),
    ],
)
def test_bad_arguments_give_one_line(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad-recipe").mkdir()  # a run written by another version, or edited by hand
    (tmp_path / "bad-recipe" / "recipe.yaml").write_text("seed: 0\nunet_stpes: 10\n")
    assert main(["train-demo", "-o", str(tmp_path / "out"), *args]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("booth: error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()
