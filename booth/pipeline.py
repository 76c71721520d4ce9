"""`StableDiffusion`: text-to-image and image-to-image over a loaded model.

Seeds follow AUTOMATIC1111 and diffusers: image i of a call with seed S draws its noise from
`torch.Generator('cpu').manual_seed(S + i)`, so an image does not depend on the batch it was made in, on the
device, or on whether diffusers or booth made it (same weights, same sampler).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from . import sampling
from .checkpoint import Checkpoint, load_model, read_checkpoint
from .errors import BoothError
from .images import to_pil, to_tensor
from .model import LatentDiffusion
from .tokenizer import get_tokenizer

SAMPLER_NAMES = {
    "ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
}  # fmt: skip
SCHEDULE_NAMES = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential"}


@dataclass
class Settings:
    """How to sample; the defaults are booth's CLI defaults (`sampler="plms", steps=50` are the seed tool's)."""

    steps: int = 25
    sampler: str = "dpmpp_2m"
    schedule: str = "karras"
    scale: float = 7.5
    eta: float = 0.0
    height: int | None = None  # None: the model's own size (config.sample_size: 512 for SD1)
    width: int | None = None
    clip_skip: int = 1

    def validate(self) -> None:
        if self.sampler not in sampling.SAMPLERS:
            raise BoothError(
                f"unknown sampler {self.sampler!r}; choose one of: {', '.join(sampling.SAMPLERS)}"
            )
        if self.schedule not in sampling.SCHEDULES:
            raise BoothError(
                f"unknown schedule {self.schedule!r}; choose one of: {', '.join(sampling.SCHEDULES)}"
            )
        if self.steps < 1:
            raise BoothError(f"steps must be at least 1 (got {self.steps})")
        h, w = (8 if v is None else v for v in (self.height, self.width))
        if h % 8 or w % 8 or min(h, w) < 8:
            raise BoothError(
                f"height and width must be positive multiples of 8 (got {self.height}x{self.width})"
            )
        if self.eta < 0:
            raise BoothError(f"eta must be >= 0 (got {self.eta})")
        if self.clip_skip < 1:
            raise BoothError(f"clip skip must be at least 1 (got {self.clip_skip})")


class StableDiffusion:
    """A Stable Diffusion v1 model ready to sample: `txt2img`, `img2img`, `encode_prompt`, `decode`."""

    def __init__(self, model: LatentDiffusion, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "model", model_hash: str | None = None):  # fmt: skip
        if model.config.unet.in_channels != 4:
            raise BoothError(
                f"{name} has a {model.config.unet.in_channels}-channel UNet (inpainting?); txt2img needs 4"
            )
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.config = model.config
        self.name, self.model_hash = name, model_hash
        self.loras: list[
            tuple[str, str]
        ] = []  # (name, hash) of LoRAs merged into the weights, for PNG metadata
        self.tokenizer = get_tokenizer()
        c = self.config
        self.schedule = sampling.DiscreteSchedule(c.beta_start, c.beta_end, c.num_train_timesteps)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, device="cpu", dtype=torch.float32, model_hash=None
    ) -> StableDiffusion:
        return cls(load_model(ckpt, device, dtype), device, dtype, ckpt.name, model_hash)

    @classmethod
    def from_pretrained(
        cls, spec: str = "sd15", device="cpu", dtype=torch.float32, ema: bool = False
    ) -> StableDiffusion:
        """Load from a file, a diffusers folder, a Hugging Face repo id or an alias (`sd15`, `sd14`)."""
        from .checkpoint import file_hash
        from .hub import resolve

        path = resolve(spec)
        ckpt = read_checkpoint(path, ema=ema)
        return cls.from_checkpoint(ckpt, device, dtype, file_hash(path) if path.is_file() else None)

    # ------------------------------------------------------------------ building blocks

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                      clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Text -> (cond, uncond) embeddings (B, 77*K, width), both padded to the same number K of 75-token chunks."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        ids = self.tokenizer(prompts + negatives).to(self.device)  # one batch, so all share K
        emb = self.model.text_encoder.encode_chunks(ids, clip_skip)
        return emb[: len(prompts)], emb[len(prompts) :]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Diffusion latents (B, 4, h, w) -> PIL images."""
        vae = self.model.vae
        images = vae.decode(latents.to(self.device, self.dtype) / self.config.scale_factor)
        return to_pil(images)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> one posterior sample per generator, scaled: (len(generators), 4, H/8, W/8)."""
        mean, logvar = self.model.vae.encode(image.to(self.device, self.dtype))
        std = torch.exp(0.5 * logvar.float())
        z = [mean.float() + std * sampling.randn(mean.shape, g, self.device) for g in generators]
        return torch.cat(z) * self.config.scale_factor

    def resolve(self, settings: Settings) -> Settings:
        """A copy of `settings` with the image size filled in from the model when not given."""
        size = self.config.sample_size
        h, w = (size if v is None else v for v in (settings.height, settings.width))
        return dataclasses.replace(settings, height=h, width=w)

    def sigmas(self, settings: Settings) -> torch.Tensor:
        return sampling.SCHEDULES[settings.schedule](self.schedule, settings.steps)

    # ------------------------------------------------------------------ sampling

    def generate_latents(self, prompt: str, negative_prompt: str = "", seeds: Sequence[int] = (0,),
                         settings: Settings | None = None, image: torch.Tensor | None = None,
                         strength: float = 0.75) -> Iterator[dict]:  # fmt: skip
        """Yield the sampler's state after each step (`x`, `denoised`, `i`, `sigma`, ...); the final dict also
        carries `latents`, the result ready for `decode`. With `image` (1,3,H,W in [-1,1]) this is img2img."""
        s = self.resolve(settings or Settings())
        s.validate()
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        cond, uncond = self.encode_prompt(
            prompt, negative_prompt, s.clip_skip
        )  # (1, L, C): guidance broadcasts
        sigmas = self.sigmas(s).to(self.device)
        if image is None:
            x = self._initial_noise(generators, s) * math.sqrt(1 + sigmas[0].item() ** 2)
        else:
            sigmas, x = self._img2img_start(image, generators, sigmas, strength)
        unet = self.model.unet
        denoiser = sampling.CFGDenoiser(
            sampling.EpsDenoiser(unet, self.schedule, dtype=self.dtype), cond, uncond, s.scale
        )
        opts = {"eta": s.eta} if s.sampler in ("ddim", "euler_a", "dpmpp_2m_sde") else {}
        info = {"i": -1, "x": x, "sigma": sigmas[0], "sigma_next": sigmas[0], "denoised": x}
        with torch.no_grad():
            for info in sampling.SAMPLERS[s.sampler].steps(denoiser, x, sigmas, generator=generators, **opts):
                yield info
        # Samplers work in sigma ("VE") space; the VAE wants the model's own scaling of the last state.
        yield {**info, "latents": info["x"] / math.sqrt(1 + sigmas[-1].item() ** 2)}

    def _initial_noise(self, generators: Sequence[torch.Generator], s: Settings) -> torch.Tensor:
        f = self.config.vae.downscale
        shape = (1, self.config.unet.in_channels, s.height // f, s.width // f)
        return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    def _img2img_start(self, image, generators, sigmas, strength):
        """diffusers' img2img: strength picks how much of the schedule runs; each image's generator draws the
        VAE posterior sample first, then the noise."""
        if not 0.0 <= strength <= 1.0:
            raise BoothError(f"strength must be between 0 and 1 (got {strength})")
        steps = len(sigmas) - 1
        run = steps_to_run(steps, strength)
        z0 = self.encode_image(image, generators)
        if run == 0:
            return sigmas[-1:] * 0, z0
        sigmas = sigmas[steps - run :]
        noise = torch.cat([sampling.randn(z0[:1].shape, g, self.device) for g in generators])
        return sigmas, z0 + noise * sigmas[0]

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
        """Repaint `image` (PIL, resized to settings' size, or a (1,3,H,W) tensor in [-1, 1])."""
        s = _settings(settings, kwargs)
        s = self.resolve(s)
        tensor = image if isinstance(image, torch.Tensor) else to_tensor(image, (s.height, s.width))
        s.height, s.width = tensor.shape[-2:]
        return self._run(prompt, negative_prompt, seeds, s, tensor, strength, callback)


def steps_to_run(steps: int, strength: float) -> int:
    """How many of `steps` img2img runs at `strength` (diffusers' rule, but at least one unless strength is 0)."""
    run = min(int(steps * strength), steps)
    return max(run, 1) if strength > 0 else 0


def _settings(settings: Settings | None, overrides: dict) -> Settings:
    s = Settings(**vars(settings)) if settings else Settings()
    for k, v in overrides.items():
        if not hasattr(s, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(s, k, v)
    return s
