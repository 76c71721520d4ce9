"""A render job to files: which models `-c`/`-m` name (`rows`), then a run folder with args.yaml, prompt.txt, PNGs
with AUTOMATIC1111 metadata and, when several checkpoints are compared, a grid."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from . import __version__
from .atomic import write_text
from .checkpoint import file_hash, read_checkpoint, read_config, use_vae
from .device import out_of_memory
from .errors import BoothError
from .formats import Found, not_a_model, safetensors_metadata
from .hub import DEFAULT_MODEL, find, find_model, find_vae, parse
from .images import grid, load_image, parameters_text, save_png
from .lora import LoRA, read_lora
from .memory import available_bytes, format_gb, part_bytes, sampling_bytes
from .options import Job, Settings
from .pipeline import StableDiffusion, resolve_settings, steps_to_run


@dataclass(frozen=True)
class Row:
    """One row of a render: a model, and the LoRA file of a LoRA run's checkpoint merged into it (or none)."""

    model: Path
    lora: Path | None = None

    @property
    def path(self) -> Path:
        """What the row shows: the LoRA file if there is one, else the model."""
        return self.lora or self.model


def rows(ckpt: str | None, model: str | None) -> list[Row]:
    """The models `-c` and `-m` name: one model, every checkpoint of a folder, or a folder of LoRA files (a LoRA
    run's ckpts/), each over the base `-m` names, else the base the files record, else sd15."""
    two = bool(ckpt and model and ckpt != model)
    once = ("give the model once: -c/--ckpt-path and -m/--model name the same thing (-m names a base only when "
            "-c is a folder of LoRA files)")  # fmt: skip
    if two and not Path(ckpt).is_dir():  # before anything is downloaded
        raise BoothError(once)
    found = find(ckpt or model or DEFAULT_MODEL)
    if found.kind == "lora":
        raise not_a_model(found.path, found.kind)
    members = found.members if found.kind == "folder" else (found,)
    loras = [m for m in members if m.kind == "lora"]
    if two and not loras:
        raise BoothError(once)
    if not loras:
        return [Row(m.path) for m in members]
    base = find_model(model, "-m") if two else _recorded_base(loras)
    return [Row(base.path, m.path) if m.kind == "lora" else Row(m.path) for m in members]


def _recorded_base(loras: list[Found]) -> Found:
    spec = next((safetensors_metadata(m.path).get("booth.base_model") for m in loras
                 if m.path.suffix == ".safetensors"), None)  # fmt: skip
    if spec:
        try:
            parse(spec)  # an alias or repo id (fetched if needed), or a local file that is still there
            return find_model(spec, "-m")
        except BoothError:
            print(f"booth: the LoRAs' base model {spec} is not here; using {DEFAULT_MODEL} (give the base with -m)",
                  file=sys.stderr)  # fmt: skip
    return find_model(DEFAULT_MODEL, "-m")


def render(job: Job, models: Sequence[Row], run: Path | Callable[[], Path], device: torch.device,
           dtype: torch.dtype, loras: Sequence[tuple[LoRA, float]] = (), image: Image.Image | None = None,
           low_memory: bool = False) -> Iterator[Path]:  # fmt: skip
    """Render `job` with each model into `run`; yields every image path as soon as it is written. `run` may be a
    function making the folder: it is called once the first model has been checked, so a bad checkpoint leaves
    none. `loras` ((LoRA, weight) pairs) are merged into every model; `image` is job.image already read, if it
    was. With `low_memory` (or when the forecast says the whole model would not fit), only the network at work is
    kept on the device."""
    job = job if job.seed is not None else replace(job, seed=random.randrange(2**32))
    job.validate()
    if job.image is not None and image is None:
        image = load_image(job.image)
    settings, low = _resolve(job, models, image, device, dtype, low_memory)
    loaded = _load_each(models, job, device, dtype, loras, low)
    sd = next(loaded)  # only once the first model has loaded is the run folder made
    run = run() if callable(run) else run
    _write_record(run, job, settings[0], models, device, dtype, loras)
    names, grid_rows = _names(models), []
    for k, (row, s, name) in enumerate(zip(models, settings, names)):
        if k:
            del sd  # so that a differently shaped model is built only after this one is freed
            sd = next(loaded)
        folder = run / "samples" / (name if len(models) > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for im, out in _render_one(sd, job, s, image, folder, row.path.name if len(models) > 1 else None):
            images.append(im)
            yield out
        grid_rows.append(images)
    if len(models) > 1:
        yield save_png(grid(grid_rows, names), run / "grid.png")


def _resolve(
    job: Job, models: Sequence[Row], image, device, dtype, low_memory: bool
) -> tuple[list[Settings], bool]:
    """Each model's complete settings (its own size where none is given), checked against the memory there is
    before any weights are read: from the file headers alone. Also whether to keep only the network at work on
    the device: as asked, or because the whole model would not fit."""
    out, low = [], low_memory
    vae = find_vae(job.vae) if job.vae is not None else None
    for row in models:
        config = read_config(row.model)
        if vae is not None:  # the VAE fits every model (from the headers alone)
            use_vae(read_checkpoint(row.model, lazy=True), vae, lazy=True)
        s = resolve_settings(config, job.settings, image.size if image is not None else None, row.path.name)
        low = _check_memory(config, s, job.batch_size, device, dtype, image is not None, low)
        out.append(s)
    return out, low


def _check_memory(config, s: Settings, batch: int, device, dtype, encode: bool, low_memory: bool) -> bool:
    """Whether only the network at work should stay on the device, from the forecast (the weights on the device,
    and the largest activations) and the free memory; refuse a size or batch that would not fit even so."""
    itemsize, parts = dtype.itemsize, part_bytes(config, dtype.itemsize)
    acts = sampling_bytes(config, s.height, s.width, batch, itemsize, guidance=s.scale != 1, encode=encode)
    # The encoders run alone (the text encoder is let go before the UNet is read); the decoder beside the UNet.
    whole = max(parts["text_encoder"], parts["vae_encoder"], parts["unet"] + parts["vae_decoder"]) + acts
    lean = max(parts.values()) + acts
    free = available_bytes(device)
    if free is None or (low_memory and lean <= free) or whole <= free:
        return low_memory
    if lean > free:
        raise BoothError(
            f"{s.width}x{s.height} images in batches of {batch} need about {format_gb(lean)} on {device}, and "
            f"{format_gb(free)} is free: give a smaller --hw (the model's own size is {config.sample_size}) or "
            "-b/--batch-size"
        )
    print(f"booth: the model needs about {format_gb(whole)} on {device} and {format_gb(free)} is free: keeping only "
          f"the network at work there (--low-memory)", file=sys.stderr)  # fmt: skip
    return True


def _names(models: Sequence[Row]) -> list[str]:
    """One sample folder per checkpoint, by stem; by full name when two stems clash (a.ckpt and a.safetensors)."""
    names = [r.path.stem for r in models]
    return names if len(set(names)) == len(names) else [r.path.name for r in models]


def _write_record(run: Path, job: Job, s: Settings, models: Sequence[Row], device, dtype,
                  loras: Sequence[tuple[LoRA, float]]) -> None:  # fmt: skip
    """args.yaml: what was asked and what it resolved to (the seed drawn, the schedule and eta the sampler
    chose, the size), so the run can be repeated; prompt.txt: the prompt alone."""
    record = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
              "variations": job.variations, "batch_size": job.batch_size, "hw": [s.height, s.width],
              "steps": s.steps, "sampler": s.sampler, "schedule": s.schedule, "scale": s.scale, "eta": s.eta,
              "clip_skip": s.clip_skip, "ema": job.ema}  # fmt: skip
    if job.image is not None:
        record.update(image=str(job.image), strength=job.strength)
    record.update(models=[str(r.model) for r in models], row_loras=[str(r.lora) for r in models if r.lora],
                  loras=[f"{lora.path}:{w:g}" for lora, w in loras], device=str(device),
                  dtype=str(dtype).replace("torch.", ""), booth_version=__version__)  # fmt: skip
    write_text(run / "args.yaml", yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    write_text(run / "prompt.txt", job.prompt + "\n")


def _load_each(models: Sequence[Row], job: Job, device, dtype, loras: Sequence[tuple[LoRA, float]],
               low_memory: bool) -> Iterator[StableDiffusion]:  # fmt: skip
    """Each row's model in turn, checked but read a network at a time as sampling needs them. Checkpoints of one
    model (a DreamBooth run's saves) reuse the pipeline; a different model replaces the previous one, which is
    freed first. A row's own LoRA is merged into its base, which the pipeline puts back exactly before the next."""
    sd, loaded = None, None
    for row in models:
        if row.model != loaded:
            ckpt = read_checkpoint(row.model, ema=job.ema, lazy=True)
            if job.vae is not None:
                use_vae(ckpt, find_vae(job.vae), lazy=True)
            model_hash = file_hash(row.model) if row.model.is_file() else None
            if sd is not None and sd.config == ckpt.config:
                sd.load_weights(ckpt, model_hash)
            else:
                sd = None  # so that the previous model is freed before the next one is built
                sd = StableDiffusion.from_checkpoint(ckpt, device, dtype, model_hash, low_memory)
            loaded = row.model
        own = [(read_lora(row.lora), 1.0)] if row.lora else []
        sd.set_loras([*own, *loras])
        yield sd


def _render_one(sd: StableDiffusion, job: Job, s: Settings, image: Image.Image | None, folder: Path,
                label: str | None) -> Iterator[tuple[Image.Image, Path]]:  # fmt: skip
    per_batch = steps_to_run(s.steps, job.strength) if image is not None else s.steps
    batches = -(-job.variations // job.batch_size)
    bar = tqdm(total=batches * per_batch, desc=label or "sampling", unit="step", file=sys.stderr,
               dynamic_ncols=True, leave=False)  # fmt: skip
    hint = (f"generating {s.width}x{s.height} images in batches of {job.batch_size}: use a smaller -b/--batch-size "
            "or --hw, --precision fp16, or --low-memory")  # fmt: skip
    index = 0
    with bar, out_of_memory(hint):
        for seeds in job.batches():
            step = lambda info: bar.update(1)  # noqa: E731
            if image is None:
                images = sd.txt2img(job.prompt, job.negative_prompt, seeds, s, callback=step)
            else:
                images = sd.img2img(
                    image, job.prompt, job.negative_prompt, seeds, job.strength, s, callback=step
                )
            for im, seed in zip(images, seeds):
                text = parameters_text(
                    sd, job.prompt, job.negative_prompt, s, seed, job.strength if image else None
                )
                yield im, save_png(im, folder / f"{index:04d}.png", text)
                index += 1
