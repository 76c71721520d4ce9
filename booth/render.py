"""Turning a generation job into files: a run folder with args.yaml, prompt.txt, PNGs with metadata and, when
several checkpoints are compared, a grid. Used by the CLI (and by anything else that renders to disk)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from . import __version__
from .atomic import write_text
from .checkpoint import file_hash, load_model, read_checkpoint
from .errors import BoothError
from .images import grid, infotext, save_png
from .pipeline import SAMPLER_NAMES, SCHEDULE_NAMES, Settings, StableDiffusion, steps_to_run


@dataclass
class Job:
    prompt: str
    negative_prompt: str
    settings: Settings
    seed: int
    count: int = 1
    batch_size: int = 1
    image: Image.Image | None = None  # img2img when set
    strength: float | None = None
    ema: bool = False

    def batches(self) -> list[list[int]]:
        seeds = [self.seed + i for i in range(self.count)]
        return [seeds[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]


def render(job: Job, models: Sequence[Path], run: Path | Callable[[], Path], device: torch.device,
           dtype: torch.dtype, args: dict | None = None, loras: Sequence = (), base: Path | None = None) -> Iterator[Path]:  # fmt: skip
    """Render `job` with each model into `run`; yields every image path as soon as it is written. `run` may be a
    function making the folder: it is called once the first model has loaded, so a bad checkpoint leaves none.
    `loras` ((LoRA, weight) pairs) are merged into every model; with `base`, LoRA files among `models` are rows
    of their own: `base` plus that LoRA."""
    loaded = _load_each(models, job.ema, device, dtype, loras, base)
    first = next(loaded)
    run = run() if callable(run) else run
    record = {k: v for k, v in (args or {}).items() if k != "func"}
    record.update(seed=job.seed, device=str(device), dtype=str(dtype).replace("torch.", ""),
                  models=[str(m) for m in models], booth_version=__version__)  # fmt: skip
    write_text(run / "args.yaml", yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    write_text(run / "prompt.txt", job.prompt + "\n")
    # One sample folder per checkpoint, by stem; by full name when two stems clash (a.ckpt and a.safetensors).
    names = [m.stem for m in models]
    names = names if len(set(names)) == len(names) else [m.name for m in models]
    rows = []
    for path, name in zip(models, names):
        sd = first if first is not None else next(loaded)
        first = None
        folder = run / "samples" / (name if len(models) > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        row = []
        for image, out in _render_one(sd, job, folder, label=path.name if len(models) > 1 else None):
            row.append(image)
            yield out
        rows.append(row)
        del sd  # so that _load_each can free this model before building a differently shaped one
    if len(models) > 1:
        yield save_png(grid(rows, names), run / "grid.png")


def _load_each(paths: Sequence[Path], ema: bool, device, dtype, loras: Sequence = (),
               base: Path | None = None) -> Iterator[StableDiffusion]:  # fmt: skip
    """Each checkpoint in turn. Checkpoints of one model (a DreamBooth run's saves) are copied into the modules
    already on the device; a different model replaces the previous one, which is freed first. A LoRA file (when
    a `base` is given) is merged into the base, which is put back exactly before the next one."""
    from .lora import apply_loras, is_lora_file, read_lora, restore

    sd, loaded, originals = None, None, {}
    for path in paths:
        own = [(read_lora(path), 1.0)] if base is not None and is_lora_file(path) else []
        source = base if own else path
        if source != loaded:
            ckpt = read_checkpoint(source, ema=ema)
            model_hash = file_hash(source) if source.is_file() else None
            if sd is not None and sd.config == ckpt.config:
                load_model(ckpt, into=sd.model)
                sd.name, sd.model_hash = ckpt.name, model_hash
            else:
                sd = None
                sd = StableDiffusion.from_checkpoint(ckpt, device, dtype, model_hash)
            loaded, originals = source, {}
        restore(sd.model.state_dict(), originals)
        originals = apply_loras(sd, [*own, *loras])
        yield sd


def _render_one(
    sd: StableDiffusion, job: Job, folder: Path, label: str | None
) -> Iterator[tuple[Image.Image, Path]]:
    s, index = sd.resolve(job.settings), 0
    per_batch = steps_to_run(s.steps, job.strength) if job.image is not None else s.steps
    bar = tqdm(total=len(job.batches()) * per_batch, desc=label or "sampling", unit="step", file=sys.stderr,
               dynamic_ncols=True, leave=False)  # fmt: skip
    with bar, _out_of_memory_hint(s, job.batch_size):
        for seeds in job.batches():
            step = lambda info: bar.update(1)
            if job.image is None:
                images = sd.txt2img(job.prompt, job.negative_prompt, seeds, s, callback=step)
            else:
                images = sd.img2img(
                    job.image, job.prompt, job.negative_prompt, seeds, job.strength, s, callback=step
                )
            for image, seed in zip(images, seeds):
                text = parameters_text(
                    sd, job.prompt, job.negative_prompt, s, seed, job.strength if job.image else None
                )
                out = save_png(image, folder / f"{index:04d}.png", text)
                index += 1
                yield image, out


def parameters_text(sd: StableDiffusion, prompt: str, negative_prompt: str, s: Settings, seed: int,
                    strength: float | None = None) -> str:  # fmt: skip
    """AUTOMATIC1111's `parameters` text for one image made by `sd` with settings `s`."""
    params = {
        "Steps": s.steps, "Sampler": SAMPLER_NAMES[s.sampler], "Schedule type": SCHEDULE_NAMES[s.schedule],
        "CFG scale": s.scale, "Seed": seed, "Size": f"{s.width}x{s.height}", "Model hash": sd.model_hash,
        "Model": sd.name, "Denoising strength": strength,
        "Eta": s.eta if s.sampler in ("ddim", "euler_a", "dpmpp_2m_sde") else None,
        "Clip skip": s.clip_skip if s.clip_skip > 1 else None, "Lora hashes": _lora_hashes(sd),
        "Version": f"booth {__version__}",
    }  # fmt: skip
    return infotext(prompt, negative_prompt, params)


def _lora_hashes(sd: StableDiffusion) -> str | None:
    # A1111's field: "name: hash" per LoRA, the name without the characters that separate entries
    entries = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in getattr(sd, "loras", [])]
    return ", ".join(entries) or None


@contextlib.contextmanager
def _out_of_memory_hint(s: Settings, batch: int):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    hint = (f"out of memory generating {s.width}x{s.height} images in batches of {batch}: "
            "use a smaller -b/--batch-size or --hw, or --precision fp16")  # fmt: skip
    try:
        yield
    except oom:
        raise BoothError(hint) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise BoothError(hint) from None
        raise
