"""booth convert: any model booth loads, written as one single file in the original layout, holding exactly the
weights (in the precision asked for) and read by diffusers' own from_single_file."""

import re

import pytest
import torch
from helpers import diffusers_pipeline, error_of, perturb_norms

from booth.checkpoint import read_checkpoint, read_config
from booth.cli import main
from booth.config import TINY
from booth.model import random_weights


@pytest.fixture(scope="module")
def model():
    m = random_weights(TINY, seed=9)
    perturb_norms(m)
    return m.eval()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    diffusers_pipeline(model, tmp / "tok").save_pretrained(tmp / "diffusers", safe_serialization=True)
    return tmp / "diffusers"


def test_a_diffusers_folder_becomes_a_single_file_with_the_same_weights(model, folder, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), "-o", str(out), "--save-precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ckpt = read_checkpoint(out)
    want = model.state_dict()
    assert ckpt.state_dict.keys() == want.keys() and ckpt.config == TINY == read_config(out)
    assert all(torch.equal(ckpt.state_dict[k], want[k]) for k in want)
    assert ckpt.metadata["booth.source"] == str(folder)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(folder), "-o", str(half)]) == 0
    state = read_checkpoint(half).state_dict
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(state[k], want[k].half()) for k in want if want[k].is_floating_point())


def test_diffusers_from_single_file_reads_the_converted_file(folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), "-o", str(out), "--save-precision", "fp32"]) == 0
    theirs = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(theirs, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name


def test_a_ckpt_converts_and_keeps_its_ema_choice(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): v + 1
        for k, v in state.items()
        if k.startswith("model.")
    }
    torch.save({"state_dict": {**state, **ema}}, tmp_path / "m.ckpt")
    out = tmp_path / "ema.safetensors"
    assert (
        main(["convert", str(tmp_path / "m.ckpt"), "-o", str(out), "--ema", "--save-precision", "fp32"]) == 0
    )
    got = read_checkpoint(out).state_dict
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(got[k], state[k] + 1) for k in unet), "the EMA UNet weights"
    assert all(torch.equal(got[k], state[k]) for k in state if k not in unet)


def test_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys):
    (tmp_path / "there.safetensors").write_bytes(b"keep")
    cases = [
        ([str(folder), "-o", str(tmp_path / "x.ckpt")], "--output must be a .safetensors file"),
        ([str(folder), "-o", str(tmp_path / "there.safetensors")], "exists; give --force"),
        ([str(tmp_path / "nothing"), "-o", str(tmp_path / "y.safetensors")], "nothing"),
        ([str(folder), "-o", str(tmp_path / "z.safetensors"), "--save-precision", "fp8"], "invalid choice"),
    ]
    for args, message in cases:
        try:
            code = main(["convert", *args])
        except SystemExit as e:  # argparse's own errors (an invalid choice) exit from the parser
            code = e.code
        assert code != 0
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
    assert (tmp_path / "there.safetensors").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.safetensors"]
    there = tmp_path / "there.safetensors"
    assert main(["convert", str(there), "-o", str(there), "--force"]) != 0
    assert "one of the conversion's inputs" in error_of(capsys)
    assert there.read_bytes() == b"keep"
