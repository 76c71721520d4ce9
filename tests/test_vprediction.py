"""v-prediction (issue 13, item 3): every sampler through the v denoiser solves the closed-form Gaussian case;
booth's images of a v model equal diffusers' (with and without CFG rescale); a v model is recognised from what
it carries; DreamBooth trains it on the v target."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, error_of, perturb_norms
from safetensors.torch import save_file
from test_sampling import DETERMINISTIC, MU, SCHEDULE, STD, exact_flow, gaussian_denoiser, karras_no_zero

from booth import sampling as S
from booth import train
from booth.checkpoint import read_checkpoint, read_config, save_checkpoint
from booth.cli import main
from booth.config import TINY
from booth.model import random_weights
from booth.options import Noise
from booth.pipeline import Settings, StableDiffusion

PROMPT, NEGATIVE, SEED, STEPS = "a photo of a red circle on a blue background", "blurry", 1234, 10


def exact_v_model(x_vp, t, **cond):
    """The exact v = alpha * eps - sigma_vp * x0 for Gaussian data, from the definitions alone: x_vp = alpha * x0 +
    sigma_vp * eps with alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma * alpha (sigma from the timestep)."""
    sigma = SCHEDULE.t_to_sigma(t).double()
    s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
    alpha = (1 + s**2) ** -0.5
    x = x_vp.double() / alpha  # the VE latent x0 + sigma * eps
    x0 = gaussian_denoiser(x, sigma)
    eps = (x - x0) / s
    return (alpha * eps - s * alpha * x0).float()


def test_the_v_denoiser_gives_the_exact_denoiser():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([SCHEDULE.sigmas[10].item(), 1.7, 14.0])
    ours = S.VDenoiser(exact_v_model, SCHEDULE)(x, sigma)
    torch.testing.assert_close(ours, gaussian_denoiser(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_sampler_solves_the_gaussian_flow_through_the_v_denoiser(name):
    sigmas = karras_no_zero(40)
    z = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    x = MU + math.sqrt(STD**2 + float(sigmas[0]) ** 2) * z
    exact = exact_flow(x, float(sigmas[0]), float(sigmas[-1]))
    out = S.SAMPLERS[name](S.VDenoiser(exact_v_model, SCHEDULE), x, sigmas)
    assert float((out - exact).abs().max() / (exact - MU).abs().max()) < 0.05
    direct = S.SAMPLERS[name](gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(out, direct.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde"])
def test_stochastic_samplers_reach_the_data_marginal_through_the_v_denoiser(name):
    sigmas = S.get_sigmas_karras(100, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    gen = torch.Generator().manual_seed(1)
    x = MU + math.sqrt(STD**2 + float(sigmas[0]) ** 2) * S.randn((1, 100_000), gen)
    out = S.SAMPLERS[name](S.VDenoiser(exact_v_model, SCHEDULE), x, sigmas, generator=gen)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() / STD - 1) < 0.04


def test_cfg_rescale_is_diffusers_rescale_noise_cfg_on_the_v_output():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    gen = torch.Generator().manual_seed(0)
    v_cond, v_uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.8, 5.0])
    cond, uncond = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)

    def model(x_vp, t, context):  # one batched call, the unconditional half first
        assert len(x_vp) == 4 and (context[:2] == 0).all() and (context[2:] == 1).all()
        return torch.cat([v_uncond, v_cond])

    v = S.VDenoiser(model, SCHEDULE)
    ours = S.CFGDenoiser(v, cond, uncond, 7.5, rescale=0.7)(x, sigma)
    guided = rescale_noise_cfg(v_uncond + 7.5 * (v_cond - v_uncond), v_cond, guidance_rescale=0.7)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ours, x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * guided, rtol=1e-4, atol=1e-4)
    plain = S.CFGDenoiser(v, cond, uncond, 7.5)(x, sigma)
    assert (ours - plain).abs().max() > 1e-3, "the rescale changes something"


@pytest.fixture(scope="module")
def v_weights(tmp_path_factory):
    """Random tiny weights, as a file marked v by a `v_pred` key, and the fp32 model they make."""
    model = random_weights(TINY, seed=5)
    perturb_norms(model)
    tmp = tmp_path_factory.mktemp("v")
    plain = tmp / "tiny.safetensors"
    save_checkpoint(model.state_dict(), plain, dtype=torch.float32)
    marked = tmp / "tiny-v.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**tensors, "v_pred": torch.tensor([])}, str(marked))
    return plain, marked, model.eval()


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_a_v_model_gives_diffusers_images(v_weights, tmp_path, rescale):
    from diffusers import DDIMScheduler

    _, marked, model = v_weights
    pipe = diffusers_pipeline(model, tmp_path / "tok")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=32,
                  width=48, generator=gens, num_images_per_prompt=2, output_type="np",
                  guidance_rescale=rescale).images  # fmt: skip
    sd = StableDiffusion.from_pretrained(str(marked))
    assert sd.config.prediction == "v", "the v_pred key says so"
    settings = Settings(
        steps=STEPS, sampler="ddim", schedule="uniform", height=32, width=48, cfg_rescale=rescale
    )
    ours = np.stack(
        [
            np.asarray(im, dtype=np.float32) / 255
            for im in sd.txt2img(PROMPT, NEGATIVE, [SEED, SEED + 1], settings)
        ]
    )
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"
    eps = sd.txt2img(PROMPT, NEGATIVE, [SEED], Settings(steps=STEPS, sampler="ddim", schedule="uniform", height=32,
                                                        width=48, prediction="eps"))[0]  # fmt: skip
    assert np.abs(np.asarray(eps, dtype=np.float32) / 255 - theirs[0]).max() > 0.05, "--prediction overrides"


def test_the_prediction_is_read_from_what_the_model_carries(v_weights, tmp_path):
    plain, marked, model = v_weights
    assert read_config(plain).prediction == "eps" and read_config(marked).prediction == "v"
    assert read_checkpoint(marked).config.prediction == "v"
    folder = tmp_path / "diffusers"
    pipe = diffusers_pipeline(model, tmp_path / "tok")
    pipe.save_pretrained(folder, safe_serialization=True)
    assert read_config(folder).prediction == "eps"
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    assert read_config(folder).prediction == "v" and not read_config(folder).zero_snr
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_betas_zero_snr": True}))
    assert read_config(folder).zero_snr
    # booth's own files record it in their header (a v model saved by booth stays one)
    ckpt = read_checkpoint(marked)
    out = tmp_path / "saved.safetensors"
    save_checkpoint(ckpt.state_dict, out, config=ckpt.config)
    assert read_config(out).prediction == "v"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(Exception, match="predicts 'sample'"):
        read_config(folder)


def test_the_png_metadata_shows_the_prediction(v_weights, tmp_path, capsys):
    from PIL import Image

    _, marked, _ = v_weights
    args = ["txt2img", "-c", str(marked), "-p", PROMPT, "--hw", "32", "32", "--steps", "2", "--seed", "1",
            "-o", str(tmp_path), "--cfg-rescale", "0.7"]  # fmt: skip
    assert main(args) == 0
    text = Image.open(tmp_path / "run0" / "samples" / "0000.png").text["parameters"]
    assert "Prediction: v" in text and "CFG rescale: 0.7" in text
    assert main([*args[:-2], "--cfg-rescale", "2"]) != 0
    assert "--cfg-rescale must be between 0 and 1" in error_of(capsys)


def test_dreambooth_trains_a_v_model_on_the_v_target():
    """diffusion_loss's target for a v model is sqrt(a) * noise - sqrt(1 - a) * x0 (a = alphas_cumprod[t]): a
    UNet that outputs exactly that has zero loss, and one that outputs the noise does not."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    alphas = SCHEDULE.alphas_cumprod
    seeds = [11, 12]

    def drawn():  # the noise and timesteps diffusion_loss draws from these generators
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = S.randn(x0.shape, gens)
        t = torch.cat([torch.randint(0, len(alphas), (1,), generator=g) for g in gens])
        return noise, t

    noise, t = drawn()
    a = alphas[t].view(-1, 1, 1, 1)
    v_target = a.sqrt() * noise - (1 - a).sqrt() * x0
    oracle = lambda noisy, tt, context: v_target  # noqa: E731
    context = torch.zeros(2, 3, 4)
    loss = lambda unet, prediction: train.diffusion_loss(  # noqa: E731
        Noise(), x0, [torch.Generator().manual_seed(s) for s in seeds], context, 2, unet, alphas,
        torch.autocast("cpu", enabled=False), 1.0, prediction,
    )[0]  # fmt: skip
    assert loss(oracle, "v").item() == 0.0
    assert loss(oracle, "eps").item() > 0.1
    assert loss(lambda noisy, tt, context: noise, "eps").item() == 0.0


def test_min_snr_weights_for_v_are_diffusers():
    """diffusers' train_dreambooth: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v_prediction."""
    ac = SCHEDULE.alphas_cumprod[torch.tensor([5, 300, 900])]
    snr = ac / (1 - ac)
    torch.testing.assert_close(train.min_snr_weights(ac, 5.0, "v"), torch.clamp(snr, max=5.0) / (snr + 1))
    torch.testing.assert_close(train.min_snr_weights(ac, 5.0), torch.clamp(snr, max=5.0) / snr)


# ----------------------------------------------------------------------------- zero terminal SNR


def test_the_zero_terminal_snr_schedule_is_diffusers():
    """Lin et al.'s Algorithm 1 on SD's betas equals diffusers' rescale_zero_terminal_snr; the last timestep is
    pure noise for training, and the samplers' last sigma is diffusers' finite stand-in (alphas_cumprod 2**-24)."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(S.zero_terminal_snr(betas), rescale_zero_terminal_snr(betas), rtol=0, atol=0)
    schedule = S.DiscreteSchedule(zero_snr=True)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.alphas_cumprod[0] == SCHEDULE.alphas_cumprod[0]
    assert schedule.sigma_max == pytest.approx(4096, rel=1e-4) and torch.isfinite(schedule.sigmas).all()


def test_a_zero_snr_v_model_gives_diffusers_images(v_weights, tmp_path):
    """Euler on Karras sigmas from the terminal timestep (sigma 4096), with diffusers' EulerDiscreteScheduler
    (rescale_betas_zero_snr, Karras sigmas from timestep 999) as the reference; the ztsnr key marks such a model, --no-zero-snr overrides it."""
    from diffusers import EulerDiscreteScheduler

    _, _, model = v_weights
    pipe = diffusers_pipeline(model, tmp_path / "tok")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                                        rescale_betas_zero_snr=True, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")  # fmt: skip
    gens = [torch.Generator().manual_seed(SEED)]
    theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=32,
                  width=32, generator=gens, output_type="np").images[0]  # fmt: skip
    marked = tmp_path / "ztsnr.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**tensors, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked))
    sd = StableDiffusion.from_pretrained(str(marked))
    assert sd.config.zero_snr and sd.config.prediction == "v"
    settings = Settings(steps=STEPS, sampler="euler", schedule="karras", height=32, width=32)
    ours = np.asarray(sd.txt2img(PROMPT, NEGATIVE, [SEED], settings)[0], dtype=np.float32) / 255
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"
    plain = sd.txt2img(PROMPT, NEGATIVE, [SEED], Settings(steps=STEPS, sampler="euler", schedule="karras",
                                                          height=32, width=32, zero_snr=False))[0]  # fmt: skip
    assert np.abs(np.asarray(plain, dtype=np.float32) / 255 - theirs).max() > 0.05, "--no-zero-snr overrides"


def test_zero_snr_is_refused_for_an_eps_model_and_shown_in_the_png(v_weights, tmp_path, capsys):
    from PIL import Image

    plain, marked, _ = v_weights
    args = ["txt2img", "-p", PROMPT, "--hw", "32", "32", "--steps", "2", "--seed", "1", "--zero-snr"]
    assert main([*args, "-c", str(plain), "-o", str(tmp_path / "eps")]) == 1
    assert "--zero-snr needs a v-prediction model" in error_of(capsys)
    assert not (tmp_path / "eps").exists()
    assert main([*args, "-c", str(marked), "-o", str(tmp_path / "v")]) == 0
    text = Image.open(tmp_path / "v" / "run0" / "samples" / "0000.png").text["parameters"]
    assert "Noise schedule: Zero Terminal SNR" in text
