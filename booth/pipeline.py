"""`StableDiffusion`: text-to-image and image-to-image over a loaded model.

Seeds follow AUTOMATIC1111 and diffusers: image i of a call with seed S draws its noise from
`torch.Generator('cpu').manual_seed(S + i)`, so an image does not depend on the batch it was made in, on the
device, or on whether diffusers or booth made it (same weights, same sampler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from . import sampling
from .checkpoint import (
    Checkpoint,
    Stub,
    check_weights,
    file_hash,
    load_model,
    load_part,
    read_checkpoint,
    use_vae,
)
from .config import ModelConfig
from .errors import BoothError
from .hub import DEFAULT_MODEL, find_model, find_vae
from .images import load_image, to_pil, to_tensor
from .lora import LoRA, merge, restore
from .model import PARTS, LatentDiffusion, build, encode_text, part_modules, part_of, tokenize, unet_inputs
from .options import Settings, check_seeds, check_strength, check_text
from .tokenizer import get_tokenizer

__all__ = ["Settings", "StableDiffusion", "resolve_settings", "steps_to_run"]


class StableDiffusion:
    """A Stable Diffusion v1 model ready to sample: `txt2img`, `img2img`, `encode_prompt`, `decode`.

    Made from a file (`from_pretrained`, or `from_checkpoint` of a lazy Checkpoint), it reads each network when
    it is first needed: the text encoder for the first prompt, the UNet for the first step, the VAE's decoder for
    the first image and its encoder only for img2img. The encoders are let go once their work is done (freed on
    the CPU, where they are read again for a new prompt or image; moved to host memory on a GPU), and the
    prompt's embeddings and the input image's latents are kept for the next batch. With `low_memory`, only the
    network at work stays on the device, as AUTOMATIC1111's --medvram does. A pipeline over a model in memory
    (`StableDiffusion(model)`, as training's previews are) leaves every network where it is."""

    def __init__(self, model: LatentDiffusion, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "model", model_hash: str | None = None, low_memory: bool = False):  # fmt: skip
        if model.config.unet.in_channels != 4:
            raise BoothError(
                f"{name} has a {model.config.unet.in_channels}-channel UNet (inpainting?); txt2img needs 4"
            )
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.config = model.config
        self.name, self.model_hash, self.low_memory = name, model_hash, low_memory
        self.vae: tuple[str, str | None] | None = None  # (name, hash) of a VAE of its own (--vae), for PNGs
        self.loras: list[tuple[str, str]] = []  # (name, hash) of the LoRAs in the weights, for PNG metadata
        self._loras: list[tuple[LoRA, float]] = []  # merged into each network as it is read
        self._originals: dict[str, torch.Tensor] = {}  # the base tensors those LoRAs replaced
        self._stubs: dict[str, Stub | torch.Tensor] | None = None  # where the networks are read (again) from
        self._cache: dict[str, tuple] = {}  # the last prompt's embeddings, the last input image's posterior
        self._keep_prompts = False  # see prompts_kept
        self.vae_dtype = dtype  # what the VAE runs in (fp32 where it would overflow in fp16)
        self.tokenizer = get_tokenizer()
        self.schedule = self._schedule(self.config.zero_snr)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cpu", dtype=torch.float32, model_hash=None,
                        low_memory: bool = False) -> StableDiffusion:  # fmt: skip
        """A lazy Checkpoint (`read_checkpoint(..., lazy=True)`) is read a network at a time, when needed."""
        if not any(isinstance(v, Stub) for v in ckpt.state_dict.values()):
            sd = cls(load_model(ckpt, device, dtype), device, dtype, ckpt.name, model_hash, low_memory)
        else:
            model = build(ckpt.config)
            check_weights(ckpt, model.state_dict())
            sd = cls(model.eval().requires_grad_(False), device, dtype, ckpt.name, model_hash, low_memory)
            sd._stubs = ckpt.state_dict
        sd._took_vae(ckpt)
        return sd

    def _took_vae(self, ckpt: Checkpoint) -> None:
        """Note a VAE of the checkpoint's own choosing (use_vae). SDXL's original VAE overflows in fp16, so unless
        one was chosen (a fixed fp16 VAE, as a rule) it runs in fp32 beside an fp16 model, as diffusers'
        force_upcast does."""
        if ckpt.vae is not None:
            self.vae = (ckpt.vae.name, file_hash(ckpt.vae) if ckpt.vae.is_file() else None)
        elif self.config.family == "sdxl" and self.dtype == torch.float16:
            self._upcast_vae()

    def _upcast_vae(self) -> None:
        self.vae_dtype = torch.float32
        for part in ("vae_encoder", "vae_decoder"):
            if _place(self.model, part).type != "meta":
                for m in part_modules(self.model, part):
                    m.float()

    @classmethod
    def from_pretrained(cls, spec: str = DEFAULT_MODEL, device="cpu", dtype=torch.float32, ema: bool = False,
                        low_memory: bool = False, vae: str | None = None) -> StableDiffusion:  # fmt: skip
        """Load from a file, a diffusers folder, a Hugging Face repo id or an alias (`sd15`, `sdxl`, ...); `vae`: a
        VAE to use instead of the model's own (as --vae takes it)."""
        found = find_model(spec)
        ckpt = read_checkpoint(found.path, ema=ema, lazy=True)
        if vae is not None:
            use_vae(ckpt, find_vae(vae), lazy=True)
        model_hash = file_hash(found.path) if found.path.is_file() else None
        return cls.from_checkpoint(ckpt, device, dtype, model_hash, low_memory)

    def load_weights(self, ckpt: Checkpoint, model_hash: str | None = None) -> None:
        """Take another checkpoint of the same config (no LoRAs then): copied into this model's tensors, or, for a
        pipeline made from a file, read a network at a time as they are needed."""
        check_weights(ckpt, self.model.state_dict())
        if self._stubs is None:
            load_model(ckpt, into=self.model)
        else:
            for part in PARTS:
                self._free(part)
            self._stubs = ckpt.state_dict
        self.name, self.model_hash = ckpt.name, model_hash
        self.loras, self._loras, self._originals, self._cache = [], [], {}, {}

    def set_loras(self, loras: Sequence[tuple[LoRA, float]]) -> None:
        """Merge these (LoRA, weight) pairs into the base weights, after putting back exactly the tensors an earlier
        call replaced. Sampling then costs what the base model costs. A network not read yet gets them when it is."""
        weights = self.model.state_dict()
        restore(weights, self._originals)
        self.loras, self._loras, self._originals, self._cache = [], [], {}, {}
        # merge checks every LoRA before it changes anything
        self._originals = merge(
            weights, loras, self.config, only={k for k, v in weights.items() if not v.is_meta}
        )
        self._loras = list(loras)
        self.loras = [(lora.name, lora.short_hash) for lora, _ in loras]

    # ------------------------------------------------------------------ which networks are where

    def _use(self, part: str) -> None:
        """Make one of booth.model.PARTS ready on the device: read it if it is not in memory, bring it back if it
        was moved off. With low_memory, every other network leaves the device first."""
        if self._stubs is None:
            return
        if self.low_memory:
            for other in PARTS:
                if other != part:
                    self._release(other)
        where = _place(self.model, part)
        if where.type == "meta":
            dtype = self.vae_dtype if part.startswith("vae") else self.dtype
            load_part(self.model, self._stubs, part, self.device, dtype)
            if self._loras:
                weights = self.model.state_dict()
                keys = {k for k in weights if part_of(k) == part}
                self._originals.update(merge(weights, self._loras, self.config, only=keys))
        elif where != self.device:
            for m in part_modules(self.model, part):
                m.to(self.device)

    def _release(self, part: str) -> None:
        """Take a network off the device: into host memory from a GPU, out of memory altogether on the CPU (it is
        read from its file again when needed)."""
        if self._stubs is None or _place(self.model, part).type == "meta":
            return
        if self.device.type == "cpu":
            self._free(part)
        else:
            for m in part_modules(self.model, part):
                m.to("cpu")

    def _free(self, part: str) -> None:
        for m in part_modules(self.model, part):
            m.to_empty(device="meta")
        self._originals = {k: v for k, v in self._originals.items() if part_of(k) != part}

    # ------------------------------------------------------------------ building blocks

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                      clip_skip: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
        """Text -> (cond, uncond): each {"context": (B, 77*K, width)}, both padded to the same number K of 75-token
        chunks, and for SDXL "pooled" (B, 1280). SDXL's empty negative prompt is zeros, as diffusers' is."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        for text in prompts + negatives:
            check_text("the prompt", text)
        check_clip_skip(self.config, clip_skip, self.name)
        key = (prompts, negatives, clip_skip)
        if self._cache.get("prompt", (None,))[0] == key:
            return self._cache["prompt"][1]
        ids = self.tokenize(prompts + negatives)  # one batch, so all share K
        self._use("text_encoder")
        # a model in memory may keep its text encoder off the device (training parks a frozen one on the host)
        where = _place(self.model, "text_encoder")
        emb = {
            k: v.to(self.device)
            for k, v in encode_text(self.model.text_encoder, ids.to(where), clip_skip).items()
        }
        self._release("text_encoder")
        if self.config.text_encoder == "sdxl":
            empty = torch.tensor([not text for text in negatives], device=self.device)
            for v in emb.values():
                v[len(prompts) :][empty] = 0
        out = tuple(
            {k: v[rows] for k, v in emb.items()} for rows in (slice(len(prompts)), slice(len(prompts), None))
        )
        if self._stubs is not None or self._keep_prompts:
            self._cache["prompt"] = (key, out)
        return out

    @contextlib.contextmanager
    def prompts_kept(self) -> Iterator[None]:
        """Keep the last prompt's embeddings, as a model read from a file always does, while the text encoder of
        one in memory, which may be training, is known to stay as it is; forget them after."""
        self._keep_prompts = True
        try:
            yield
        finally:
            self._keep_prompts = False
            self._cache.pop("prompt", None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Diffusion latents (B, 4, h, w) -> PIL images."""
        self._use("vae_decoder")
        images = self._decoded(latents)
        if not bool(torch.isfinite(images).all()) and self.vae_dtype == torch.float16:
            print("booth: the VAE overflowed in float16, decoding in float32 from now on (a VAE made for fp16, "
                  "given with --vae, is faster)", file=sys.stderr)  # fmt: skip
            self._upcast_vae()
            images = self._decoded(latents)
        if not bool(torch.isfinite(images).all()):
            raise BoothError(f"{self.name}'s VAE made NaN or infinite pixels: {self._broken()}")
        return to_pil(images)

    def _decoded(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.vae.decoder.parameters()).dtype
        return self.model.vae.decode(latents.to(self.device, dtype) / self.config.scale_factor)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> one posterior sample per generator, scaled: (len(generators), 4, H/8, W/8)."""
        mean, logvar = self._posterior(image)
        std = torch.exp(0.5 * logvar.float())
        z = mean.float() + std * sampling.randn((len(generators), *mean.shape[1:]), generators, self.device)
        return z * self.config.scale_factor

    def _posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE encoder's mean and log-variance for `image`, kept for the next batch of the same image."""
        cached = self._cache.get("image")
        if cached is not None and cached[0].shape == image.shape and torch.equal(cached[0], image):
            return cached[1]
        self._use("vae_encoder")
        out = self.model.vae.encode(image.to(self.device, next(self.model.vae.encoder.parameters()).dtype))
        self._release("vae_encoder")
        if self._stubs is not None:
            self._cache["image"] = (image.detach().clone(), out)
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (B, 77*K) on the device, padded as the model's text encoder was trained (CLIP-L's with the
        end token, OpenCLIP's with 0); for SDXL both paddings, (B, 2, 77*K)."""
        return tokenize(self.tokenizer, self.config, texts).to(self.device)

    def resolve(self, settings: Settings, image_size: tuple[int, int] | None = None) -> Settings:
        return resolve_settings(self.config, settings, image_size, self.name)

    def _schedule(self, zero_snr: bool) -> sampling.DiscreteSchedule:
        c = self.config
        return sampling.DiscreteSchedule(c.beta_start, c.beta_end, c.num_train_timesteps, zero_snr)

    def sigmas(self, settings: Settings) -> torch.Tensor:
        s = self.resolve(settings)
        return sampling.SCHEDULES[s.schedule](self._schedule(s.zero_snr), s.steps)

    # ------------------------------------------------------------------ sampling

    def generate_latents(self, prompt: str, negative_prompt: str = "", seeds: Sequence[int] = (0,),
                         settings: Settings | None = None, image: torch.Tensor | None = None,
                         strength: float = 0.75) -> Iterator[dict]:  # fmt: skip
        """Yield the sampler's state after each step (`x`, `denoised`, `i`, `sigma`, ...); the final dict also
        carries `latents`, the result ready for `decode`. With `image` (1,3,H,W in [-1,1]) this is img2img."""
        settings = settings or Settings()
        settings.validate()  # as given: a value the sampler ignores must still be a valid one
        s = self.resolve(settings)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in check_seeds(seeds)]
        cond, uncond = (
            unet_inputs(c, (s.height, s.width))
            for c in self.encode_prompt(prompt, negative_prompt, s.clip_skip)
        )  # (1, L, C): guidance broadcasts
        sigmas = self.sigmas(s).to(self.device)
        if image is None:
            x = self._initial_noise(generators, s) * math.sqrt(1 + sigmas[0].item() ** 2)
        else:
            sigmas, x = self._img2img_start(image, generators, sigmas, strength)
        self._use("unet")
        schedule = self._schedule(s.zero_snr)
        unet = sampling.PREDICTIONS[s.prediction](self.model.unet, schedule, dtype=self.dtype)
        denoiser = sampling.CFGDenoiser(unet, cond, uncond, s.scale, s.cfg_rescale)
        opts = {} if s.eta is None else {"eta": s.eta}
        info = {"i": -1, "x": x, "sigma": sigmas[0], "sigma_next": sigmas[0], "denoised": x}
        with torch.no_grad():
            for info in sampling.SAMPLERS[s.sampler].steps(denoiser, x, sigmas, generator=generators, **opts):
                yield info
        if not bool(torch.isfinite(info["x"]).all()):
            raise BoothError(f"{self.name} produced NaN or infinite latents: {self._broken()}")
        # Samplers work in sigma ("VE") space; the VAE wants the model's own scaling of the last state.
        yield {**info, "latents": info["x"] / math.sqrt(1 + sigmas[-1].item() ** 2)}

    def _broken(self) -> str:
        why = "its weights are probably broken (inf or NaN in the file, or trained with too high a learning rate)"
        if self.dtype == torch.float32:
            return why
        return f"{why}, or they overflow in {_name(self.dtype)}: try --precision fp32 or bf16"

    def _initial_noise(self, generators: Sequence[torch.Generator], s: Settings) -> torch.Tensor:
        f = self.config.vae.downscale
        shape = (len(generators), self.config.unet.in_channels, s.height // f, s.width // f)
        return sampling.randn(shape, generators, self.device)

    def _img2img_start(self, image, generators, sigmas, strength):
        """diffusers' img2img: strength picks how much of the schedule runs; each image's generator draws the
        VAE posterior sample first, then the noise."""
        check_strength(strength)
        steps = len(sigmas) - 1
        run = steps_to_run(steps, strength)
        z0 = self.encode_image(image, generators)
        if run == 0:
            return sigmas[-1:] * 0, z0
        sigmas = sigmas[steps - run :]
        return sigmas, z0 + sampling.randn(z0.shape, generators, self.device) * sigmas[0]

    def _run(self, prompt, negative_prompt, seeds, settings, image=None, strength=0.75, callback=None):
        info = {}
        for info in self.generate_latents(prompt, negative_prompt, seeds, settings, image, strength):
            if callback is not None and "latents" not in info:
                callback(info)
        return self.decode(info["latents"])

    def txt2img(self, prompt: str, negative_prompt: str = "", seeds: Sequence[int] = (0,),
                settings: Settings | None = None, callback=None, **kwargs) -> list[Image.Image]:  # fmt: skip
        """One image per seed. `kwargs` override fields of `settings` (steps=, sampler=, scale=, height=, ...)."""
        return self._run(prompt, negative_prompt, seeds, _settings(settings, kwargs), callback=callback)

    def img2img(self, image: Image.Image | torch.Tensor, prompt: str, negative_prompt: str = "",
                seeds: Sequence[int] = (0,), strength: float = 0.75, settings: Settings | None = None,
                callback=None, **kwargs) -> list[Image.Image]:  # fmt: skip
        """Repaint `image`: a PIL image or an image file, resized to the settings' size (see `resolve`), or a
        (1,3,H,W) tensor in [-1, 1], used at its own size."""
        s = _settings(settings, kwargs)
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif not isinstance(image, (Image.Image, torch.Tensor)):
            raise TypeError(
                f"image must be a PIL image, an image file or a (1, 3, H, W) tensor, not {image!r}"
            )
        if isinstance(image, torch.Tensor):
            s.height, s.width = image.shape[-2:]
            return self._run(prompt, negative_prompt, seeds, s, image, strength, callback)
        s = self.resolve(s, image.size)
        return self._run(
            prompt, negative_prompt, seeds, s, to_tensor(image, (s.height, s.width)), strength, callback
        )


def resolve_settings(
    config: ModelConfig,
    settings: Settings,
    image_size: tuple[int, int] | None = None,
    name: str = "the model",
) -> Settings:
    """A copy of `settings` with the sampler's schedule and eta filled in, and the image size where it is not given:
    the model's own (`config.sample_size` squared) or, for an img2img input of `image_size` (w, h), as many pixels
    in the input's aspect ratio, in multiples of 8."""
    zero_snr = config.zero_snr if settings.zero_snr is None else settings.zero_snr
    s = dataclasses.replace(
        settings.resolved(), prediction=settings.prediction or config.prediction, zero_snr=zero_snr
    )
    check_clip_skip(config, s.clip_skip, name)
    if s.zero_snr and s.prediction != "v":
        raise BoothError(f"--zero-snr needs a v-prediction model, and {name} predicts eps (at zero SNR the noise "
                         "says nothing of the image); give --prediction v if it is a v model")  # fmt: skip
    size = config.sample_size
    if image_size is not None and s.height is None and s.width is None:
        aspect = image_size[0] / image_size[1]
        width, height = (max(8, round(size * f / 8) * 8) for f in (aspect**0.5, aspect**-0.5))
        return dataclasses.replace(s, height=height, width=width)
    h, w = (size if v is None else v for v in (s.height, s.width))
    return dataclasses.replace(s, height=h, width=w)


def check_clip_skip(config: ModelConfig, clip_skip: int, name: str) -> None:
    layers = min(c.layers for c in (config.clip, config.clip2) if c is not None)
    if clip_skip > layers:
        raise BoothError(f"--clip-skip {clip_skip} is more than the {layers} layers of {name}'s text encoder")


def steps_to_run(steps: int, strength: float) -> int:
    """How many of `steps` img2img runs at `strength` (diffusers' rule, but at least one unless strength is 0)."""
    run = min(int(steps * strength), steps)
    return max(run, 1) if strength > 0 else 0


def _settings(settings: Settings | None, overrides: dict) -> Settings:
    s = dataclasses.replace(settings) if settings else Settings()
    for k, v in overrides.items():
        if not hasattr(s, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(s, k, v)
    return s


def _place(model: LatentDiffusion, part: str) -> torch.device:
    return next(part_modules(model, part)[0].parameters()).device


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
