"""Every command on SD 2.x and SDXL (issue 13), on the small configs of tests/helpers.py: img2img equals
diffusers' img2img pipelines; a DreamBooth LoRA run's checkpoints make a grid of the same images as each LoRA
alone, `booth merge` bakes one in to the same images, `booth evaluate` scores them; `booth convert` writes a
diffusers folder as the single file it came from."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DOG,
    TINY_SD2,
    diffusers_sd2_pipeline,
    diffusers_sdxl_pipeline,
    dreambooth_argv,
    saved_model,
)
from PIL import Image

from booth.checkpoint import read_safetensors
from booth.cli import main
from booth.config import TINY_SDXL
from booth.pipeline import Settings, StableDiffusion

PROMPT, NEGATIVE, SEED, STEPS = "a photo of a red circle on a blue background", "blurry", 7, 6
# the model's own size, small: grids, merges and evaluation render at it
FAMILIES = {"sd2": (dataclasses.replace(TINY_SD2, sample_size=32), 6),
            "sdxl": (dataclasses.replace(TINY_SDXL, sample_size=32), 11)}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    cfg, seed = FAMILIES[request.param]
    path, model = saved_model(cfg, seed, tmp_path_factory.mktemp(request.param) / "base.safetensors")
    return request.param, path, model


def diffusers_of(name: str, model, tmp: Path, img2img: bool = False):
    if name == "sd2":
        return diffusers_sd2_pipeline(model, tmp / "tok", img2img)
    pipe = diffusers_sdxl_pipeline(model, tmp / "tok")
    if img2img:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def test_diffusers_from_single_file_reads_booths_file_to_the_same_images(family, tmp_path):
    """The file booth writes is one diffusers' from_single_file reads (its configs from a local folder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name, path, model = family
    diffusers_of(name, model, tmp_path).save_pretrained(tmp_path / "config")
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(SEED)]
    theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                  height=32, width=48, generator=gens, output_type="np").images  # fmt: skip
    settings = Settings(steps=STEPS, sampler="ddim", schedule="uniform", scale=7.5, height=32, width=48)
    ours = pixels(StableDiffusion.from_pretrained(str(path)).txt2img(PROMPT, NEGATIVE, [SEED], settings))
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"


def test_a_long_prompt_is_encoded_in_chunks_by_each_encoder(family):
    """Past 75 tokens, each encoder (SDXL's both) encodes 77-token chunks on their own, side by side; SDXL's
    pooled embedding is the first chunk's."""
    from booth.model import encode_text, tokenize
    from booth.tokenizer import get_tokenizer

    _, _, model = family
    ids = tokenize(get_tokenizer(), model.config, [" ".join(["a red circle on a blue square"] * 20)])
    assert ids.shape[-1] == 154
    with torch.no_grad():
        whole = encode_text(model.text_encoder, ids)
        first, second = (encode_text(model.text_encoder, part) for part in (ids[..., :77], ids[..., 77:]))
    torch.testing.assert_close(whole["context"], torch.cat([first["context"], second["context"]], dim=1))
    assert not torch.equal(first["context"], second["context"])
    if "pooled" in whole:
        torch.testing.assert_close(whole["pooled"], first["pooled"])


def test_img2img_equals_diffusers(family, tmp_path):
    """SDXL's size conditioning follows the input image, as diffusers' StableDiffusionXLImg2ImgPipeline's."""
    name, path, model = family
    init = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    theirs = diffusers_of(name, model, tmp_path, img2img=True)(
        prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.6, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=gens, num_images_per_prompt=2, output_type="np",
    ).images  # fmt: skip
    sd = StableDiffusion.from_pretrained(str(path))
    settings = Settings(steps=STEPS, sampler="ddim", schedule="uniform", scale=7.5, height=32, width=48)
    ours = pixels(sd.img2img(init, PROMPT, NEGATIVE, seeds=[SEED, SEED + 1], strength=0.6, settings=settings))
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"


@pytest.fixture(scope="module")
def run(family, tmp_path_factory):
    """Two steps of DreamBooth LoRA (a checkpoint each), with prior preservation."""
    name, path, _ = family
    out = tmp_path_factory.mktemp(f"{name}-run")
    argv = dreambooth_argv(path, out, "--lora", "4", "--iterations", "2", "-s", "1", "--class-img-count", "2",
                           "--ddim-steps", "2", "--seed", "3", "--learning-rate", "1e-2")  # fmt: skip
    assert main(argv) == 0
    return out / "run0"


IMG = ["-p", "a sks dog", "--steps", "2", "--seed", "5", "--sampler", "ddim"]


def rendered(capsys, argv: list[str]) -> list[Path]:
    capsys.readouterr()
    assert main(argv) == 0
    return [Path(p) for p in capsys.readouterr().out.split()]


def test_the_grid_of_a_runs_checkpoints_shows_each_lora_alone_and_merge_bakes_one_in(
    family, run, tmp_path, capsys
):
    _, base, _ = family
    cells = rendered(capsys, ["txt2img", "-c", str(run / "ckpts"), *IMG, "-o", str(tmp_path / "grid")])
    assert [p.name for p in cells] == ["0000.png", "0000.png", "grid.png"]
    lora = run / "ckpts" / "step-000002.safetensors"
    alone = rendered(
        capsys, ["txt2img", "-c", str(base), "--lora", str(lora), *IMG, "-o", str(tmp_path / "a")]
    )
    assert Image.open(alone[0]).size == (32, 32), "the model's own size"
    assert Image.open(cells[1]).tobytes() == Image.open(alone[0]).tobytes()
    merged = tmp_path / "merged.safetensors"
    assert (
        main(["merge", "-m", str(base), "--lora", str(lora), "-o", str(merged), "--save-precision", "fp32"])
        == 0
    )
    baked = rendered(capsys, ["txt2img", "-c", str(merged), *IMG, "-o", str(tmp_path / "m")])
    diff = np.abs(pixels([Image.open(baked[0])]) - pixels([Image.open(alone[0])]))
    assert diff.max() <= 1 / 255, "merged weights give the image of the LoRA applied on the fly"
    assert not np.array_equal(pixels([Image.open(cells[0])]), pixels([Image.open(cells[1])])), (
        "training moved it"
    )


def test_evaluate_scores_the_base_and_each_checkpoint(run, tmp_path):
    """With random DINO and CLIP towers (the real ones cannot be downloaded here): every score is a number, and
    the renders are at the model's own size."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=16, image_size=224), add_pooling_layer=False).save_pretrained(tmp_path / "dino")  # fmt: skip
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           patch_size=32, image_size=224), projection_dim=16)).save_pretrained(tmp_path / "clip")  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a {} on the beach\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--subject-dir", str(DOG), "-c", "dog",
                 "--dino-model", str(tmp_path / "dino"), "--clip-model", str(tmp_path / "clip"), "--metric", "paper",
                 "--prompts", str(tmp_path / "prompts.txt"), "--images-per-prompt", "1", "--steps", "2",
                 "-o", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "metrics.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [0, 1, 2]
    for c in doc["checkpoints"]:
        assert all(math.isfinite(c[m]) for m in ("dino", "clip_i", "clip_t", "pres")), c
        assert Image.open(c["per_prompt"][0]["images"][0]).size == (32, 32)


def test_convert_writes_a_diffusers_folder_as_the_file_it_came_from(family, tmp_path):
    """SDXL bitwise; SD 2.x too, but for OpenCLIP's last layer and projection, which diffusers' SD 2.x folders
    lack (zeros in the file, so the layer passes its input through) and the conditioning never reaches."""
    name, path, model = family
    diffusers_of(name, model, tmp_path).save_pretrained(tmp_path / "folder")
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(tmp_path / "folder"), "-o", str(out), "--save-precision", "fp32"]) == 0
    ours, theirs = read_safetensors(out)[0], read_safetensors(path)[0]
    dropped = f"cond_stage_model.model.transformer.resblocks.{model.config.clip.layers - 1}."
    for key, value in theirs.items():
        if name == "sd2" and (key.startswith(dropped) or key.endswith("text_projection")):
            assert not ours[key].any(), key
        elif not key.endswith("logit_scale"):
            assert torch.equal(ours[key], value), key
    assert set(ours) == {k for k in theirs if not k.endswith("logit_scale")}
