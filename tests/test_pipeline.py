"""End to end: booth's pipeline and CLI give diffusers' images on the same weights, seeds and sampler."""

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, perturb_norms
from PIL import Image

from booth.checkpoint import read_checkpoint, save_checkpoint
from booth.cli import main
from booth.config import TINY
from booth.model import random_weights
from booth.options import SAMPLERS
from booth.pipeline import Settings, StableDiffusion

PROMPT, NEGATIVE = "a photo of a red circle on a blue background", "blurry"
SEED, STEPS = 1234, 10


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny weights as an fp16 .safetensors file, and the model they make once read back in fp32."""
    model = random_weights(TINY, seed=3)
    perturb_norms(model)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_checkpoint(model.state_dict(), path, dtype=torch.float16)
    fp32 = random_weights(TINY)
    fp32.load_state_dict({k: v.float() for k, v in read_checkpoint(path).state_dict.items()})
    return path, fp32.eval()


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    """diffusers' txt2img and img2img outputs (DDIM, SD1.5 config) for seeds SEED, SEED+1."""
    _, model = weights
    tmp = tmp_path_factory.mktemp("ref")
    gens = lambda: [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5)
    pipe = diffusers_pipeline(model, tmp / "tok")
    txt = pipe(
        **common, height=32, width=48, generator=gens(), num_images_per_prompt=2, output_type="np"
    ).images
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    pipe = diffusers_pipeline(model, tmp / "tok2", img2img=True)
    img = pipe(
        **common, image=init, strength=0.6, generator=gens(), num_images_per_prompt=2, output_type="np"
    ).images
    return txt, img, init


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def assert_same_images(ours, theirs):
    diff = np.abs(pixels(ours) - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, (
        f"max {diff.max() * 255:.1f}/255, mean {diff.mean():.2e}"
    )


def ddim(**kw):
    return Settings(steps=STEPS, sampler="ddim", schedule="uniform", scale=7.5, **kw)


def test_txt2img_matches_diffusers(weights, reference):
    sd = StableDiffusion(weights[1])
    images = sd.txt2img(PROMPT, NEGATIVE, seeds=[SEED, SEED + 1], settings=ddim(height=32, width=48))
    assert_same_images(images, reference[0])


def test_seed_does_not_depend_on_batch(weights, reference):
    sd = StableDiffusion(weights[1])
    second = sd.txt2img(PROMPT, NEGATIVE, seeds=[SEED + 1], settings=ddim(height=32, width=48))
    assert_same_images(second, reference[0][1:])


def test_img2img_matches_diffusers(weights, reference):
    sd = StableDiffusion(weights[1])
    _, theirs, init = reference
    images = sd.img2img(
        init, PROMPT, NEGATIVE, seeds=[SEED, SEED + 1], strength=0.6, settings=ddim(height=32, width=32)
    )
    assert_same_images(images, theirs)


def test_generate_latents_yields_each_step(weights):
    sd = StableDiffusion(weights[1])
    infos = list(sd.generate_latents(PROMPT, seeds=[0], settings=Settings(steps=6, height=16, width=16)))
    assert [i["i"] for i in infos[:-1]] == list(range(6)) and "latents" in infos[-1]
    assert infos[-1]["latents"].shape == (1, 4, 8, 8)


def save_formats(weights, tmp_path):
    """The same weights as .safetensors (fp16), .ckpt and a diffusers folder."""
    path, model = weights
    ckpt = tmp_path / "tiny.ckpt"
    sd16 = read_checkpoint(path).state_dict
    torch.save({"state_dict": sd16, "global_step": 7}, ckpt)
    folder = tmp_path / "diffusers"
    diffusers_pipeline(model, tmp_path / "tok").save_pretrained(folder, safe_serialization=True)
    return {"safetensors": path, "ckpt": ckpt, "diffusers": folder}


def read_run(out):
    run = out / "run0"
    return [Image.open(p) for p in sorted((run / "samples").glob("*.png"))]


def test_cli_every_format_gives_diffusers_images(weights, reference, tmp_path, capsys):
    args = ["-p", PROMPT, "-n", NEGATIVE, "--hw", "32", "48", "--steps", str(STEPS), "--sampler", "ddim",
            "--schedule", "uniform", "--seed", str(SEED), "-v", "2", "-b", "2", "-d", "cpu"]  # fmt: skip
    for name, path in save_formats(weights, tmp_path).items():
        out = tmp_path / f"out-{name}"
        assert main(["txt2img", "-c", str(path), "-o", str(out), *args]) == 0
        printed = capsys.readouterr().out.split()
        assert printed == [str(out / "run0" / "samples" / f"000{i}.png") for i in range(2)]
        assert_same_images(read_run(out), reference[0])


def test_cli_img2img_matches_diffusers(weights, reference, tmp_path):
    _, theirs, init = reference
    init.save(tmp_path / "init.png")
    args = ["-i", str(tmp_path / "init.png"), "-s", "0.6", "-p", PROMPT, "-n", NEGATIVE, "--steps", str(STEPS),
            "--sampler", "ddim", "--seed", str(SEED), "-v", "2", "-c", str(weights[0]), "--hw", "32", "32"]  # fmt: skip
    assert main(["img2img", "-o", str(tmp_path / "out"), *args]) == 0
    assert_same_images(read_run(tmp_path / "out"), theirs)


def test_ddim_without_a_schedule_gives_diffusers_ddim_images(weights, reference, tmp_path, capsys):
    """`automatic` picks each sampler's own schedule: ddim runs on the model's own timesteps, as diffusers does."""
    sd = StableDiffusion(weights[1])
    images = sd.txt2img(PROMPT, NEGATIVE, seeds=[SEED, SEED + 1], settings=Settings(steps=STEPS, sampler="ddim",
                                                                                     height=32, width=48))  # fmt: skip
    assert_same_images(images, reference[0])
    out = tmp_path / "out"
    assert main(["txt2img", "-c", str(weights[0]), "-o", str(out), "-p", PROMPT, "-n", NEGATIVE, "--hw", "32", "48",
                 "--steps", str(STEPS), "--sampler", "ddim", "--seed", str(SEED), "-v", "2", "-d", "cpu"]) == 0  # fmt: skip
    assert_same_images(read_run(out), reference[0])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_api_and_the_cli_give_the_same_image_for_every_sampler(weights, tmp_path, capsys, sampler):
    """The same defaults (schedule, eta) reach the sampler whichever way it is called."""
    sd = StableDiffusion.from_pretrained(str(weights[0]))
    api = sd.txt2img(PROMPT, NEGATIVE, seeds=[SEED], steps=4, sampler=sampler, height=16, width=24)
    out = tmp_path / "out"
    assert main(["txt2img", "-c", str(weights[0]), "-o", str(out), "-p", PROMPT, "-n", NEGATIVE, "--hw", "16", "24",
                 "--steps", "4", "--sampler", sampler, "--seed", str(SEED), "-d", "cpu"]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(api[0]), np.asarray(read_run(out)[0]))


def test_the_stochastic_samplers_draw_noise_through_the_api(weights):
    """euler_a and dpmpp_2m_sde default to eta 1 from the API as from the CLI (they were plain euler and
    dpmpp_2m there)."""
    sd = StableDiffusion(weights[1])
    run = lambda **kw: pixels(sd.txt2img(PROMPT, seeds=[SEED], steps=4, height=16, width=16, **kw))  # noqa: E731
    for noisy, plain in (("euler_a", "euler"), ("dpmpp_2m_sde", "dpmpp_2m")):
        assert np.array_equal(run(sampler=noisy), run(sampler=noisy, eta=1.0))
        assert not np.array_equal(run(sampler=noisy), run(sampler=noisy, eta=0.0))
        assert np.allclose(
            run(sampler=noisy, eta=0.0), run(sampler=plain, schedule="karras"), atol=1 / 255
        ), noisy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds=[-1]), "seed must be between 0 and"),
        (dict(seeds=[2**70]), "seed must be between 0 and"),
        (dict(seeds=[1.5]), "seed must be a whole number"),
        (dict(seeds="abc"), "seed must be a whole number"),
        (dict(seeds=[]), "at least one seed"),
        (dict(eta="a"), "--eta must be a finite number"),  # checked as given, even for a sampler with no eta
    ],
)
def test_the_api_checks_seeds_and_settings_as_the_cli_does(weights, kwargs, message):
    from booth.errors import BoothError

    sd = StableDiffusion(weights[1])
    with pytest.raises(BoothError, match=message):
        sd.txt2img(PROMPT, **{"seeds": [0], "steps": 1, "height": 16, "width": 16, **kwargs})


def test_img2img_takes_an_image_file_too(weights, reference, tmp_path):
    _, _, init = reference
    init.save(tmp_path / "init.png")
    sd = StableDiffusion(weights[1])
    run = lambda image: pixels(
        sd.img2img(image, PROMPT, seeds=[SEED], strength=0.6, steps=2, height=32, width=32)
    )  # noqa: E731
    assert np.array_equal(run(tmp_path / "init.png"), run(init))
    with pytest.raises(TypeError, match="a PIL image, an image file or a"):
        sd.img2img(None, PROMPT)
