"""What a run is asked to do, as plain dataclasses with their own `validate()`: how to sample (`Settings`), a
render job (`Job`), the training loop (`Loop`), the training noise (`Noise`), DreamBooth (`TrainConfig`) and the
demo model's recipe (`DemoRecipe`), plus the catalogue of samplers and schedules.

Each default and each rule lives here once: the `booth` command builds its flags from these dataclasses and calls
the same `validate()` as the Python API. Nothing here imports torch, so `booth --help` and a mistyped flag answer
at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import yaml

from .config import PREDICTIONS
from .errors import BoothError
from .hub import DEFAULT_MODEL


@dataclass(frozen=True)
class Sampler:
    """A sampler's facts; its code is `booth.sampling.SAMPLERS[name]`."""

    label: str  # AUTOMATIC1111's name, written into the PNG metadata
    schedule: str  # the sigma schedule `automatic` picks for it
    eta: float | None = None  # its default noise; None: it has no noise term

    @property
    def stochastic(self) -> bool:
        """Whether it draws fresh noise at its default eta."""
        return bool(self.eta)


SAMPLERS = {
    "ddim": Sampler("DDIM", "uniform", eta=0.0),
    "plms": Sampler("PLMS", "uniform"),
    "euler": Sampler("Euler", "karras"),
    "euler_a": Sampler("Euler a", "karras", eta=1.0),
    "heun": Sampler("Heun", "karras"),
    "lms": Sampler("LMS", "karras"),
    "dpmpp_2m": Sampler("DPM++ 2M", "karras"),
    "dpmpp_2m_sde": Sampler("DPM++ 2M SDE", "karras", eta=1.0),
}
# Sigma schedule -> AUTOMATIC1111's "Schedule type"; `automatic` is each sampler's own (Sampler.schedule).
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential"}
TRAIN_TIMESTEPS = 1000  # every SD family is trained on 1000 discrete timesteps
MAX_STEPS = TRAIN_TIMESTEPS  # more sampling steps than training timesteps only repeat work
PRECISIONS = ("fp32", "fp16", "bf16", "full", "autocast")  # full and autocast: the seed tool's names
SAVE_PRECISIONS = ("fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
WEIGHT_DECAY = 1e-2  # decoupled (AdamW-style), whichever optimizer
FUSED_FP16 = ("--fused-backward cannot skip a step after an fp16 overflow (each weight steps during the backward "
              "pass): use --precision bf16 or fp32")  # fmt: skip
WEIGHTS = ("fp32", "bf16")  # the dtype trained weights live in; bf16: no fp32 copy, stochastic rounding
WEIGHTS_BF16 = (
    "--weights bf16 (part of --lean) computes in bf16: leave out --precision, or give --precision bf16"
)
# What --lean turns on, each unless given on its own; `weights` only where whole networks train (not LoRA). Cached
# prompt embeddings need no flag: the prompts are encoded once whenever the text encoder is frozen. Cached latents
# are left out: they end colour jitter, and the demo's DreamBooth test then drew "a star" in the subject's colours
# (subject share 0.18 -> 0.34 where its bound is +0.08; Adafactor with jitter: 0.22), while the encode they save
# runs before the UNet, so it adds little to the peak.
LEAN = {"weights": "bf16", "fused_backward": True, "optimizer": "adafactor", "gradient_checkpointing": True}
NOT_LEAN = {"weights": "fp32", "fused_backward": False, "optimizer": "adamw", "gradient_checkpointing": False}
LR_SCHEDULES = ("constant", "cosine")
# LoRA targets: module paths (regexes under the UNet) each `--lora-targets` choice adapts. `all` is LoCon-style: the
# rest of the UNet's Linear and Conv2d layers except conv_in and conv_out (kohya's conv_dim covers ResBlocks and the
# resamplers; the time embedding is added because diffusers and A1111 load it too).
_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_FF = r"ff\.net\.(0\.proj|2)"
_REST = (
    r"proj_in|proj_out|in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|\d\.conv|time_embed\.[02]"
)
LORA_TARGETS = {"attn": (_ATTN,), "attn-ff": (_ATTN, _FF), "all": (_ATTN, _FF, _REST)}
DREAMBOOTH_LEARNING_RATE = 5e-6  # diffusers' published DreamBooth recipe
LORA_LEARNING_RATE = 1e-4  # diffusers' LoRA DreamBooth recipe; adapters start at zero and need larger steps
FLOAT32_MAX = 3.4e38  # optimizers keep the learning rate in float32
DINO_MODEL = "facebook/dino-vits16"  # the DreamBooth paper's metric towers (booth evaluate)
CLIP_MODEL = "openai/clip-vit-base-patch32"
METRICS = ("paper", "demo")  # booth evaluate's scorers: DINO/CLIP-I/CLIP-T/PRES, or the demo's shapes judge
MAX_SEED = 2**64 - 1  # torch generators take seeds below 2**64
MAX_ITERATIONS = 10**9  # years at any speed; bounds what a typo can ask for
MAX_TRAIN_SEED = 2**63 - 1  # training derives further seeds from it (class images: seed + 1e6 + i)


# ----------------------------------------------------------------------------- checks


def check_text(name: str, text: str) -> None:
    """Prompts reach the tokenizer as UTF-8; text from invalid UTF-8 arguments holds lone surrogates."""
    if not isinstance(text, str):
        raise BoothError(f"{name} must be text (got {type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BoothError(
            f"{name} is not valid UTF-8 text; check the encoding of your terminal or file"
        ) from None


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BoothError(f"{name} must be a whole number (got {value!r})")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BoothError(f"{name} must be {bounds} (got {value})")


def check_seeds(seeds: object) -> list[int]:
    """The seeds of a batch, one per image: whole numbers torch generators take."""
    seeds = list(seeds) if isinstance(seeds, (list, tuple, range, str)) else [seeds]
    if not seeds:
        raise BoothError("give at least one seed (one image is made per seed)")
    for seed in seeds:
        check_int("seed", seed, 0, MAX_SEED)
    return seeds


def check_number(
    name: str, value: object, low: float = 0.0, high: float = math.inf, open_low: bool = False
) -> None:
    """A finite number in [low, high] (or (low, high] with `open_low`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BoothError(f"{name} must be a finite number (got {value!r})")
    if value < low or value > high or (open_low and value == low):
        if open_low and low == 0:
            most = f" of at most {high:g}" if high < math.inf else ""
            raise BoothError(f"{name} must be a positive number{most} (got {value})")
        if high < math.inf:
            raise BoothError(f"{name} must be between {low:g} and {high:g} (got {value})")
        kind = "non-negative" if low == 0 else f">= {low:g}"
        raise BoothError(f"{name} must be a {kind} number (got {value})")


def check_choice(name: str, value: object, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise BoothError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def check_strength(strength: float) -> None:
    """img2img's strength: how much of the schedule is re-run, 0 (keep the image) to 1 (repaint it)."""
    check_number("--strength", strength, 0.0, 1.0)


def check_size(height: int | None, width: int | None) -> None:
    for value in (height, width):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8
        ):
            raise BoothError(f"height and width must be positive multiples of 8 (got {height}x{width})")


# ----------------------------------------------------------------------------- sampling


@dataclass
class Settings:
    """How to sample; the defaults are booth's (`sampler="plms", steps=50` are the seed tool's)."""

    steps: int = 25
    sampler: str = "dpmpp_2m"
    schedule: str = "automatic"  # each sampler's own: uniform for ddim and plms, karras for the rest
    scale: float = 7.5  # classifier-free guidance; 1 turns it off
    eta: float | None = None  # None: the sampler's own (0 for ddim, 1 for euler_a and dpmpp_2m_sde)
    height: int | None = None  # None: the model's own size (config.sample_size: 512 for SD1)
    width: int | None = None
    clip_skip: int = 1
    prediction: str | None = None  # None: what the model says it predicts (ModelConfig.prediction)
    cfg_rescale: float = 0.0  # Lin et al. 2023's guidance rescale; 0 is plain guidance
    zero_snr: bool | None = None  # the schedule rescaled to zero terminal SNR; None: what the model records

    def validate(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("--steps", self.steps, 1, MAX_STEPS)
        if self.resolved().schedule == "uniform" and self.steps >= TRAIN_TIMESTEPS:
            raise BoothError(
                f"the uniform schedule takes at most {TRAIN_TIMESTEPS - 1} steps (got {self.steps}); "
                "give fewer --steps or --schedule karras"
            )
        check_size(self.height, self.width)
        check_number("--scale", self.scale)
        if self.eta is not None:
            check_number("--eta", self.eta)
        check_int("--clip-skip (CLIP skip)", self.clip_skip, 1)
        if self.prediction is not None:
            check_choice("--prediction", self.prediction, PREDICTIONS)
        check_number("--cfg-rescale", self.cfg_rescale, 0.0, 1.0)

    def resolved(self) -> Settings:
        """A copy with the sampler's own schedule and eta filled in where they are left to it."""
        facts = SAMPLERS.get(self.sampler, Sampler("", "karras"))
        schedule = facts.schedule if self.schedule == "automatic" else self.schedule
        eta = None if facts.eta is None else facts.eta if self.eta is None else self.eta
        return dataclasses.replace(self, schedule=schedule, eta=eta)


@dataclass
class Job:
    """A render: prompts, seeds and settings, on each of the models the caller loads (booth.render)."""

    prompt: str
    negative_prompt: str = ""
    settings: Settings = field(default_factory=Settings)
    seed: int | None = None  # of the first image; image i uses seed + i (AUTOMATIC1111); None: random
    variations: int = 1
    batch_size: int = 1
    image: str | None = None  # img2img when set: the input image's path
    strength: float = 0.75
    ema: bool = False
    vae: str | None = None  # a VAE to use instead of the model's own (booth.hub.find_vae)

    def validate(self) -> None:
        check_text("the prompt", self.prompt)
        check_text("the negative prompt", self.negative_prompt)
        self.settings.validate()
        check_int("--variations", self.variations, 1)
        check_int("--batch-size", self.batch_size, 1)
        if self.seed is not None:
            last = MAX_SEED + 1 - self.variations
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= last:
                raise BoothError(
                    f"--seed must be between 0 and {last} (got {self.seed}); omit it for a random seed"
                )
        if self.image is not None:
            check_strength(self.strength)

    def batches(self):
        """The seeds of each forward pass."""
        for start in range(0, self.variations, self.batch_size):
            yield [self.seed + i for i in range(start, min(start + self.batch_size, self.variations))]


# ----------------------------------------------------------------------------- training


@dataclass
class Loop:
    """What `booth.train.fit` needs of any task: the optimizer, its schedule, and when to save and preview. The
    defaults are DreamBooth's."""

    iterations: int = 800
    learning_rate: float = DREAMBOOTH_LEARNING_RATE
    lr_warmup: int = 0  # linear warm-up steps
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at the last iteration
    max_grad_norm: float = 1.0  # global gradient-norm clipping; 0 turns it off
    grad_accum: int = 1
    optimizer: str = "adamw"
    fused_backward: bool = False  # step each parameter inside the backward pass (booth.optim.StepInBackward)
    save_every: int | None = None  # None: only at the end
    sample_every: int | None = None
    eval_every: int | None = None  # score the task (and save) every N steps; None: never

    def validate(self) -> None:
        check_int("--iterations", self.iterations, 1, MAX_ITERATIONS)
        check_number("--learning-rate", self.learning_rate, 0.0, FLOAT32_MAX, open_low=True)
        check_int("--lr-warmup", self.lr_warmup, 0)
        check_choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        check_number("--max-grad-norm", self.max_grad_norm)
        check_int("--grad-accum", self.grad_accum, 1)
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise BoothError("--optimizer adamw8bit needs bitsandbytes: pip install 'booth[8bit]'")
        for name, value in (("--save-every", self.save_every), ("--sample-every", self.sample_every),
                            ("--eval-every", self.eval_every)):  # fmt: skip
            if value is not None:
                check_int(name, value, 1)


@dataclass
class Noise:
    """How clean latents are noised for the diffusion loss, and how its rows are weighted."""

    noise_offset: float = 0.0  # (Guttenberg 2023) lets the model learn very dark and very bright images
    # multi-resolution noise discount (0: white noise); None: the noise the base model was trained with
    pyramid_noise: float | None = None
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023)

    def validate(self) -> None:
        check_number("--noise-offset", self.noise_offset)
        if self.pyramid_noise is not None:
            check_number("--pyramid-noise", self.pyramid_noise, 0.0, 1.0)
        if self.snr_gamma is not None:
            check_number("--snr-gamma", self.snr_gamma, open_low=True)


@dataclass
class TrainConfig(Loop, Noise):
    """DreamBooth: everything that defines a run; saved as RUN/args.yaml and read back by `-r`."""

    # -r may change these; every other field is the recipe, fixed once a run has started
    RESUMABLE: ClassVar = ("iterations", "save_every", "sample_every", "sample_prompt", "devices",
                           "generation_batch_size", "eval_every", "eval_metric", "dino_model", "clip_model")  # fmt: skip
    # where the inputs are, not how the model trains: left out of the hyperparameters a checkpoint records
    LOCATIONS: ClassVar = ("instance_dir", "class_dir", "model", "vae", "dino_model", "clip_model")

    learning_rate: float | None = None  # None: DREAMBOOTH_LEARNING_RATE, or LORA_LEARNING_RATE with `lora`
    class_name: str = ""
    instance_dir: str = ""
    model: str = DEFAULT_MODEL
    vae: str | None = None  # a VAE to train with (and save) instead of the model's own
    token: str = "sks"
    instance_prompt: str | None = None  # None: "a {token} {class}"
    class_prompt: str | None = None  # None: "a {class}"
    class_dir: str | None = None  # None: RUN/class-imgs
    class_img_count: int = 200
    generation_batch_size: int = 4
    hw: tuple[int, int] | None = None  # None: the base model's own size (512 for SD1)
    ddim_steps: int = 25  # how class images are sampled (booth's sampler defaults)
    sampler: str = "dpmpp_2m"
    schedule: str = "automatic"
    scale: float = 7.5
    ddim_eta: float | None = None
    lamb: float = 1.0  # prior-preservation weight; 0 turns it off
    batch_size: int = 1
    seed: int = 0
    train_text_encoder: bool = False
    precision: str | None = None  # None: fp16 on CUDA, else fp32; bf16 with bf16 weights (fused, on CUDA)
    save_precision: str = "fp16"
    # None: as --lean sets them (LEAN), else NOT_LEAN; filled in by __post_init__, so args.yaml records them
    lean: bool = False
    weights: str | None = None
    optimizer: str | None = None
    fused_backward: bool | None = None
    gradient_checkpointing: bool | None = None
    # the class images' pass after the subject's, not in one batch: half the UNet's activations, which matters
    # without gradient checkpointing. Not part of --lean: with --fused-backward the first pass's gradients would
    # all be kept for the second (SDXL at 1024x1024, --lean: 8.1 GB forecast with prior, 12.1 GB split)
    split_prior: bool = False
    cache_latents: bool = False
    sample_prompt: str | None = None  # None: the instance prompt
    flip: bool = True
    random_resize: bool = True
    color_jitter: bool = True
    devices: list[str] = field(default_factory=list)
    # LoRA: train only low-rank adapters (rank `lora`) on frozen base weights
    lora: int | None = None
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str = "attn"
    lora_text_encoder: bool = False
    # --eval-every: the scorer (None: demo for booth's demo model, else paper) and the paper's towers
    eval_metric: str | None = None
    dino_model: str = DINO_MODEL
    clip_model: str = CLIP_MODEL

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = LORA_LEARNING_RATE if self.lora else DREAMBOOTH_LEARNING_RATE
        for name, value in self.lean_parts().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in self.LOCATIONS:  # a Path from Python is recorded as the text args.yaml holds
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    def lean_parts(self) -> dict:
        """What --lean (or its absence) gives each of its parts that is not set on its own."""
        if not self.lean:
            return NOT_LEAN
        return {**LEAN, "weights": "fp32"} if self.lora else LEAN

    def lean_summary(self) -> str:
        """The line a --lean run prints: what it turned on, and what was set otherwise."""

        def flag(name, value):
            return f"--{name.replace('_', '-')}" + (
                f" {value}" if isinstance(value, str) else "" if value else " off"
            )

        parts = self.lean_parts()
        on = [flag(k, v) for k, v in parts.items() if getattr(self, k) == v and v != NOT_LEAN[k]]
        own = [flag(k, getattr(self, k)) for k, v in parts.items() if getattr(self, k) != v]
        return f"--lean: {', '.join(on) or 'nothing'}" + (
            f" (set on their own: {', '.join(own)})" if own else ""
        )

    @property
    def instance_text(self) -> str:
        return self.instance_prompt or f"a {self.token} {self.class_name}"

    @property
    def class_text(self) -> str:
        return self.class_prompt or f"a {self.class_name}"

    def sampling(self) -> Settings:
        """How class images are drawn."""
        h, w = self.hw or (None, None)
        return Settings(self.ddim_steps, self.sampler, self.schedule, self.scale, self.ddim_eta, h, w)

    def validate(self) -> None:
        if not self.class_name or not self.instance_dir:
            raise BoothError("give the subject's class with -c (e.g. -c dog) and its photos with -i FOLDER")
        for name, text in (("--class-name", self.class_name), ("--token", self.token),
                           ("--instance-prompt", self.instance_text), ("--class-prompt", self.class_text),
                           ("--sample-prompt", self.sample_prompt or "")):  # fmt: skip
            check_text(name, text)
        if not self.token.strip() or any(c.isspace() for c in self.token):
            raise BoothError(f"--token must be one word, such as sks (got {self.token!r})")
        Loop.validate(self)
        Noise.validate(self)
        check_int("--ddim-steps", self.ddim_steps, 1, MAX_STEPS)  # by the flag names of this command
        if self.ddim_eta is not None:
            check_number("--ddim-eta", self.ddim_eta)
        self.sampling().validate()
        self._validate_training()
        self._validate_lora()
        check_fields(self)  # last, so that the checks above give their own messages

    def _validate_training(self) -> None:
        check_number("--lamb", self.lamb)
        check_int("--class-img-count", self.class_img_count, 0, 100_000)
        if self.lamb > 0 and self.class_img_count == 0:
            raise BoothError("--class-img-count 0 leaves prior preservation no class images: give at least 1, "
                             "or -l 0 to train without the prior")  # fmt: skip
        check_int("--generation-batch-size", self.generation_batch_size, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0, MAX_TRAIN_SEED)
        check_choice("--precision", self.precision or "fp32", PRECISIONS)
        check_choice("--save-precision", self.save_precision, SAVE_PRECISIONS)
        check_choice("--weights", self.weights, WEIGHTS)
        if self.eval_metric is not None:
            check_choice("--eval-metric", self.eval_metric, METRICS)
        if self.weights == "bf16":
            if self.lora:
                raise BoothError("--weights bf16 is for whole networks: LoRA's adapters are a few MB and train in "
                                 "fp32 on the frozen half-precision base; leave it out with --lora")  # fmt: skip
            if self.precision not in (None, "bf16"):
                raise BoothError(WEIGHTS_BF16)
            if self.optimizer == "adamw8bit":
                raise BoothError("--weights bf16 needs --optimizer adamw or adafactor, which round each update "
                                 "stochastically; bitsandbytes' adamw8bit rounds to nearest, losing small updates")  # fmt: skip
        if self.fused_backward and self.precision in ("fp16", "autocast"):
            raise BoothError(FUSED_FP16)
        if self.hw is not None and len(self.hw) != 2:
            raise BoothError(f"--hw takes a height and a width (got {self.hw})")

    def _validate_lora(self) -> None:
        extra = [flag for flag, unset in (("--lora-alpha", self.lora_alpha is None),
                 ("--lora-targets", self.lora_targets == "attn"), ("--lora-text-encoder", not self.lora_text_encoder))
                 if not unset]  # fmt: skip
        if self.lora is None:
            if extra:
                raise BoothError(f"{', '.join(extra)} only apply with --lora RANK")
            return
        check_int("--lora (the rank)", self.lora, 1, 4096)
        if self.lora_alpha is not None:
            check_number("--lora-alpha", self.lora_alpha, open_low=True)
        check_choice("--lora-targets", self.lora_targets, LORA_TARGETS)
        if self.train_text_encoder:
            raise BoothError("-t trains the whole text encoder; with --lora use --lora-text-encoder instead")

    def resolve(self, sample_size: int, pyramid_noise: float) -> TrainConfig:
        """A copy with what was left to the base model and the sampler filled in: the training size, the training
        noise, and the class images' schedule and eta."""
        s = self.sampling().resolved()
        return dataclasses.replace(
            self,
            hw=tuple(self.hw or (sample_size, sample_size)),
            pyramid_noise=pyramid_noise if self.pyramid_noise is None else self.pyramid_noise,
            schedule=s.schedule,
            ddim_eta=s.eta,
        )

    def recipe(self) -> dict:
        """The hyperparameters a checkpoint records: every field that is neither resumable nor a location."""
        skip = (*self.RESUMABLE, *self.LOCATIONS)
        return {k: v for k, v in _plain(self).items() if k not in skip}

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "args.yaml") -> TrainConfig:
        return _from_yaml(cls, text, source)


@dataclass
class DemoRecipe:
    """What `booth train-demo` runs; the defaults reproduce the shipped demo weights."""

    seed: int = 0
    vae_steps: int = 800
    vae_lr: float = 1e-3
    vae_batch: int = 16
    kl_weight: float = 1e-5
    scenes: int = 20000  # the fixed captioned set stage 2 learns from (latents encoded once)
    unet_steps: int = 4500
    unet_lr: float = 1e-3
    unet_batch: int = 32
    snr_gamma: float = 5.0
    warmup: int = 100
    # The std latents are scaled to (SD: about 1). Below 1 the same schedule hides more of each flat shape at each
    # step; 0.57 helped img2img but made PLMS diverge at CFG 7.5, so the multi-resolution noise below does that job.
    latent_std: float = 1.0
    # White noise hides the colour of a large flat shape slowly, so img2img at strength 0.6 could read the old
    # colour of a recoloured shape and carve holes in it (7 of 16 clean circles with white noise only, 13 with 0.35).
    pyramid_noise: float = 0.35  # see booth.train.pyramid_noise

    def validate(self) -> None:
        check_int("--seed", self.seed, 0, MAX_TRAIN_SEED)
        for name in ("vae_steps", "vae_batch", "unet_steps", "unet_batch", "warmup"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), 0 if name == "warmup" else 1)
        check_int("--scenes", self.scenes, 1, 10_000_000)  # all are drawn and encoded up front
        for name in ("vae_lr", "unet_lr", "snr_gamma", "latent_std"):
            check_number(name, getattr(self, name), open_low=True)
        check_number("kl_weight", self.kl_weight)
        check_number("pyramid_noise", self.pyramid_noise, 0.0, 1.0)

    def vae_loop(self) -> Loop:
        return Loop(self.vae_steps, self.vae_lr, self.warmup, "cosine", save_every=500)

    def unet_loop(self) -> Loop:
        return Loop(self.unet_steps, self.unet_lr, self.warmup, "cosine", save_every=500, sample_every=500)

    def noise(self) -> Noise:
        return Noise(pyramid_noise=self.pyramid_noise, snr_gamma=self.snr_gamma)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe.yaml") -> DemoRecipe:
        return _from_yaml(cls, text, source)


# ----------------------------------------------------------------------------- YAML


def _plain(obj) -> dict:
    """Fields as YAML-safe values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def _from_yaml(cls, text: str, source: str):
    """A dataclass from YAML written by `to_yaml`; any damage is one line naming the file. Unknown keys (from
    an older booth) are dropped; a missing key takes today's default."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise BoothError(f"cannot read {source}: it is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise BoothError(f"cannot read {source}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown and cls is DemoRecipe:  # a recipe must reproduce a model exactly: no guessing
        raise BoothError(f"cannot read {source}: unknown setting {unknown[0]!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) and k == "hw" else v for k, v in data.items() if k in names}
    try:
        obj = cls(**{k: _typed(k, v, hints[k]) for k, v in kwargs.items()})
        obj.validate()
    except BoothError as e:
        raise BoothError(f"{source} holds a setting booth cannot use: {e}") from None
    return obj


def _typed(name: str, value: object, hint):
    """`value`, read from a file, checked against its field's annotation (a hand-edited file may say anything).
    YAML reads 1e-4 (no dot) as text; such text is taken as the number it spells."""
    if _kind(hint) is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    _check_type(name, value, hint)
    return value


def check_fields(obj) -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type: from Python, anything can reach
    any field, and a wrong type would fail far from here (a string of devices iterated letter by letter)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(f"--{f.name.replace('_', '-')}", getattr(obj, f.name), hints[f.name])


def _kind(hint):
    """The annotation without its `| None`."""
    args = typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return next((a for a in args if a is not type(None)), hint) if args and union else hint


def _check_type(name: str, value: object, hint) -> None:
    if value is None and type(None) in typing.get_args(hint):
        return
    kind = _kind(hint)
    origin, inner = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin in (tuple, list):
        ok = isinstance(value, origin if origin is list else (tuple, list)) and all(
            isinstance(v, inner[0]) and not isinstance(v, bool) for v in value
        )
    elif kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise BoothError(f"{name} should be {getattr(origin, '__name__', kind)}, not {value!r}")
