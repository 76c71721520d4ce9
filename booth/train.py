"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune Stable Diffusion on a few photos of a subject.

The subject is bound to a rare token inside its class ("a sks dog"), while a prior-preservation loss on images
the base model drew for the plain class ("a dog") keeps the class itself from drifting:

    loss = MSE(eps_hat, eps | instance batch) + lambda * MSE(eps_hat, eps | class batch)

Read `train()` top to bottom: model, class images, data, optimizer, resume, loop, save. Everything random
comes from explicit generators saved with the training state, so an interrupted run that is resumed ends with
bitwise the same weights as one that never stopped (on a deterministic device such as the CPU).
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from .atomic import atomic_path, write_text
from .checkpoint import TEXT, UNET, file_hash, load_model, read_checkpoint, save_checkpoint
from .data import Augment, Cycler, ImageSet, find_images, prepare
from .errors import BoothError
from .images import save_png
from .pipeline import Settings, StableDiffusion
from .render import parameters_text

STATE_FORMAT = 1


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as RUN/args.yaml and read back by `-r`."""

    class_name: str = ""
    instance_dir: str = ""
    model: str = "sd15"
    token: str = "sks"
    instance_prompt: str | None = None  # default "a {token} {class}"
    class_prompt: str | None = None  # default "a {class}"
    class_dir: str | None = None
    class_img_count: int = 200
    generation_batch_size: int = 4
    hw: tuple[int, int] | None = None  # None: the base model's own size (512 for SD1)
    ddim_steps: int = 25  # class-image sampling steps (booth's sampler defaults)
    sampler: str = "dpmpp_2m"
    schedule: str = "karras"
    scale: float = 7.5
    ddim_eta: float = 0.0
    iterations: int = 800
    learning_rate: float = 5e-6
    lamb: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    lr_warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at the last iteration
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int | None = None
    train_text_encoder: bool = False
    precision: str | None = None  # fp32 | fp16 | bf16 (None: fp16 on CUDA, fp32 elsewhere)
    save_precision: str = "fp16"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    cache_latents: bool = False
    noise_offset: float = 0.0
    # multi-resolution noise discount (0: white noise); None: the noise the base model was trained with
    pyramid_noise: float | None = None
    snr_gamma: float | None = None
    sample_every: int | None = None
    sample_prompt: str | None = None
    flip: bool = True
    random_resize: bool = True
    color_jitter: bool = True
    devices: list[str] = field(default_factory=list)
    # LoRA: train only low-rank adapters (rank `lora`) on frozen base weights. The CLI then defaults the
    # learning rate to booth.lora.LEARNING_RATE (1e-4) instead of 5e-6.
    lora: int | None = None
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str = "attn"  # attn | attn-ff | all (see booth.lora.TARGETS)
    lora_text_encoder: bool = False

    @property
    def instance_text(self) -> str:
        return self.instance_prompt or f"a {self.token} {self.class_name}"

    @property
    def class_text(self) -> str:
        return self.class_prompt or f"a {self.class_name}"

    def to_yaml(self) -> str:
        d = dataclasses.asdict(self)
        d["hw"] = list(self.hw) if self.hw else None
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        d = yaml.safe_load(text) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("hw"):
            d["hw"] = tuple(d["hw"])
        return cls(**d)


# ----------------------------------------------------------------------------- the loss


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, lamb: float,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, instance loss, prior loss). The first `n_instance` rows are the subject, the rest class images;
    `weights` (B,) are optional per-sample loss weights (min-SNR)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:n_instance].mean()
    prior = per_sample[n_instance:].mean() if len(per_sample) > n_instance else per_sample.new_zeros(())
    return instance + lamb * prior, instance, prior


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023) for eps prediction: min(SNR, gamma) / SNR."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / snr


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
    from .cli import pick_device

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


# ----------------------------------------------------------------------------- precision


def dtypes(precision: str | None, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None for plain fp32, dtype of the frozen networks)."""
    name = precision or ("fp16" if device.type == "cuda" else "fp32")
    name = {"full": "fp32", "autocast": "fp16"}.get(name, name)
    if name == "fp32":
        return None, torch.float32
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BoothError("this GPU does not support bf16; use --precision fp16")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return half, half


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- class images


def class_images(cfg: TrainConfig, run: Path, sd: StableDiffusion, amp, dist: Dist) -> list[Path]:
    """`--class-dir` images as they are (topped up to --class-img-count if it has fewer), else RUN/class-imgs.
    Only missing images are generated, so an interrupted generation resumes; each device renders its share."""
    if cfg.lamb == 0:  # no prior preservation: class images would play no part
        return []
    folder = Path(cfg.class_dir) if cfg.class_dir else run / "class-imgs"
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    names = {p.name for p in have}
    missing = [i for i in range(cfg.class_img_count) if f"{i:04d}.png" not in names]
    todo = missing[: max(0, cfg.class_img_count - len(have))]
    dist.barrier()  # every device has listed the folder before any of them writes to it
    if todo:
        _generate_class_images(cfg, folder, todo[dist.rank :: dist.world], sd, amp, dist)
    dist.barrier()
    return find_images(folder, "class")[: max(cfg.class_img_count, 1)]


def _generate_class_images(cfg, folder: Path, todo: list[int], sd: StableDiffusion, amp, dist: Dist) -> None:
    h, w = cfg.hw
    s = Settings(cfg.ddim_steps, cfg.sampler, cfg.schedule, cfg.scale, cfg.ddim_eta, h, w)
    bar = tqdm(total=len(todo), desc=f"class images ({dist.rank})" if dist.world > 1 else "class images",
               unit="img", file=sys.stderr, disable=not todo)  # fmt: skip
    seed0 = cfg.seed + 1_000_000  # keep class-image seeds apart from preview seeds
    with bar:
        for k in range(0, len(todo), cfg.generation_batch_size):
            chunk = todo[k : k + cfg.generation_batch_size]
            with amp:
                images = sd.txt2img(cfg.class_text, "", [seed0 + i for i in chunk], s)
            for i, image in zip(chunk, images):
                text = parameters_text(sd, cfg.class_text, "", s, seed0 + i)
                save_png(image, folder / f"{i:04d}.png", text)
            bar.update(len(chunk))


# ----------------------------------------------------------------------------- state


def newest_state(run: Path) -> Path | None:
    states = sorted((run / "state").glob("step-*.pt"))
    return states[-1] if states else None


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


# ----------------------------------------------------------------------------- saving models


def save_model(run: Path, step: int, model, cfg: TrainConfig, meta: dict, base: dict) -> Path:
    """RUN/ckpts/step-NNNNNN.safetensors: a complete SD1 single file in the CompVis layout. `base` describes the
    base file: its dtypes, and its frozen tensors when the copies on the device were rounded below them."""
    dtype = torch.float16 if cfg.save_precision == "fp16" else torch.float32
    sd = {UNET + k: v.detach().to("cpu", dtype) for k, v in model.unet.state_dict().items()}
    frozen = [("first_stage_model.", model.vae)] + (
        [] if cfg.train_text_encoder else [(TEXT, model.text_encoder)]
    )
    if cfg.train_text_encoder:
        sd.update({TEXT + k: v.detach().to("cpu", dtype) for k, v in model.text_encoder.state_dict().items()})
    for prefix, module in frozen:  # untouched networks: the base's values, never stored above its precision
        for k, v in module.state_dict().items():
            k = prefix + k
            was = base["dtypes"][k]
            v = base["originals"].get(k, v)
            sd[k] = v.detach().to("cpu", was if was.itemsize < dtype.itemsize else dtype)
    path = run / "ckpts" / f"step-{step:06d}.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(sd, path, metadata={**meta, "booth.step": str(step)}, config=model.config)
    return path


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading_main():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- the run


class Interrupted(Exception):
    """Raised after a resumable state was saved in response to Ctrl-C."""


def train(cfg: TrainConfig, run: Path, resume: bool = False, dist: Dist | None = None) -> Path:
    """Run (or resume) DreamBooth in `run`; returns the last checkpoint written."""
    dist = dist or setup_distributed(cfg.devices)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = DreamBooth(cfg, run, dist)
    return fit(task, cfg, run, dist, resume)


class DreamBooth:
    """The DreamBooth task for `fit`: its model, data, loss, checkpoint and previews."""

    def __init__(self, cfg: TrainConfig, run: Path, dist: Dist):
        from .hub import resolve

        self.cfg, self.dist = cfg, dist
        device = dist.device
        self.amp_dtype, frozen_dtype = dtypes(cfg.precision, device)
        self.amp = amp = autocast(device, self.amp_dtype)

        # -- the base model: the UNet in fp32 (master weights), frozen networks in half precision
        base = resolve(cfg.model)
        ckpt = read_checkpoint(base)
        base_hash = file_hash(base) if base.is_file() else ""
        # Frozen networks are saved as the base had them; their device copies hold exactly those values unless
        # they were rounded to a half precision other than the one checkpoints are saved in.
        save_dtype = torch.float16 if cfg.save_precision == "fp16" else torch.float32
        lossy = not cfg.lora and frozen_dtype not in (torch.float32, save_dtype)  # LoRA files hold no base
        self.base = {"dtypes": {k: v.dtype for k, v in ckpt.state_dict.items()},
                     "originals": {k: v for k, v in ckpt.state_dict.items() if lossy and not k.startswith(UNET)}}  # fmt: skip
        self.model = model = load_model(ckpt, device, None)
        cfg.hw = tuple(cfg.hw or (model.config.sample_size,) * 2)
        if cfg.pyramid_noise is None:
            cfg.pyramid_noise = model.config.pyramid_noise
        model.unet.to(frozen_dtype if cfg.lora else torch.float32)  # trained weights are fp32 master weights
        model.vae.to(frozen_dtype)
        model.text_encoder.to(torch.float32 if cfg.train_text_encoder else frozen_dtype)
        self.sd = StableDiffusion(model, device, frozen_dtype, ckpt.name, base_hash)

        # -- class images, drawn by the base model before any training
        class_paths = class_images(cfg, run, self.sd, amp, dist)

        # -- data
        aug = Augment(flip=cfg.flip, resize=cfg.random_resize, jitter=cfg.color_jitter)
        sets = {"instance": ImageSet(find_images(cfg.instance_dir, "instance"), tuple(cfg.hw), aug)}
        if class_paths:
            sets["class"] = ImageSet(class_paths, tuple(cfg.hw), aug)
        self.gens = {"data": torch.Generator().manual_seed(cfg.seed)}
        self.batches = Batches(
            cfg, sets, self.gens["data"], dist, model.vae, model.config.scale_factor, frozen_dtype
        )

        # -- what trains
        model.unet.gradient_checkpointing = cfg.gradient_checkpointing
        model.unet.train()
        self.lora = None
        if cfg.lora:  # only the adapters train; every base weight stays frozen
            from .lora import add_lora

            self.lora = add_lora(model, cfg.lora, cfg.lora_alpha or cfg.lora, cfg.lora_targets,
                                 cfg.lora_text_encoder, cfg.seed)  # fmt: skip
            self.params = [p for layer in self.lora.values() for p in (layer.down.weight, layer.up.weight)]
        else:
            self.params = list(model.unet.requires_grad_(True).parameters())
        if cfg.train_text_encoder:
            model.text_encoder.requires_grad_(True).train()
            self.params += list(model.text_encoder.parameters())
        self.unet = _wrap_ddp(model.unet, dist)
        self.alphas_cumprod = self.sd.schedule.alphas_cumprod.to(device)

        # -- prompts: encoded once, unless the text encoder trains
        ids = self.sd.tokenizer([cfg.instance_text, cfg.class_text]).to(device)
        if cfg.train_text_encoder or (cfg.lora and cfg.lora_text_encoder):
            text_encoder = _wrap_ddp(model.text_encoder, dist)
            self.encode_text = lambda: _encode(text_encoder, ids, amp)
        else:
            with torch.no_grad():
                fixed = _encode(model.text_encoder, ids, amp)
            self.encode_text = lambda: fixed
        self.meta = {"booth.base_model": str(cfg.model), "booth.base_hash": base_hash,
                     "booth.instance_prompt": cfg.instance_text, "booth.class_prompt": cfg.class_text,
                     "booth.train": json.dumps(_hyper(cfg))}  # fmt: skip
        if self.lora is not None:
            self.meta.update(self._lora_meta(ckpt.name))

    def losses(self) -> dict[str, torch.Tensor]:
        x0, image_gens, n_inst = self.batches.next()
        ctx = self.encode_text()  # (2, L, C): instance prompt, class prompt
        context = torch.cat([ctx[:1].expand(n_inst, -1, -1), ctx[1:2].expand(len(x0) - n_inst, -1, -1)])
        loss, inst, prior = diffusion_loss(self.cfg, x0, image_gens, context, n_inst, self.unet, self.alphas_cumprod,
                                           self.amp)  # fmt: skip
        return {"loss": loss, "instance_loss": inst, "prior_loss": prior}

    def _lora_meta(self, base_name: str) -> dict[str, str]:
        """A LoRA file's header: booth's recipe plus the kohya entries A1111, ComfyUI and civitai read."""
        from .lora import kohya_metadata

        cfg = self.cfg
        alpha = cfg.lora_alpha or cfg.lora
        # a local base is recorded absolute (aliases as they are), so `txt2img -c RUN/ckpts` finds it from anywhere
        local = Path(cfg.model)
        return {**kohya_metadata(cfg.lora, alpha, cfg.lora_targets, base_name),
                "booth.base_model": str(local.resolve()) if local.exists() else cfg.model,
                "booth.lora_rank": str(cfg.lora), "booth.lora_alpha": str(float(alpha)),
                "booth.lora_targets": cfg.lora_targets, "booth.lora_text_encoder": str(cfg.lora_text_encoder),
                "ss_resolution": str(tuple(cfg.hw)), "ss_learning_rate": str(cfg.learning_rate)}  # fmt: skip

    def save(self, run: Path, step: int) -> Path:
        if self.lora is None:
            return save_model(run, step, self.model, self.cfg, self.meta, self.base)
        from .lora import save_lora

        dtype = torch.float16 if self.cfg.save_precision == "fp16" else torch.float32
        path = run / "ckpts" / f"step-{step:06d}.safetensors"
        path.parent.mkdir(exist_ok=True)
        meta = {**self.meta, "booth.step": str(step), "ss_steps": str(step)}
        return save_lora(self.lora, path, self.model.config, dtype, meta)

    def state_dict(self) -> dict:
        if self.lora is not None:  # only the adapters: the frozen base is the base file
            from .lora import adapter_state

            return {"lora": adapter_state(self.lora), "data": self.batches.state_dict()}
        state = {"unet": self.model.unet.state_dict(), "data": self.batches.state_dict()}
        if self.cfg.train_text_encoder:
            state["text_encoder"] = self.model.text_encoder.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.lora is not None:
            from .lora import load_adapter_state

            load_adapter_state(self.lora, state["lora"])
            self.batches.load_state_dict(state["data"])
            return
        self.model.unet.load_state_dict(state["unet"])
        if self.cfg.train_text_encoder:
            self.model.text_encoder.load_state_dict(state["text_encoder"])
        self.batches.load_state_dict(state["data"])

    def preview(self, run: Path, step: int) -> None:
        _preview(self.cfg, run, step, self.sd, self.amp)


def fit(
    task,
    cfg: TrainConfig,
    run: Path,
    dist: Dist,
    resume: bool = False,
    name: str = "dreambooth",
    resume_command: str | None = None,
) -> Path:
    """The training loop shared by every booth task: mixed precision with fp32 master weights, gradient
    accumulation and clipping, DDP, metrics, atomic checkpoints and resumable state, Ctrl-C, NaN stop.
    `task` supplies `params`, `gens`, `losses()`, `save()`, `state_dict()`, `load_state_dict()`, `preview()`."""
    device = dist.device
    resume_command = resume_command or f"booth {name} -r {run}"
    optimizer = _optimizer(cfg, task.params)
    scaler = torch.amp.GradScaler(device.type, enabled=task.amp_dtype == torch.float16)
    step = _resume(run, cfg, task, optimizer, scaler) if resume else 0
    if dist.main:
        _truncate_metrics(run / "metrics.jsonl", step)
    writer = _tensorboard(run) if dist.main else None
    last_ckpt, t_last = None, time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=step, desc=name, unit="step", file=sys.stderr,
               disable=not dist.main, dynamic_ncols=True)  # fmt: skip
    with bar, StopFlag() as stop, _oom_hint(cfg):
        while step < cfg.iterations:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals = {}
            for _ in range(cfg.grad_accum):
                losses = task.losses()
                scaler.scale(losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0) + v.detach().float() / cfg.grad_accum
            values = torch.stack(list(totals.values()))
            if dist.world > 1:
                torch.distributed.all_reduce(values)
                values /= dist.world
            logged = dict(zip(totals, values.tolist()))
            if not math.isfinite(logged["loss"]):
                raise BoothError(
                    f"the loss became {logged['loss']} at step {step + 1}; stopping. The last good checkpoint is "
                    f"{last_ckpt or 'not written yet'}. Try a lower --learning-rate, or --precision bf16 or fp32"
                )
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(task.params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            record = {
                "step": step,
                **logged,
                "lr": lr,
                "seconds": now - t_last,
                "peak_memory_mb": peak_memory_mb(device),
            }
            t_last = now
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            bar.update(1)
            saving = step == cfg.iterations or bool(cfg.save_every and step % cfg.save_every == 0)
            state = lambda: {"format": STATE_FORMAT, "step": step, "task": task.state_dict(),  # noqa: B023
                             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                             "rng": rng_state(task.gens)}  # fmt: skip
            if dist.main:
                _log_metrics(run, record, writer)
                if saving:
                    with _disk_errors(run, resume_command):
                        last_ckpt = task.save(run, step)
                        save_state(run, state())
                if cfg.sample_every and step % cfg.sample_every == 0:
                    task.preview(run, step)
            if stop.requested:
                if dist.main and not saving:
                    save_state(run, state())
                dist.barrier()
                raise Interrupted(f"stopped at step {step}; continue with: {resume_command}")
            if saving:
                dist.barrier()
    if writer is not None:
        writer.close()
    return last_ckpt or run / "ckpts" / f"step-{step:06d}.safetensors"


def _encode(text_encoder, ids: torch.Tensor, amp) -> torch.Tensor:
    """(B, 77*K) ids -> (B, 77*K, C); chunks go through the module's own forward so DDP sees the call."""
    b, length = ids.shape
    with amp:
        return text_encoder(ids.reshape(-1, 77)).reshape(b, length, -1)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    lr = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.lr_warmup))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.iterations)))
    return lr


def _wrap_ddp(module: torch.nn.Module, dist: Dist):
    if dist.world == 1:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise BoothError("--optimizer adamw8bit needs bitsandbytes: pip install 'booth[8bit]'") from None
        return bnb.optim.AdamW8bit(params, **kw)
    if cfg.optimizer != "adamw":
        raise BoothError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or adamw8bit")
    return torch.optim.AdamW(params, **kw)


class Batches:
    """Micro-batches of clean latents. Indices and per-image seeds are drawn for the *global* batch (all devices)
    from shared generators and each device takes its slice, so N devices see exactly what one device would with
    an N-times larger batch. Each image's own generator then drives its augmentation, posterior sample, noise
    and timestep, in that order."""

    def __init__(self, cfg: TrainConfig, sets: dict[str, ImageSet], gen: torch.Generator, dist: Dist, vae,
                 scale_factor: float, dtype: torch.dtype):  # fmt: skip
        self.cfg, self.sets, self.gen, self.dist = cfg, sets, gen, dist
        self.vae, self.scale_factor, self.dtype = vae, scale_factor, dtype
        self.cyclers = {kind: Cycler(len(images), gen) for kind, images in sets.items()}
        self.cache = self._encode_all() if cfg.cache_latents else None

    def next(self) -> tuple[torch.Tensor, list[torch.Generator], int]:
        """(x0 (B, 4, h, w) with instance rows first, one generator per row, number of instance rows)."""
        b, n = self.cfg.batch_size, self.cfg.batch_size * self.dist.world
        picks = {kind: c.take(n) for kind, c in self.cyclers.items()}
        seeds = torch.randint(0, 2**62, (n * len(picks),), generator=self.gen).tolist()
        mine = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        items = [(kind, i) for kind in picks for i in picks[kind][mine]]
        local_seeds = [s for k in range(len(picks)) for s in seeds[k * n : (k + 1) * n][mine]]
        gens = [torch.Generator().manual_seed(s) for s in local_seeds]
        mean, std = self._moments(items, gens)
        noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in gens]).to(mean.device)
        return (mean + std * noise) * self.scale_factor, gens, len(picks["instance"][mine])

    def _moments(self, items, gens) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:  # cached: only the flip is random
            flips = [self.cfg.flip and torch.rand((), generator=g).item() < 0.5 for g in gens]
            rows = [self.cache[kind][i, int(f)] for (kind, i), f in zip(items, flips)]
            return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        images = torch.cat([self.sets[kind].batch([i], g) for (kind, i), g in zip(items, gens)])
        return self._encode(images)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.vae.parameters()).device
        mean, logvar = self.vae.encode(images.to(device, self.dtype))
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
        for kind, c in self.cyclers.items():
            c.load_state_dict(state[kind])


def pyramid_noise(noise: torch.Tensor, gens, discount: float) -> torch.Tensor:
    """Multi-resolution noise: white noise plus noise drawn at 1/2, 1/4, ... of the size (down to one pixel),
    each level `discount` times the one above, upsampled by repetition and rescaled to unit variance.

    Plain noise hides large flat regions slowly (averaging over n pixels divides its std by sqrt(n)), so a
    model can read their colour through most of the schedule and will not repaint them. Low-frequency noise
    teaches it that such colour may be noise."""
    _, c, h, w = noise.shape
    out, variance, level = noise.clone(), 1.0, 1
    while h >> level >= 1 and w >> level >= 1:
        low = torch.cat([torch.randn((1, c, h >> level, w >> level), generator=g) for g in gens]).to(
            noise.device
        )
        # nearest upsampling keeps each pixel's variance exactly discount ** (2 * level)
        out = out + discount**level * torch.nn.functional.interpolate(low, size=(h, w), mode="nearest")
        variance += discount ** (2 * level)
        level += 1
    return out / variance**0.5


def diffusion_loss(cfg: TrainConfig, x0, gens, context, n_inst, unet, alphas_cumprod, amp):
    """Noise clean latents at random timesteps, predict the noise, and return the DreamBooth loss (the plain
    diffusion loss when every row is an "instance"). `gens` has one generator per row; `context` (B, L, C)."""
    device = x0.device
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens]).to(device)
    if cfg.noise_offset:  # (Guttenberg 2023) lets the model learn very dark and very bright images
        offset = torch.cat([torch.randn((1, x0.shape[1], 1, 1), generator=g) for g in gens]).to(device)
        noise = noise + cfg.noise_offset * offset
    if cfg.pyramid_noise:
        noise = pyramid_noise(noise, gens, cfg.pyramid_noise)
    t = torch.cat([torch.randint(0, len(alphas_cumprod), (1,), generator=g) for g in gens]).to(device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with amp:
        pred = unet(noisy, t.float(), context)
    weights = min_snr_weights(alphas_cumprod[t], cfg.snr_gamma) if cfg.snr_gamma else None
    return dreambooth_loss(pred, noise, n_inst, cfg.lamb, weights)


def _resume(run: Path, cfg: TrainConfig, task, optimizer, scaler) -> int:
    path = newest_state(run)
    if path is None:
        raise BoothError(f"{run} has no training state to resume from (no {run / 'state'}/step-*.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BoothError(
            f"cannot read the training state {path} ({type(e).__name__}); it may be damaged"
        ) from None
    if state.get("format") != STATE_FORMAT:
        raise BoothError(f"{path} was written by another version of booth; it cannot be resumed")
    if state["step"] > cfg.iterations:
        raise BoothError(f"{run} is already at step {state['step']}; give --iterations of at least that")
    task.load_state_dict(state["task"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    load_rng_state(state["rng"], task.gens)
    print(f"booth: resuming {run} at step {state['step']}", file=sys.stderr)
    return state["step"]


def _truncate_metrics(path: Path, step: int) -> None:
    """A run that crashed may have logged steps past its last saved state; those are redone, so drop them."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    write_text(path, "".join(ln + "\n" for ln in lines))


def _log_metrics(run: Path, record: dict, writer) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(f"train/{k}", v, record["step"])


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is always written
        return None
    return SummaryWriter(str(run / "tensorboard"))


def _hyper(cfg: TrainConfig) -> dict:
    keys = ("learning_rate", "lamb", "iterations", "batch_size", "grad_accum", "lr_warmup", "seed", "class_img_count",
            "train_text_encoder", "precision", "optimizer", "noise_offset", "pyramid_noise", "snr_gamma", "token",
            "class_name", "lora", "lora_alpha", "lora_targets", "lora_text_encoder")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def _preview(cfg: TrainConfig, run: Path, step: int, sd: StableDiffusion, amp) -> None:
    """Fixed-seed samples of the current weights, so runs and steps can be compared by eye."""
    h, w = cfg.hw
    folder = run / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = sd.model.unet.training
    sd.model.unet.eval()
    with amp:
        images = sd.txt2img(cfg.sample_prompt or cfg.instance_text, "", [cfg.seed, cfg.seed + 1],
                            Settings(height=h, width=w))  # fmt: skip
    sd.model.unet.train(was_training)
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:04d}.png")


@contextlib.contextmanager
def _disk_errors(run: Path, resume_command: str):
    try:
        yield
    except OSError as e:
        raise BoothError(
            f"cannot save into {run} ({e.strerror or e}); earlier checkpoints and state are intact: free space, "
            f"then continue with {resume_command}"
        ) from None


@contextlib.contextmanager
def _oom_hint(cfg: TrainConfig):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    hint = ("out of memory while training: try --gradient-checkpointing, --optimizer adamw8bit, --cache-latents, "
            "--precision fp16, --batch-size 1, a smaller --hw" + (", or drop -t" if cfg.train_text_encoder else ""))  # fmt: skip
    try:
        yield
    except oom:
        raise BoothError(hint) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise BoothError(hint) from None
        raise
