"""Oracles: turn booth weights into diffusers/transformers models with *their* converters."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from booth.config import TINY, CLIPConfig, ModelConfig
from booth.model import LatentDiffusion


def ldm_original_config(cfg: ModelConfig) -> dict:
    """The `v1-inference.yaml` structure diffusers' single-file converters read."""
    u, v = cfg.unet, cfg.vae
    unet = dict(
        image_size=32, in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
        attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
        channel_mult=list(u.channel_mult), context_dim=u.context_dim, use_linear_in_transformer=u.linear_proj,
        transformer_depth=u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth),
    )  # fmt: skip
    if u.adm_in_channels:  # SDXL's label_emb, as sd_xl_base.yaml says it
        unet.update(num_classes="sequential", adm_in_channels=u.adm_in_channels)
    # as the CompVis configs say it: SD1 a head count, SD 2.x a head width (diffusers then derives the counts)
    if u.num_head_channels:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
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
    config = create_unet_diffusers_config_from_ldm(
        ldm_original_config(model.config), sd, image_size=model.config.sample_size
    )  # its sample_size, in pixels
    config["norm_num_groups"] = model.config.unet.norm_groups
    if model.config.unet.adm_in_channels:  # diffusers knows SDXL only by its full-size 2048-wide context
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
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
    config["norm_num_groups"] = model.config.vae.norm_groups
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae.eval()


def transformers_clip(model: LatentDiffusion, prefix: str = "cond_stage_model.transformer.text_model."):
    from transformers import CLIPTextConfig, CLIPTextModel

    c = model.config.clip
    config = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_positions, hidden_act=c.act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    clip = CLIPTextModel(config)
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, written out independently of booth's."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def clip_merges() -> list[str]:
    import gzip

    from booth.tokenizer import _DEFAULT_BPE

    with gzip.open(_DEFAULT_BPE, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[1:48895]  # line 0 is a header; CLIP used 48,894 merges


def clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary derived from the shipped merges file (what openai/clip-vit-large-patch14 ships)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in clip_merges()]
    return {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}


def write_clip_tokenizer(folder) -> None:
    """vocab.json + merges.txt as in a diffusers `tokenizer/` folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *clip_merges()]) + "\n", encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(clip_vocab()), encoding="utf-8")


def transformers_openclip(model: LatentDiffusion, prefix: str = "conditioner.embedders.1.model."):
    """transformers' CLIPTextModelWithProjection of an OpenCLIP text tower, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    c = model.config.clip2 if prefix.startswith("conditioner.") else model.config.clip
    config = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_positions, hidden_act=c.act,
        projection_dim=c.projection, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )  # fmt: skip
    text = CLIPTextModelWithProjection(config)
    converted = convert_open_clip_checkpoint(text, model.state_dict(), prefix=prefix)
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 flattened the model
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text.load_state_dict(converted, strict=False)
    assert all("position_ids" in k for k in missing) and not unexpected, (missing, unexpected)
    return text.eval()


def transformers_tokenizer(folder, pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder)
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad)
    return CLIPTokenizer.from_pretrained(folder, unk_token="<|endoftext|>", model_max_length=77, **special)


SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)  # fmt: skip


def diffusers_pipeline(model: LatentDiffusion, tmp, img2img: bool = False):
    """diffusers' own SD pipeline on booth's weights, with the SD1.5 DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=diffusers_vae(model), text_encoder=transformers_clip(model), tokenizer=transformers_tokenizer(tmp),
        unet=diffusers_unet(model), scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SD 2.x in small: OpenCLIP's text encoder (gelu, a projection), linear projections and head widths in the UNet
TINY_SD2 = ModelConfig(
    unet=dataclasses.replace(TINY.unet, context_dim=64, num_head_channels=16, linear_proj=True,
                             attention_resolutions=(1, 2)),
    vae=TINY.vae, clip=CLIPConfig(width=64, layers=3, heads=4, intermediate=256, act="gelu", projection=48),
    text_encoder="openclip",
)  # fmt: skip


def saved_model(cfg: ModelConfig, seed: int, path: Path) -> tuple[Path, LatentDiffusion]:
    """Random weights of `cfg` (norms perturbed, so none is the identity) saved as a booth single file at `path`,
    with the OpenCLIP temperature SD 2.x and SDXL files carry; (path, the model)."""
    from booth.checkpoint import save_checkpoint
    from booth.model import random_weights

    model = random_weights(cfg, seed=seed).eval()
    perturb_norms(model)
    openclip = {"openclip": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
    extras = (
        {openclip[cfg.text_encoder] + "logit_scale": torch.tensor(4.6)}
        if cfg.text_encoder in openclip
        else {}
    )
    save_checkpoint({**model.state_dict(), **extras}, path, config=cfg, dtype=torch.float32)
    return path, model


def transformers_sd2_text(model: LatentDiffusion):
    """SD 2.x's text encoder as diffusers has it: a CLIPTextModel of one layer less (SD 2.x conditions on the
    penultimate layer through the final norm, which diffusers makes the last layer's output), by diffusers'
    OpenCLIP converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    t = model.config.clip
    config = CLIPTextConfig(hidden_size=t.width, num_hidden_layers=t.layers - 1, num_attention_heads=t.heads,
                            intermediate_size=t.intermediate, hidden_act="gelu", vocab_size=t.vocab_size,
                            max_position_embeddings=77)  # fmt: skip
    text = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(text, model.state_dict(), prefix="cond_stage_model.model.")
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 flattened the model
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text.load_state_dict(converted, strict=False)
    assert all("position_ids" in k for k in missing), missing
    assert all(f"layers.{t.layers - 1}." in k or "text_projection" in k for k in unexpected), unexpected
    return text.eval()


def diffusers_sd2_pipeline(model: LatentDiffusion, tmp, img2img: bool = False):
    """diffusers' pipeline of the same weights: its UNet and VAE from its single-file converters, its text
    encoder `transformers_sd2_text`'s, its tokenizer padding with "!" (0)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=diffusers_vae(model), text_encoder=transformers_sd2_text(model), tokenizer=transformers_tokenizer(tmp, pad="!"),
               unet=diffusers_unet(model), scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sdxl_pipeline(model: LatentDiffusion, tmp):
    """diffusers' StableDiffusionXLPipeline on booth's SDXL weights (its converters), with SDXL's scheduler
    settings in DDIM (as the SD1 tests use), zeros for an empty negative prompt as SDXL base's config says."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=diffusers_vae(model), text_encoder=transformers_clip(model, "conditioner.embedders.0.transformer.text_model."),
        text_encoder_2=transformers_openclip(model), tokenizer=transformers_tokenizer(Path(tmp) / "tokenizer"),
        tokenizer_2=transformers_tokenizer(Path(tmp) / "tokenizer_2", pad="!"), unet=diffusers_unet(model),
        scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


DOG = Path(__file__).parent / "data" / "dog"  # five photos of one dog (the DreamBooth benchmark's)


def dreambooth_argv(base, out, *args) -> list[str]:
    """`booth dreambooth` of the test dog on the base model `base`, writing runs into `out`."""
    return ["dreambooth", "-c", "dog", "-i", str(DOG), "-m", str(base), "-o", str(out), *map(str, args)]


def read_jsonl(path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def interrupt_once_logged(cmd: list[str], log, lines: int = 3, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` (a booth training command) in a fresh process, press Ctrl-C once `log` has `lines` steps in it,
    and return its exit code and stderr."""
    log = Path(log)
    return interrupt_when(cmd, lambda: log.exists() and len(log.read_text().splitlines()) >= lines, timeout)


def interrupt_when(cmd: list[str], ready, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` in a fresh process, press Ctrl-C once `ready()` is true, and return its exit code and stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # A shell's background job starts with SIGINT ignored, and its children inherit that (Python then installs
    # no KeyboardInterrupt handler): give the child the default a terminal's would have, wherever pytest runs.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def error_of(capsys) -> str:
    """The one `booth: error:` line a command printed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("booth: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- a headless browser

# Headless Chromium that stays off the network: no background fetches (updates, sync, safe browsing, metrics),
# and a dead proxy and a resolver that finds no host, so a page that asks for anything remote fails to load it,
# which shows as a SEVERE console entry. Loopback stays direct: chromedriver talks to the browser through it.
BROWSER_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--force-device-scale-factor=1", "--lang=en-US", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-breakpad", "--disable-domain-reliability", "--no-pings",
    "--disable-client-side-phishing-detection", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
    "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver): the system's, never downloaded. Without them (or Selenium) the calling test skips,
    or fails where BOOTH_REQUIRE_BROWSER=1 (CI installs them and sets it, so the test cannot skip silently)."""
    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, found in [("chromium", chromium), ("chromedriver", driver)] if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        why = f"no {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("BOOTH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BOOTH_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return chromium, driver


def console_errors(driver) -> list[dict]:
    """The SEVERE browser-console entries since the last call (Selenium hands each entry out once)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


@contextlib.contextmanager
def open_in_browser(path, width: int = 1280, height: int = 900) -> Iterator[tuple[object, list[dict]]]:
    """Open the local HTML file `path` in headless Chromium and yield (the Selenium driver, the SEVERE console
    entries of the load); the browser is closed after the block. Skips as browser_paths() says."""
    from unittest import mock

    chromium, chromedriver = browser_paths()  # first: it skips where Selenium is missing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*BROWSER_FLAGS, f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium Manager downloads browsers and drivers; with both paths given Selenium skips it, and this makes
    # sure it stays so in later Selenium versions. Should it run anyway, SE_OFFLINE and SE_AVOID_STATS (which
    # Selenium Manager reads) keep it from downloading and from sending its usage statistics. Selenium would send
    # its own requests to chromedriver (on localhost) through an http_proxy the environment names: no_proxy.
    loopback = "localhost,127.0.0.1,::1"
    env = {"SE_OFFLINE": "true", "SE_AVOID_STATS": "true", "no_proxy": loopback, "NO_PROXY": loopback}
    refuse = mock.patch.object(
        SeleniumManager, "binary_paths", side_effect=AssertionError("Selenium Manager ran")
    )
    with refuse, mock.patch.dict(os.environ, env):
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(path).resolve().as_uri())
        yield driver, console_errors(driver)
    finally:
        driver.quit()


def save_screenshot(driver, name: str) -> Path:
    """A screenshot of the whole page (the window grown to the document's height) in the test-artifacts folder
    ($BOOTH_TEST_ARTIFACTS, else ./test-artifacts), for a person to look at."""
    folder = Path(os.environ.get("BOOTH_TEST_ARTIFACTS", "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    width, height = max(width, 800), min(max(height, 600), 16000)  # Chromium caps a capture's size
    driver.set_window_size(width, height)
    short = height - driver.execute_script("return window.innerHeight")  # the window's own frame
    if short > 0:
        driver.set_window_size(width, height + short)
    path = folder / name
    driver.save_screenshot(str(path))
    return path
