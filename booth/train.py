"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune Stable Diffusion on a few photos of a subject.

The subject is bound to a rare token inside its class ("a sks dog"), while a prior-preservation loss on images
the base model drew for the plain class ("a dog") keeps the class itself from drifting:

    loss = MSE(eps_hat, eps | instance batch) + lambda * MSE(eps_hat, eps | class batch)

Read `train()` top to bottom: the base model, the run folder, class images, batches, what trains, the loop.
`fit()` is the loop every booth task shares (the demo model trains with it too). Everything random comes from
explicit generators saved with the training state, so an interrupted run that is resumed ends with bitwise the
same weights as one that never stopped (on a deterministic device such as the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from tqdm import tqdm

from . import memory
from .atomic import (
    DiskFull,
    atomic_path,
    check_writable,
    clean_stale,
    disk_full,
    locked,
    new_run_dir,
    write_text,
)
from .checkpoint import (
    SAVE_DTYPES,
    UNET,
    NonFiniteWeights,
    file_hash,
    load_model,
    read_checkpoint,
    read_config,
    save_checkpoint,
    stored_itemsize,
    use_vae,
)
from .config import ModelConfig
from .data import Augment, Cycler, ImageSet, find_images, prepare, readable_images
from .device import autocast, out_of_memory, peak_memory_mb, pick_device, training_dtypes, training_precision
from .errors import BoothError, first_line
from .formats import CHECKPOINT_FOLDER
from .hub import find_model, find_vae
from .images import parameters_text, save_png
from .lora import adapter_state, add_lora, kohya_metadata, load_adapter_state, save_lora
from .memory import available_bytes, format_gb
from .model import encode_text, text_prefix, tokenize, unet_inputs
from .optim import Adafactor, AdamW, StepInBackward
from .options import FUSED_FP16, WEIGHT_DECAY, Loop, Noise, Settings, TrainConfig
from .pipeline import StableDiffusion
from .sampling import randn
from .tokenizer import get_tokenizer

STATE_FORMAT = 1
MEMORY_HINT = ("while training: try --lean (or its parts: --weights bf16, --fused-backward, --optimizer adafactor "
               "or adamw8bit, --gradient-checkpointing), --cache-latents, --batch-size 1 or a smaller --hw; --lora "
               "needs far less memory")  # fmt: skip


# ----------------------------------------------------------------------------- the losses


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, lamb: float,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, instance loss, prior loss). The first `n_instance` rows are the subject, the rest class images;
    `weights` (B,) are optional per-sample loss weights (min-SNR)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    zero = per_sample.new_zeros(())  # a batch of class rows only (--split-prior), or of instance rows only
    instance = per_sample[:n_instance].mean() if n_instance else zero
    prior = per_sample[n_instance:].mean() if len(per_sample) > n_instance else zero
    return instance + lamb * prior, instance, prior


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for eps prediction, / (SNR + 1) for v,
    whose loss is already (SNR + 1) times the eps loss."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def pyramid_noise(noise: torch.Tensor, gens, discount: float) -> torch.Tensor:
    """Multi-resolution noise: white noise plus noise drawn at 1/2, 1/4, ... of the size (down to one pixel),
    each level `discount` times the one above, upsampled by repetition and rescaled to unit variance.

    Plain noise hides large flat regions slowly (averaging over n pixels divides its std by sqrt(n)), so a
    model can read their colour through most of the schedule and will not repaint them. Low-frequency noise
    teaches it that such colour may be noise."""
    _, c, h, w = noise.shape
    out, variance, level = noise.clone(), 1.0, 1
    while h >> level >= 1 and w >> level >= 1:
        low = randn((len(gens), c, h >> level, w >> level), gens, noise.device)
        # nearest upsampling keeps each pixel's variance exactly discount ** (2 * level)
        out = out + discount**level * torch.nn.functional.interpolate(low, size=(h, w), mode="nearest")
        variance += discount ** (2 * level)
        level += 1
    return out / variance**0.5


def diffusion_loss(noise_cfg: Noise, x0, gens, cond, n_inst, unet, alphas_cumprod, amp, lamb: float = 1.0,
                   prediction: str = "eps"):  # fmt: skip
    """Noise clean latents at random timesteps, predict the noise (or with `prediction` "v", v = sqrt(a) * noise
    - sqrt(1 - a) * x0), and return the DreamBooth loss (the plain diffusion loss when every row is an
    "instance"). `gens` has one generator per row; `cond` the UNet's conditioning, {"context": (B, L, C)[, "y"]}
    (or the context alone)."""
    device = x0.device
    noise = randn(x0.shape, gens, device)
    if noise_cfg.noise_offset:
        offset = randn((len(gens), x0.shape[1], 1, 1), gens, device)
        noise = noise + noise_cfg.noise_offset * offset
    if noise_cfg.pyramid_noise:
        noise = pyramid_noise(noise, gens, noise_cfg.pyramid_noise)
    t = torch.cat([torch.randint(0, len(alphas_cumprod), (1,), generator=g) for g in gens]).to(device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with amp:
        pred = unet(noisy, t.float(), **({"context": cond} if isinstance(cond, torch.Tensor) else cond))
    weights = (
        min_snr_weights(alphas_cumprod[t], noise_cfg.snr_gamma, prediction) if noise_cfg.snr_gamma else None
    )
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return dreambooth_loss(pred, target, n_inst, lamb, weights)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(devices: list[str]) -> Dist:
    """One process per device under torchrun (or `-d 0 1 ...`, which starts torchrun); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=pick_device(devices[0] if devices else None))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if devices:
        device = pick_device(devices[local % len(devices)])
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def broadcast(obj, dist: Dist):
    if dist.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _wrap_ddp(module: torch.nn.Module, dist: Dist, fused: bool = False):
    """DDP over several processes; with the fused step each gradient is all-reduced in its own hook instead."""
    if dist.world == 1 or fused:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


# ----------------------------------------------------------------------------- DreamBooth, top to bottom


class Interrupted(Exception):
    """Ctrl-C: the run stopped where `-r` continues it (the message says how)."""


def train(cfg: TrainConfig, out: str | os.PathLike = "outputs", resume: str | os.PathLike | None = None,
          dist: Dist | None = None) -> Path:  # fmt: skip
    """Run DreamBooth in a new OUT/runK folder, or continue the run folder `resume`; returns the last checkpoint."""
    cfg.validate()
    dist = dist or setup_distributed(cfg.devices)  # checks the devices too
    if cfg.lean and dist.main:
        print(f"booth: {cfg.lean_summary()}", file=sys.stderr)
    found = preflight(cfg, None if resume else Path(out), warn=dist.main)
    check_memory(cfg, found.path, None if resume is None else Path(resume), dist)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with contextlib.ExitStack() as held, out_of_memory(MEMORY_HINT):
        if resume is not None:
            run = Path(resume)
            held.enter_context(_hold(run, dist))
            has_state = resume_state(run, cfg) is not None
        base = load_base(cfg, found.path, dist)  # 1. the base model
        cfg = cfg.resolve(base.sd.config.sample_size, base.sd.config.pyramid_noise)
        if resume is None:  # 2. the run folder: made only now that the base has loaded
            run, has_state = _new_run(Path(out), dist), False
            held.enter_context(_hold(run, dist))
        with _resumable(run):  # from here on, a fault the user did not cause leaves a run -r continues
            if dist.main:
                write_text(run / "args.yaml", cfg.to_yaml())  # the recipe as resolved
            class_paths = class_images(cfg, run, base, dist)  # 3. class images (only missing ones are made)
            batches = Batches(
                cfg, image_sets(cfg, class_paths), base, dist, prefetch(dist.device)
            )  # 4. batches
            task = DreamBooth(cfg, base, batches, dist)  # 5. what trains
            if cfg.eval_every and dist.main:
                task.monitor = monitor(cfg, found.path, task, run)
        return fit(task, cfg, run, dist, resume=has_state)  # 6. the loop


def eval_metric(cfg: TrainConfig, model: Path) -> str:
    from .evaluate import default_metric

    return cfg.eval_metric or default_metric(model)


def monitor(cfg: TrainConfig, model: Path, task: DreamBooth, run: Path):
    """--eval-every's scorer over a small prompt set, rendering with the weights being trained."""
    from . import evaluate as ev
    from .metrics import without_identifier

    metric = eval_metric(cfg, model)
    scorer = (ev.DemoScorer(cfg.class_name) if metric == "demo"
              else ev.PaperScorer(cfg.dino_model, cfg.clip_model, task.sd.device))  # fmt: skip
    prompts = ev.training_prompts(f"{cfg.token} {cfg.class_name}", cfg.class_name, metric)
    plan = ev.Plan(prompts, cfg.class_text, [cfg.seed, cfg.seed + 1], cfg.sampling())
    texts = [without_identifier(p, cfg.token) for p in prompts]
    return ev.Monitor(task.render, scorer, plan, texts, find_images(cfg.instance_dir, "instance", warn=False),
                      run / "eval")  # fmt: skip


def preflight(cfg: TrainConfig, out: Path | None, warn: bool = True):
    """Every check that needs no weights: the base model is a model (fetched now if it is on the Hub), the photos
    are there (with a warning, if `warn`, naming the files that are not), the class folder is a folder, and a new
    run has somewhere to go."""
    found = find_model(cfg.model, "-m")
    find_images(cfg.instance_dir, "instance", warn=warn)
    if cfg.vae is not None:  # the VAE is checked against the model (from the headers) before a run exists
        use_vae(read_checkpoint(found.path, lazy=True), find_vae(cfg.vae), lazy=True)
    if cfg.eval_every and eval_metric(cfg, found.path) == "paper":
        from .hub import find_tower  # the towers are found (or fetched) before any run folder is made

        find_tower(cfg.dino_model, "--dino-model")
        find_tower(cfg.clip_model, "--clip-model")
    if cfg.class_dir and Path(cfg.class_dir).exists() and not Path(cfg.class_dir).is_dir():
        raise BoothError(f"--class-dir {cfg.class_dir} is a file; give a folder (it is created if missing)")
    if out is not None:
        if (out / "args.yaml").is_file():
            raise BoothError(
                f"{out} is already a run folder; resume it with -r {out}, or give -o a parent folder"
            )
        check_writable(out)
    return found


def _new_run(out: Path, dist: Dist) -> Path:
    run = new_run_dir(out) if dist.main else None
    if dist.main:
        print(f"booth: DreamBooth run in {run}", file=sys.stderr)
    return Path(broadcast(str(run) if run else None, dist))


@contextlib.contextmanager
def _hold(run: Path, dist: Dist) -> Iterator[None]:
    """The run folder's lock (held by the main process), and the temporaries a killed run left cleaned up."""
    if not dist.main:
        yield
        return
    with locked(run, "a training run"):
        clean_stale(run, recursive=True)
        yield


@contextlib.contextmanager
def _resumable(run: Path) -> Iterator[None]:
    """Ctrl-C or a full disk before the first step: the run folder is there, so the way on is -r."""
    command = f"booth dreambooth -r {run}"
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"stopped before the first step; continue with: {command}") from None
    except DiskFull as e:
        raise DiskFull(e.path, f"continue with {command}") from None


@dataclass
class Base:
    """The base model on the device: the UNet in fp32 (or with --weights bf16, bf16) unless LoRA trains, the frozen
    networks in half precision; and what saving needs of the base file (`file`)."""

    sd: StableDiffusion
    amp_dtype: torch.dtype | None
    file: dict


def load_base(cfg: TrainConfig, path: Path, dist: Dist) -> Base:
    device = dist.device
    amp_dtype, frozen, master = run_dtypes(cfg, device)
    ckpt = read_checkpoint(path)
    if cfg.vae is not None:
        use_vae(ckpt, find_vae(cfg.vae))
    base_hash = file_hash(path) if path.is_file() else ""
    # Frozen networks are saved as the base had them; their device copies hold exactly those values unless
    # they were rounded to a half precision other than the one checkpoints are saved in.
    lossy = _lossy(cfg, frozen)
    file = {"dtypes": {k: v.dtype for k, v in ckpt.state_dict.items()}, "hash": base_hash, "name": ckpt.name,
            "originals": {k: v for k, v in ckpt.state_dict.items() if lossy and not k.startswith(UNET)}}  # fmt: skip
    model = load_model(ckpt, device, None)
    for name, dtype in network_dtypes(cfg, frozen, master).items():
        getattr(model, name).to(dtype)
    return Base(StableDiffusion(model, device, frozen, ckpt.name, base_hash), amp_dtype, file)


def run_dtypes(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.dtype, torch.dtype]:
    """(autocast dtype or None, dtype of the frozen networks, dtype of the trained weights)."""
    precision = training_precision(cfg.precision, device, cfg.fused_backward, cfg.weights)
    amp_dtype, frozen = training_dtypes(precision, device)
    return amp_dtype, frozen, torch.bfloat16 if cfg.weights == "bf16" else torch.float32


def parks_text_encoder(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a frozen text encoder leaves the GPU once the prompts are encoded (SDXL's two hold 1.6 GB in fp16):
    while the class images are sampled (_prompt_kept), and for the whole training, the previews running it in
    host memory."""
    return device.type == "cuda" and not (cfg.train_text_encoder or (cfg.lora and cfg.lora_text_encoder))


def network_dtypes(cfg: TrainConfig, frozen: torch.dtype, master: torch.dtype) -> dict[str, torch.dtype]:
    """Each network's dtype on the device: LoRA trains adapters on a frozen UNet."""
    return {"unet": frozen if cfg.lora else master, "vae": frozen,
            "text_encoder": master if cfg.train_text_encoder else frozen}  # fmt: skip


def _lossy(cfg: TrainConfig, frozen: torch.dtype) -> bool:
    return not cfg.lora and frozen not in (torch.float32, _save_dtype(cfg))  # LoRA files hold no base


def _save_dtype(cfg: TrainConfig) -> torch.dtype:
    return SAVE_DTYPES[cfg.save_precision]


# ----------------------------------------------------------------------------- class images


def class_images(cfg: TrainConfig, run: Path, base: Base, dist: Dist) -> list[Path]:
    """`--class-dir` images as they are (topped up to --class-img-count if it has fewer), else RUN/class-imgs.
    Only missing images are generated, so an interrupted generation resumes; each device renders its share."""
    if cfg.lamb == 0:  # no prior preservation: class images would play no part
        return []
    folder = Path(cfg.class_dir) if cfg.class_dir else run / "class-imgs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BoothError(f"cannot make the class image folder {folder}: {e.strerror or e}") from None
    todo = _missing_class_images(cfg, folder)
    dist.barrier()  # every device has listed the folder before any of them writes to it
    if todo:
        try:
            _generate_class_images(cfg, folder, todo, base, dist)
        except KeyboardInterrupt:
            raise Interrupted(
                f"stopped while making class images; continue with: booth dreambooth -r {run}"
            ) from None
    dist.barrier()
    return find_images(folder, "class", warn=dist.main)[: cfg.class_img_count]


def _missing_class_images(cfg: TrainConfig, folder: Path) -> list[int]:
    """The indices of the class images to make: the first free names, as many as the folder is short of."""
    have = readable_images(folder)[0] if folder.is_dir() else []
    names = {p.name for p in have}
    missing = [i for i in range(cfg.class_img_count) if f"{i:04d}.png" not in names]
    return missing[: max(0, cfg.class_img_count - len(have))]


def _generate_class_images(cfg: TrainConfig, folder: Path, todo: list[int], base: Base, dist: Dist) -> None:
    """Image i is rendered in the batch of the indices i // generation_batch_size holds, whichever of them are
    missing: a batch's arithmetic depends on its size, so a remade image then has the bytes it had. The batches
    are shared out over the devices."""
    sd, amp = base.sd, autocast(dist.device, base.amp_dtype)
    s = sd.resolve(cfg.sampling())
    gb, wanted = cfg.generation_batch_size, set(todo)
    blocks = sorted({i // gb for i in todo})[dist.rank :: dist.world]
    mine = [i for i in todo if i // gb in blocks]
    bar = tqdm(total=len(mine), desc=f"class images ({dist.rank})" if dist.world > 1 else "class images",
               unit="img", file=sys.stderr, disable=not mine)  # fmt: skip
    seed0 = cfg.seed + 1_000_000  # keep class-image seeds apart from preview seeds
    with bar, _prompt_kept(sd, cfg, s, amp, dist.device):
        for block in blocks:
            batch = list(range(block * gb, min((block + 1) * gb, cfg.class_img_count)))
            with amp:
                images = sd.txt2img(cfg.class_text, "", [seed0 + i for i in batch], s)
            for i, image in zip(batch, images):
                if i in wanted:
                    save_png(
                        image, folder / f"{i:04d}.png", parameters_text(sd, cfg.class_text, "", s, seed0 + i)
                    )
            bar.update(len([i for i in batch if i in wanted]))


@contextlib.contextmanager
def _prompt_kept(sd, cfg: TrainConfig, s, amp, device: torch.device) -> Iterator[None]:
    """Where a frozen text encoder is parked (parks_text_encoder), the class prompt is encoded once and the
    encoder waits in host memory while the images are sampled (SDXL's two: 1.6 GB of the GPU in fp16); it comes
    back for the training prompts, which it encodes where it always does, so a run's bytes do not depend on
    whether it made class images."""
    if not parks_text_encoder(cfg, device):
        yield
        return
    with sd.prompts_kept():
        try:
            with amp:
                sd.encode_prompt(cfg.class_text, "", s.clip_skip)
            sd.model.text_encoder.to("cpu")
            yield
        finally:
            sd.model.text_encoder.to(device)


def prefetch(device: torch.device) -> bool:
    """Whether the next micro-batch is augmented while the step runs: on a GPU, where the CPU is otherwise idle;
    on the CPU the worker thread would only compete with the step for the same cores."""
    return device.type == "cuda"


def image_sets(cfg: TrainConfig, class_paths: list[Path]) -> dict[str, ImageSet]:
    aug = Augment(flip=cfg.flip, resize=cfg.random_resize, jitter=cfg.color_jitter)
    sets = {"instance": ImageSet(find_images(cfg.instance_dir, "instance", warn=False), tuple(cfg.hw), aug)}
    if class_paths:
        sets["class"] = ImageSet(class_paths, tuple(cfg.hw), aug)
    return sets


# ----------------------------------------------------------------------------- batches


@dataclass
class _Drawn:
    """One micro-batch's CPU part (`Batches._draw`), and the data generators' state once it was drawn."""

    gens: list[torch.Generator]
    n_inst: int
    pixels: torch.Tensor | None  # the augmented images (None with cached latents)
    rows: list | None  # with cached latents, each row's posterior moments
    state: tuple[torch.Tensor, dict]


class Batches:
    """Micro-batches of clean latents. Indices and per-image seeds are drawn for the *global* batch (all devices)
    from shared generators and each device takes its slice, so N devices see exactly what one device would with
    an N-times larger batch. Each image's own generator then drives its augmentation, posterior sample, noise
    and timestep, in that order.

    With `prefetch` the next micro-batch is drawn and augmented on a worker thread while the device runs the
    step (on this host's CPU, augmenting one 512x512 photo takes ~170 ms). It draws from copies of the
    generators, which become the batches' own only when that batch is taken, so the state saved for a resume is
    always that of the batches used, and a run draws the same batches with or without prefetching."""

    def __init__(
        self, cfg: TrainConfig, sets: dict[str, ImageSet], base: Base, dist: Dist, prefetch: bool = False
    ):
        self.cfg, self.sets, self.dist = cfg, sets, dist
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.vae, self.scale_factor, self.dtype = (
            base.sd.model.vae,
            base.sd.config.scale_factor,
            base.sd.dtype,
        )
        self.cyclers = {kind: Cycler(len(images), self.gen) for kind, images in sets.items()}
        self.cache = self._encode_all() if cfg.cache_latents else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="booth-batches") if prefetch else None
        self._ahead: Future | None = None
        if self._pool is not None:  # its thread ends with the batches, not with the process
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def next(self) -> tuple[torch.Tensor, list[torch.Generator], int]:
        """(x0 (B, 4, h, w) with instance rows first, one generator per row, number of instance rows)."""
        drawn = self._ahead.result() if self._ahead is not None else self._draw(*self._fork())
        self.gen.set_state(drawn.state[0])  # taken: its generators' state is now the batches' own
        for kind, state in drawn.state[1].items():
            self.cyclers[kind].load_state_dict(state)
        if self._pool is not None:
            self._ahead = self._pool.submit(self._draw, *self._fork())
        if self.cache is not None:
            mean, std = torch.stack([r[0] for r in drawn.rows]), torch.stack([r[1] for r in drawn.rows])
        else:
            mean, std = self._encode(drawn.pixels)
        noise = randn(mean.shape, drawn.gens, mean.device)
        return (mean + std * noise) * self.scale_factor, drawn.gens, drawn.n_inst

    def _fork(self) -> tuple[torch.Generator, dict[str, Cycler]]:
        gen = torch.Generator()
        gen.set_state(self.gen.get_state())
        cyclers = {kind: Cycler(c.n, gen) for kind, c in self.cyclers.items()}
        for kind, c in cyclers.items():
            c.load_state_dict(self.cyclers[kind].state_dict())
        return gen, cyclers

    def _draw(self, gen: torch.Generator, cyclers: dict[str, Cycler]) -> _Drawn:
        b, n = self.cfg.batch_size, self.cfg.batch_size * self.dist.world
        picks = {kind: c.take(n) for kind, c in cyclers.items()}
        seeds = torch.randint(0, 2**62, (n * len(picks),), generator=gen).tolist()
        mine = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        items = [(kind, i) for kind in picks for i in picks[kind][mine]]
        local_seeds = [s for k in range(len(picks)) for s in seeds[k * n : (k + 1) * n][mine]]
        gens = [torch.Generator().manual_seed(s) for s in local_seeds]
        state = (gen.get_state(), {kind: c.state_dict() for kind, c in cyclers.items()})
        if self.cache is not None:  # cached: only the flip is random
            flips = [self.cfg.flip and torch.rand((), generator=g).item() < 0.5 for g in gens]
            rows = [self.cache[kind][i, int(f)] for (kind, i), f in zip(items, flips)]
            return _Drawn(gens, len(picks["instance"][mine]), None, rows, state)
        pixels = torch.cat([self.sets[kind].batch([i], g) for (kind, i), g in zip(items, gens)])
        return _Drawn(gens, len(picks["instance"][mine]), pixels, None, state)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior moments, one image at a time: the VAE's full-resolution activations (1.35 GB for one SDXL
        image at 1024x1024 in bf16) would otherwise be the step's peak with prior preservation."""
        device = next(self.vae.parameters()).device
        moments = [self.vae.encode(x[None].to(device, self.dtype)) for x in images]
        mean, logvar = (torch.cat(m) for m in zip(*moments))
        return mean.float(), torch.exp(0.5 * logvar.float())

    def _encode_all(self) -> dict[str, torch.Tensor]:
        """Posterior moments of every image, plain and flipped: (N, 2 [flip], 2 [mean, std], 4, h, w)."""
        cache = {}
        for kind, images in self.sets.items():
            rows = []
            for k in range(len(images)):
                x = prepare(images.images[k], images.size)[None]
                mean, std = self._encode(torch.cat([x, x.flip(-1)]))
                rows.append(torch.stack([torch.stack([mean[j], std[j]]) for j in range(2)]))
            cache[kind] = torch.stack(rows)
        return cache

    def state_dict(self) -> dict:
        return {kind: c.state_dict() for kind, c in self.cyclers.items()}

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None  # drawn from the state before this one
        for kind, c in self.cyclers.items():
            c.load_state_dict(state[kind])


# ----------------------------------------------------------------------------- the DreamBooth task


class DreamBooth:
    """The DreamBooth task for `fit` (see `Task`): the UNet (and with -t the text encoder) or LoRA adapters on
    them, trained on instance and class batches."""

    def __init__(self, cfg: TrainConfig, base: Base, batches: Batches, dist: Dist):
        self.cfg, self.base, self.batches = cfg, base, batches
        self.sd, self.model = base.sd, base.sd.model
        self.amp_dtype, self.amp = base.amp_dtype, autocast(dist.device, base.amp_dtype)
        self.gens = {"data": batches.gen}
        if cfg.weights == "bf16":  # the same seed on every process, so that DDP replicas round alike
            self.gens["rounding"] = torch.Generator(dist.device).manual_seed(cfg.seed)
        self.memory_hint = MEMORY_HINT + (", or drop -t" if cfg.train_text_encoder else "")
        self.model.unet.gradient_checkpointing = cfg.gradient_checkpointing
        self.model.unet.train()
        self.lora, self.params = trainable(self.model, cfg)
        self.unet = _wrap_ddp(self.model.unet, dist, cfg.fused_backward)
        self.alphas_cumprod = self.sd.schedule.alphas_cumprod.to(dist.device)
        self.encode_text = self._prompts(dist)
        self.meta = self._metadata()
        self.monitor = None  # booth.evaluate.Monitor with --eval-every, on the main process
        self.passes = 2 if cfg.split_prior and cfg.lamb > 0 else 1  # each micro-batch's backward passes
        self._class_rows = None  # with --split-prior: the micro-batch's class rows, for its second pass

    def _prompts(self, dist: Dist) -> Callable[[], dict[str, torch.Tensor]]:
        """The UNet's conditioning of the instance and class prompts (2 rows): encoded once, unless the text
        encoder trains."""
        ids = self.sd.tokenize([self.cfg.instance_text, self.cfg.class_text]).to(dist.device)
        size = tuple(self.cfg.hw)
        if self.cfg.train_text_encoder or (self.cfg.lora and self.cfg.lora_text_encoder):
            text_encoder = _wrap_ddp(self.model.text_encoder, dist, self.cfg.fused_backward)
            return lambda: _encode(text_encoder, ids, self.amp, size)
        with torch.no_grad():
            fixed = _encode(self.model.text_encoder, ids, self.amp, size)
        if parks_text_encoder(self.cfg, dist.device):  # its work is done: previews run it on the host
            self.model.text_encoder.to("cpu")
        return lambda: fixed

    def _metadata(self) -> dict[str, str]:
        """A checkpoint's header: booth's recipe, plus for a LoRA the kohya entries A1111, ComfyUI and civitai read."""
        cfg, file = self.cfg, self.base.file
        meta = {"booth.base_model": str(cfg.model), "booth.base_hash": file["hash"],
                "booth.instance_prompt": cfg.instance_text, "booth.class_prompt": cfg.class_text,
                "booth.train": json.dumps(cfg.recipe())}  # fmt: skip
        if self.lora is None:
            return meta
        alpha = cfg.lora_alpha or cfg.lora
        local = Path(
            cfg.model
        )  # a local base is recorded absolute, so `txt2img -c RUN/ckpts` finds it from anywhere
        return {**meta, **kohya_metadata(cfg.lora, alpha, cfg.lora_targets, file["name"], self.model.config),
                "booth.base_model": str(local.resolve()) if local.exists() else cfg.model,
                "booth.lora_rank": str(cfg.lora), "booth.lora_alpha": str(float(alpha)),
                "booth.lora_targets": cfg.lora_targets, "booth.lora_text_encoder": str(cfg.lora_text_encoder),
                "ss_resolution": str(tuple(cfg.hw)), "ss_learning_rate": str(cfg.learning_rate)}  # fmt: skip

    def losses(self) -> dict[str, torch.Tensor]:
        """One pass: the micro-batch, or with --split-prior its instance rows, then (the next call) its class
        rows. Each row's own generator draws its noise and timestep, so the rows see the same either way."""
        if self._class_rows is not None:
            (x0, image_gens), self._class_rows = self._class_rows, None
            n_inst = 0
        else:
            x0, image_gens, n_inst = self.batches.next()
            if self.passes == 2:
                self._class_rows = x0[n_inst:], image_gens[n_inst:]
                x0, image_gens = x0[:n_inst], image_gens[:n_inst]
        cond = _rows(self.encode_text(), n_inst, len(x0))  # the instance prompt's, then the class prompt's
        loss, inst, prior = diffusion_loss(self.cfg, x0, image_gens, cond, n_inst, self.unet, self.alphas_cumprod,
                                           self.amp, self.cfg.lamb, self.sd.config.prediction)  # fmt: skip
        return {"loss": loss, "instance_loss": inst, "prior_loss": prior}

    def save(self, run: Path, step: int) -> Path:
        path = run / CHECKPOINT_FOLDER / f"step-{step:06d}.safetensors"
        path.parent.mkdir(exist_ok=True)
        if self.lora is None:
            return save_model(
                path, self.model, self.cfg, {**self.meta, "booth.step": str(step)}, self.base.file
            )
        meta = {**self.meta, "booth.step": str(step), "ss_steps": str(step)}
        return save_lora(self.lora, path, self.model.config, _save_dtype(self.cfg), meta)

    def state_dict(self) -> dict:
        if self.lora is not None:  # only the adapters: the frozen base is the base file
            return {"lora": adapter_state(self.lora), "data": self.batches.state_dict()}
        state = {"unet": self.model.unet.state_dict(), "data": self.batches.state_dict()}
        if self.cfg.train_text_encoder:
            state["text_encoder"] = self.model.text_encoder.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.lora is not None:
            load_adapter_state(self.lora, state["lora"])
        else:
            self.model.unet.load_state_dict(state["unet"])
            if self.cfg.train_text_encoder:
                self.model.text_encoder.load_state_dict(state["text_encoder"])
        self.batches.load_state_dict(state["data"])

    def preview(self, run: Path, step: int) -> None:
        """Fixed-seed samples of the current weights, so runs and steps can be compared by eye."""
        h, w = self.cfg.hw
        folder = run / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        images = self.render(self.cfg.sample_prompt or self.cfg.instance_text, [self.cfg.seed, self.cfg.seed + 1],
                             Settings(height=h, width=w))  # fmt: skip
        for i, image in enumerate(images):
            save_png(image, folder / f"{i:04d}.png")

    def render(self, prompt: str, seeds: list[int], settings: Settings) -> list:
        """Images of the weights as they are now."""
        self.model.unet.eval()
        try:
            with self.amp:
                return self.sd.txt2img(prompt, "", seeds, settings)
        finally:
            self.model.unet.train()

    def evaluate(self, run: Path, step: int) -> dict[str, float]:
        return self.monitor.score(step) if self.monitor else {}

    def conclude(self, run: Path, step: int) -> None:
        """--eval-every's verdict: the best of what was scored, in RUN/best.txt and RUN/eval/report.html."""
        if self.monitor is None:
            return
        steps = {
            p: p.stem.removeprefix("step-") for p in (run / CHECKPOINT_FOLDER).glob("step-*.safetensors")
        }
        ckpts = {int(n): p for p, n in steps.items() if n.isdigit() and int(n) <= step}
        recipe = (run / "args.yaml").read_text(encoding="utf-8") if (run / "args.yaml").is_file() else None
        doc = self.monitor.conclude(run, Path(self.cfg.model), ckpts, recipe)
        if doc is not None:
            print(f"booth: best checkpoint: {doc['best']} ({doc['rule']}); {run / 'best.txt'}, "
                  f"{run / 'eval' / 'report.html'}", file=sys.stderr)  # fmt: skip


def trainable(model, cfg: TrainConfig) -> tuple[dict | None, list[torch.Tensor]]:
    """(the LoRA adapters or None, the parameters that train): the UNet, and with -t the text encoder, or with
    --lora only the adapters, every base weight frozen."""
    lora = None
    if cfg.lora:
        lora = add_lora(model, cfg.lora, cfg.lora_alpha or cfg.lora, cfg.lora_targets, cfg.lora_text_encoder,
                        cfg.seed)  # fmt: skip
        params = [p for layer in lora.values() for p in (layer.down.weight, layer.up.weight)]
    else:
        params = list(model.unet.requires_grad_(True).parameters())
    if cfg.train_text_encoder:
        model.text_encoder.requires_grad_(True).train()
        params += list(model.text_encoder.parameters())
    return lora, params


def _encode(text_encoder, ids: torch.Tensor, amp, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Token ids -> the UNet's conditioning for images of `size` (h, w); through the module's own forward,
    so DDP sees the call."""
    with amp:
        return unet_inputs(encode_text(text_encoder, ids), size)


def _rows(cond: dict[str, torch.Tensor], n_inst: int, rows: int) -> dict[str, torch.Tensor]:
    """Two prompts' conditioning -> `rows` rows: the first prompt's `n_inst` times, then the second's."""
    return {k: torch.cat([v[:1].expand(n_inst, *v.shape[1:]), v[1:2].expand(rows - n_inst, *v.shape[1:])])
            for k, v in cond.items()}  # fmt: skip


def save_model(path: Path, model, cfg: TrainConfig, meta: dict, file: dict) -> Path:
    """A complete SD1 single file in the CompVis layout. `file` describes the base file: its dtypes, and its
    frozen tensors when the copies on the device were rounded below them."""
    dtype = _save_dtype(cfg)
    sd, text = {UNET + k: v for k, v in model.unet.state_dict().items()}, text_prefix(model.config)
    trained_te = cfg.train_text_encoder
    if trained_te:
        sd.update({text + k: v for k, v in model.text_encoder.state_dict().items()})
    dtypes = dict.fromkeys(sd, dtype)
    frozen = [("first_stage_model.", model.vae)] + ([] if trained_te else [(text, model.text_encoder)])
    for prefix, module in frozen:  # untouched networks: the base's values, never stored above its precision
        for k, v in module.state_dict().items():
            k = prefix + k
            was = file["dtypes"][k]
            sd[k] = file["originals"].get(k, v)
            dtypes[k] = was if was.itemsize < dtype.itemsize else dtype
    save_checkpoint(
        sd, path, metadata=meta, config=model.config, dtype=dtypes
    )  # each converted as it is written
    return path


# ----------------------------------------------------------------------------- the memory forecast


@dataclass
class Forecast:
    """What a run allocates on its device at its peak, in bytes: the weights, the optimizer's state, and the
    largest of the phases on top of them (the training step's gradients and activations, the preview and class
    images' sampling, the checkpoint's copies while it is written); on the CPU also the host copies (`host`:
    the decoded photos, and the base's frozen tensors kept for saving when the device holds them rounded)."""

    weights: int
    optimizer: int
    step: int
    sampling: int
    save: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.host + max(self.sampling, self.optimizer + max(self.step, self.save))

    def describe(self) -> str:
        parts = (("weights", self.weights), ("optimizer", self.optimizer), ("step", self.step))
        return ", ".join(f"{name} {n / 1e9:.2f}" for name, n in parts)


def forecast(cfg: TrainConfig, config: ModelConfig, device: torch.device, itemsize: int = 4, photos: int = 0,
             generate: bool = True) -> Forecast:  # fmt: skip
    """The memory a run of `cfg` (resolved: its size known) needs on `device`, from the model's config alone. The
    step is traced on fake tensors (memory.LiveBytes), so autograd's saved tensors, checkpointing, autocast's
    cast weights and the gradients are counted as the step makes them; the optimizer by stepping one fake
    parameter of each shape. `itemsize`: the base file's bytes per weight; `photos`: how many; `generate`:
    whether class images are to be made."""
    amp, frozen, master = run_dtypes(cfg, device)
    dtypes = network_dtypes(cfg, frozen, master)
    mode = FakeTensorMode()
    # autocast changes nothing where every network is in its dtype already: trace on the faster meta device
    mixed = amp is not None and (cfg.lora or any(d != amp for d in dtypes.values()))
    model = memory.fake_model(config, dtypes, mode if mixed else None)
    with mode if mixed else contextlib.nullcontext():
        _, params = trainable(model, cfg)
    state, transient = _optimizer_forecast(cfg, params, mode, device)
    peak, end = _trace_step(cfg, model, params, amp, mode if mixed else contextlib.nullcontext(), device)
    h, w = cfg.hw
    sampling = memory.sampling_bytes(config, h, w, cfg.generation_batch_size, frozen.itemsize, cfg.scale != 1,
                                     encode=False) if generate else 0  # fmt: skip
    if cfg.sample_every:  # the previews (two images) sample beside the optimizer's state
        peak = max(peak, memory.sampling_bytes(config, h, w, 2, frozen.itemsize, True, encode=False))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if parks_text_encoder(cfg, device):  # on the device only while it encodes the prompts (_prompt_kept)
        text = sum(p.numel() * p.element_size() for p in model.text_encoder.parameters())
        weights, sampling = weights - text, max(sampling, text)
    out = Forecast(weights, state, peak + transient if cfg.fused_backward else max(peak, end + transient),
                   sampling)  # fmt: skip
    if device.type == "cpu":  # what the run keeps in host memory is on the device too
        out.save, out.host = _host_bytes(cfg, model, frozen, itemsize, photos)
    return out


def check_memory(cfg: TrainConfig, path: Path, run: Path | None, dist: Dist) -> Forecast | None:
    """Print what the run (a new one, or `run` resumed) needs on its device and what is free there, from the
    base's header alone; refuse a CUDA run that cannot fit, naming the flags with which it would."""
    cfg, config, inputs = forecast_inputs(cfg, path, run)
    try:
        need = forecast(cfg, config, dist.device, **inputs)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # e.g. an op it cannot trace
        if dist.main:  # the forecast only advises: the run goes on without it
            print(f"booth: warning: no memory forecast ({first_line(e, 200)})", file=sys.stderr)
        return None
    free = available_bytes(dist.device)
    base = memory.resident_bytes() if dist.device.type == "cpu" else 0  # the process as it is now
    if dist.main:
        room = f"; {format_gb(free)} free" if free is not None else ""
        print(f"booth: this run needs about {format_gb(base + need.total, 2)} on {dist.device} ({need.describe()} GB"
              f"{room})", file=sys.stderr)  # fmt: skip
    if free is not None and need.total > free:
        ways = _ways_to_fit(cfg, config, dist.device, inputs, free)
        advice = (
            f"it would fit with {' or '.join(ways)}" if ways else MEMORY_HINT.removeprefix("while training: ")
        )
        message = f"this run needs about {format_gb(need.total)} on {dist.device}, and {format_gb(free)} is free: {advice}"
        if dist.device.type == "cuda":
            raise BoothError(message)
        if dist.main:
            print(f"booth: warning: {message}", file=sys.stderr)
    return need


def forecast_inputs(
    cfg: TrainConfig, path: Path, run: Path | None = None
) -> tuple[TrainConfig, ModelConfig, dict]:
    """(the run resolved against its base, the base's config, `forecast`'s other arguments), from the base's
    header, the photos and the class folder (a new run's, or that of `run` resumed)."""
    config = read_config(path)
    cfg = cfg.resolve(config.sample_size, config.pyramid_noise)
    folder = Path(cfg.class_dir) if cfg.class_dir else run / "class-imgs" if run else None
    generate = cfg.lamb > 0 and (folder is None or bool(_missing_class_images(cfg, folder)))
    photos = len(find_images(cfg.instance_dir, "instance", warn=False))
    return cfg, config, dict(itemsize=stored_itemsize(path), generate=generate, photos=photos)


# Changes that lower what a run needs, the least change to what is learnt first
FITTING = (("--gradient-checkpointing", dict(gradient_checkpointing=True)),
           ("--lean", dict(lean=True, weights=None, fused_backward=None, optimizer=None, gradient_checkpointing=None)),
           ("--lora 16 --gradient-checkpointing", dict(lora=16, lean=False, weights="fp32", fused_backward=False,
                                                       optimizer="adamw", gradient_checkpointing=True)))  # fmt: skip


def _ways_to_fit(cfg: TrainConfig, config: ModelConfig, device, inputs: dict, free: int) -> list[str]:
    """The changes of FITTING (each with --batch-size 1 too, where the batch is larger) whose forecast fits."""
    ways = []
    for flags, change in FITTING:
        for batch in dict.fromkeys((cfg.batch_size, 1)):
            try:
                other = dataclasses.replace(cfg, **change, batch_size=batch)
                other.validate()
            except BoothError:
                break  # the change does not combine with this run's other flags
            if other != cfg and forecast(other, config, device, **inputs).total <= free:
                ways.append(flags + ("" if batch == cfg.batch_size else " --batch-size 1"))
                break
    return ways


def _optimizer_forecast(cfg: TrainConfig, params: list, mode, device: torch.device) -> tuple[int, int]:
    """(the optimizer's state, the temporaries of its step)."""
    if cfg.optimizer == "adamw8bit":  # bitsandbytes' kernels do not run on fake tensors
        return memory.adamw8bit_state_bytes(params), 0
    generator = torch.Generator() if cfg.weights == "bf16" else None
    state, transient = memory.optimizer_bytes(partial(_optimizer, cfg, generator=generator), params, mode)
    if (
        device.type == "cuda"
        and cfg.optimizer == "adamw"
        and cfg.weights != "bf16"
        and not cfg.fused_backward
    ):
        # torch's AdamW steps every CUDA tensor at once (foreach), with one temporary the size of a moment
        transient = max(transient, state // 2)
    return state, transient


def _trace_step(cfg: TrainConfig, model, params: list, amp_dtype, mode, on: torch.device) -> tuple[int, int]:
    """(peak, end) bytes of the activations and gradients of one optimizer step, beyond the weights: the VAE
    encode, then up to two micro-batches (the second finds the first's gradients accumulated). CPU autocast's
    policy stands in for the device's; on (`on`) a CPU, convolutions hold a workspace (memory.cpu_workspace)."""
    (h, w), f, n = cfg.hw, model.config.vae.downscale, cfg.batch_size
    split = cfg.split_prior and cfg.lamb > 0  # the class rows' pass after the instance rows'
    rows = n * (2 if cfg.lamb > 0 and not split else 1)
    micro = min(cfg.grad_accum * (2 if split else 1), 2)
    model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    model.unet.train()
    armed = [False]  # the fused step frees each gradient once used, in the last micro-batch only
    drop = partial(_drop_grad, armed)
    hooks = [p.register_post_accumulate_grad_hook(drop) for p in params if cfg.fused_backward]
    amp = autocast(torch.device("cpu"), amp_dtype)
    device = next(model.parameters()).device
    workspace = memory.cpu_workspace if on.type == "cpu" else None
    with mode, torch.device(device), memory.LiveBytes(model.parameters(), workspace) as live:
        with torch.no_grad():  # one image at a time, as Batches encodes them
            model.vae.encode(torch.empty(1, 3, h, w, dtype=next(model.vae.parameters()).dtype))
        ids = tokenize(get_tokenizer(), model.config, ["", ""])
        alphas = torch.linspace(0.999, 0.001, model.config.num_train_timesteps)
        for i in range(micro):
            armed[0] = i == micro - 1
            grad = cfg.train_text_encoder or bool(cfg.lora and cfg.lora_text_encoder)
            with torch.set_grad_enabled(grad):
                cond = _rows(_encode(model.text_encoder, ids, amp, (h, w)), n, rows)
            x0, gens = torch.empty(rows, 4, h // f, w // f), [torch.Generator() for _ in range(rows)]
            loss = diffusion_loss(
                cfg, x0, gens, cond, n, model.unet, alphas, amp, cfg.lamb, model.config.prediction
            )[0]
            loss.backward()
            del loss, cond
        for handle in hooks:
            handle.remove()
        return live.peak, live.live


def _drop_grad(armed: list[bool], p: torch.Tensor) -> None:
    if armed[0]:  # the fused step has used the gradient
        p.grad = None


def _host_bytes(
    cfg: TrainConfig, model, frozen: torch.dtype, file_itemsize: int, photos: int
) -> tuple[int, int]:
    """(a checkpoint's copy of a tensor while it is written, what stays in host memory: the decoded photos and
    class images, and the base's frozen tensors `load_base` keeps when the device rounds them)."""
    save = _save_dtype(cfg)
    trained = [model.unet] + ([model.text_encoder] if cfg.train_text_encoder else [])
    kept = [model.vae] + ([] if cfg.train_text_encoder else [model.text_encoder])
    originals = (
        sum(p.numel() for m in kept for p in m.parameters()) * file_itemsize if _lossy(cfg, frozen) else 0
    )
    # a checkpoint converts one tensor at a time as it writes it (checkpoint.write_safetensors): its copy, and
    # isfinite's |x| and three masks
    largest = max(p.numel() for m in trained for p in m.parameters())
    copies = 0 if cfg.lora else largest * (2 * save.itemsize + 3)
    h, w = cfg.hw
    images = 3 * h * w * ((cfg.class_img_count if cfg.lamb > 0 else 0) + photos)  # RGB, 8 bits each
    return copies, originals + images


# ----------------------------------------------------------------------------- the loop


class Task(Protocol):
    """What `fit` trains. DreamBooth above is one; booth.demo's autoencoder and text-to-image stages are others."""

    params: list[torch.Tensor]  # what the optimizer updates
    # every generator the task draws from, saved with the state; with "rounding", bf16 weights are rounded
    # stochastically from it
    gens: dict[str, torch.Generator]
    amp_dtype: torch.dtype | None  # autocast dtype (fp16 turns on loss scaling); None: plain fp32
    memory_hint: str  # the out-of-memory message's advice: "while training: try ..."

    def losses(self) -> dict[str, torch.Tensor]:
        """One backward pass: "loss" to minimise, and anything else to log. A micro-batch is `passes` of them
        (an optional attribute; 1 where it is absent), whose losses add up."""

    def save(self, run: Path, step: int) -> Path:
        """Write the model at `step` (atomically); return its path."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def preview(self, run: Path, step: int) -> None:
        """Sample images of the model at `step` into `run`."""

    def evaluate(self, run: Path, step: int) -> dict[str, float]:
        """With --eval-every: score the model at `step` (0: before the first step); the scores to log."""

    def conclude(self, run: Path, step: int) -> None:
        """With --eval-every, after the last step: name the best of what was scored."""


def fit(task: Task, loop: Loop, run: Path, dist: Dist, resume: bool = False, name: str = "dreambooth",
        resume_command: str | None = None) -> Path:  # fmt: skip
    """The training loop shared by every booth task: mixed precision with fp32 master weights, gradient
    accumulation and clipping, DDP, metrics, atomic checkpoints and resumable state, Ctrl-C, NaN stop."""
    state = _State(task, loop, run, dist, resume_command or f"booth {name} -r {run}")
    if resume:
        state.load()
    elif dist.main:
        _truncate_metrics(run / "metrics.jsonl", -1)  # a run stopped before its first save starts over
    with StopFlag() as stop, out_of_memory(task.memory_hint):
        if loop.eval_every and state.step == 0 and dist.main:  # the base, which drift is measured against
            with state._disk():
                _log_metrics(run, {"step": 0, **task.evaluate(run, 0)}, state.writer)
        bar = tqdm(total=loop.iterations, initial=state.step, desc=name, unit="step", file=sys.stderr,
                   disable=not dist.main, dynamic_ncols=True)  # fmt: skip
        with bar:
            while state.step < loop.iterations:
                logged = state.optimizer_step()
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
                bar.update(1)
                evaluating = bool(loop.eval_every and state.step % loop.eval_every == 0)
                saving = (
                    state.step == loop.iterations
                    or evaluating
                    or bool(loop.save_every and state.step % loop.save_every == 0)
                )
                state.after_step(logged, saving, evaluating or (saving and bool(loop.eval_every)))
                if stop.requested:
                    state.stop(saved=saving)
                if saving:
                    dist.barrier()
    state.close()
    if loop.eval_every and dist.main:
        task.conclude(run, state.step)
    return state.last_ckpt or run / CHECKPOINT_FOLDER / f"step-{state.step:06d}.safetensors"


class _State:
    """fit's moving parts: the optimizer and loss scaler, the step, the metrics log, what was saved last."""

    def __init__(self, task: Task, loop: Loop, run: Path, dist: Dist, resume_command: str):
        self.task, self.loop, self.run, self.dist, self.resume_command = task, loop, run, dist, resume_command
        if loop.fused_backward and task.amp_dtype == torch.float16:
            raise BoothError(FUSED_FP16)
        make = partial(_optimizer, loop, generator=task.gens.get("rounding"))
        self.optimizer = (StepInBackward(task.params, make, loop.max_grad_norm, dist.world)
                          if loop.fused_backward else make(task.params))  # fmt: skip
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=task.amp_dtype == torch.float16)
        self.step, self.last_ckpt, self.t_last = 0, None, time.perf_counter()
        self.writer = _tensorboard(run) if dist.main else None

    def load(self) -> None:
        path = newest_state(self.run)
        state = _read_state(path)
        try:
            self.task.load_state_dict(state["task"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            load_rng_state(state["rng"], self.task.gens)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise BoothError(
                f"{path} does not fit this run ({first_line(e, 200)}); it may be damaged"
            ) from None
        self.step = state["step"]
        if self.dist.main:
            _truncate_metrics(self.run / "metrics.jsonl", self.step)
        print(f"booth: resuming {self.run} at step {self.step}", file=sys.stderr)

    def optimizer_step(self) -> dict[str, float]:
        """Accumulate, reduce over devices, check, clip, step. Returns the logged losses."""
        lr = learning_rate(self.loop, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals, passes = {}, self.loop.grad_accum * getattr(self.task, "passes", 1)
        for i in range(passes):
            if self.loop.fused_backward:  # only the last micro-batch's backward pass steps
                self.optimizer.armed = i == passes - 1
            losses = self.task.losses()
            self.scaler.scale(losses["loss"] / self.loop.grad_accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / self.loop.grad_accum
        values = torch.stack(list(totals.values()))
        if self.dist.world > 1:
            torch.distributed.all_reduce(values)
            values /= self.dist.world
        logged = dict(zip(totals, values.tolist()))
        if not math.isfinite(logged["loss"]):
            raise BoothError(f"the loss became {logged['loss']} at step {self.step + 1}; stopping. {self._last_good()}. "
                             "Try a lower --learning-rate, or --precision bf16 or fp32")  # fmt: skip
        if not self.loop.fused_backward:  # else each parameter has stepped already
            self._step()
        self.step += 1
        return {**logged, "lr": lr}

    def _step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.task.params, self.loop.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self, logged: dict, saving: bool, evaluating: bool = False) -> None:
        if not self.dist.main:
            return
        now = time.perf_counter()
        record = {"step": self.step, **logged, "seconds": now - self.t_last,
                  "peak_memory_mb": peak_memory_mb(self.dist.device)}  # fmt: skip
        with self._disk():
            if evaluating:  # scored as it is saved, so the best is a checkpoint on disk
                record.update(self.task.evaluate(self.run, self.step))
        self.t_last = time.perf_counter()
        with self._disk():
            _log_metrics(self.run, record, self.writer)
            if saving:
                self._save()
        if self.loop.sample_every and self.step % self.loop.sample_every == 0:
            with self._disk():
                self.task.preview(self.run, self.step)

    def _save(self) -> None:
        """The model, then the state: never a model with inf or NaN weights, never called the last good one."""
        try:
            path = self.task.save(self.run, self.step)
        except NonFiniteWeights as e:
            finite = all(bool(torch.isfinite(p).all()) for p in self.task.params)
            why = f"do not fit in the checkpoint's dtype ({e})" if finite else f"became inf or NaN ({e})"
            raise BoothError(f"stopping at step {self.step}: the weights {why}. {self._last_good()}. Try a lower "
                             "--learning-rate" + (", or --save-precision fp32" if finite else "")) from None  # fmt: skip
        self.last_ckpt = path
        save_state(self.run, self.state())

    def _last_good(self) -> str:
        return f"The last good checkpoint is {self.last_ckpt or 'not written yet'}"

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step, "task": self.task.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.task.gens)}  # fmt: skip

    def stop(self, saved: bool) -> None:
        """Ctrl-C: save a state at this step boundary (unless it was just saved) and stop."""
        if self.dist.main and not saved:
            with self._disk():
                save_state(self.run, self.state())
        self.dist.barrier()
        raise Interrupted(f"stopped at step {self.step}; continue with: {self.resume_command}")

    def close(self) -> None:
        if isinstance(self.optimizer, StepInBackward):
            self.optimizer.close()
        if self.writer is not None:
            self.writer.close()

    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        """A full disk: earlier checkpoints and states are intact, and -r continues once there is space."""
        then = f"continue with {self.resume_command}"
        try:
            yield
        except DiskFull as e:
            raise DiskFull(e.path, then) from None
        except OSError as e:
            if disk_full(e, self.run):
                raise DiskFull(self.run, then) from None
            raise BoothError(f"cannot write into {self.run} ({e.strerror or e}); earlier checkpoints and state are "
                             f"intact: fix that, then {then}") from None  # fmt: skip


def learning_rate(loop: Loop, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    lr = loop.learning_rate * min(1.0, (step + 1) / max(1, loop.lr_warmup))
    if loop.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / max(1, loop.iterations)))
    return lr


def _optimizer(loop: Loop, params: list, generator: torch.Generator | None = None) -> torch.optim.Optimizer:
    """`loop.optimizer` over `params`; bf16 weights are rounded stochastically with `generator`."""
    if loop.optimizer == "adafactor":
        return Adafactor(params, lr=loop.learning_rate, weight_decay=WEIGHT_DECAY, generator=generator)
    kw = dict(lr=loop.learning_rate, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8)
    if loop.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: pip install 'booth[8bit]'
        except ImportError:
            raise BoothError("--optimizer adamw8bit needs bitsandbytes: pip install 'booth[8bit]'") from None
        return bnb.optim.AdamW8bit(params, **kw)
    half = any(p.dtype == torch.bfloat16 for p in params)
    if half:  # torch's AdamW would keep bf16 moments and round each update to nearest
        return AdamW(params, **kw, generator=generator)
    return torch.optim.AdamW(params, **kw)


# ----------------------------------------------------------------------------- state and metrics


def newest_state(run: Path) -> Path | None:
    states = sorted((run / "state").glob("step-*.pt"))
    return states[-1] if states else None


def resume_state(run: Path, cfg: TrainConfig) -> Path | None:
    """The state `-r` continues from, checked before anything is loaded; None for a run stopped before its first
    step (while making class images), which starts again at step 0 and keeps the class images it has."""
    path = newest_state(run)
    if path is None:
        if any((run / CHECKPOINT_FOLDER).glob("*.safetensors")) or _logged_steps(run / "metrics.jsonl"):
            raise BoothError(
                f"{run} has no saved training state to resume from ({run / 'state'} is empty or missing)"
            )
        return None
    done = int(path.stem.split("-")[1])
    if cfg.iterations < done:
        raise BoothError(
            f"{run} is already at step {done}; --iterations must be at least that (got {cfg.iterations})"
        )
    return path


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged or not a torch file: torch raises many kinds
        raise BoothError(
            f"cannot read the training state {path} ({type(e).__name__}); it may be damaged"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BoothError(f"{path} was written by another version of booth; it cannot be resumed")
    if not isinstance(state.get("step"), int) or not all(
        k in state for k in ("task", "optimizer", "scaler", "rng")
    ):
        raise BoothError(f"{path} is not a complete booth training state; it may be damaged")
    return state


def save_state(run: Path, state: dict) -> Path:
    """Training state (master weights, optimizer, RNGs, data order) for `-r`; kept apart from the model files."""
    folder = run / "state"
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{state['step']:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in folder.glob("step-*.pt"):  # only the newest complete state is needed
        if old != path:
            old.unlink(missing_ok=True)
    return path


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    state = {"gens": {k: g.get_state() for k, g in gens.items()}, "torch": torch.get_rng_state(),
             "python": random.getstate()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict, gens: dict[str, torch.Generator]) -> None:
    for k, g in gens.items():
        g.set_state(state["gens"][k])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _metric_lines(path: Path) -> list[tuple[int, str]]:
    """(step, line) of every complete record; a line a crash or a full disk cut short is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int):
            out.append((step, line))
    return out


def _logged_steps(path: Path) -> int:
    return sum(1 for step, _ in _metric_lines(path) if step > 0)  # step 0: --eval-every's score of the base


def _truncate_metrics(path: Path, step: int) -> None:
    """A run that stopped may have logged steps past its last saved state, which are redone, and a torn last line."""
    if path.exists():
        write_text(path, "".join(line + "\n" for s, line in _metric_lines(path) if s <= step))


def _log_metrics(run: Path, record: dict, writer) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(f"train/{k}", v, record["step"])


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: pip install 'booth[tensorboard]'
    except ImportError:  # metrics.jsonl is always written
        return None
    return SummaryWriter(str(run / "tensorboard"))


class StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
