"""Image I/O: reading user images safely, tensors <-> PIL, PNGs with AUTOMATIC1111 metadata, grids."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin, UnidentifiedImageError

from . import __version__
from .atomic import atomic_path
from .errors import BoothError
from .options import SAMPLERS, SCHEDULES, Settings


def load_image(path: str | os.PathLike) -> Image.Image:
    """Any image PIL reads, upright (EXIF orientation applied) and in RGB; transparency becomes white."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise BoothError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise BoothError(f"{path} is a folder, not an image") from None
    except Image.DecompressionBombError as e:
        raise BoothError(f"{path} is too large to load ({str(e)[:120]}); scale it down first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BoothError(f"{path} is not a readable image ({e.__class__.__name__}: {str(e)[:120]})") from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: convert() would clip it to white
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return im.convert("RGB")  # grayscale, CMYK, palette, 16-bit: all to 8-bit RGB


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float in [-1, 1]; `size` is (height, width), resized with Lanczos."""
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images (rounded the way diffusers does, so pixels compare)."""
    arr = (
        ((images.float() / 2 + 0.5).clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in arr]


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The `parameters` text AUTOMATIC1111 writes (and it, ComfyUI nodes and civitai read back)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def parameters_text(sd, prompt: str, negative_prompt: str, s: Settings, seed: int,
                    strength: float | None = None) -> str:  # fmt: skip
    """AUTOMATIC1111's `parameters` text for one image made by `sd` (a booth.pipeline.StableDiffusion) with the
    resolved settings `s`."""
    sampler = SAMPLERS[s.sampler]
    loras = ", ".join(
        f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in sd.loras
    )  # A1111's separators
    params = {
        "Steps": s.steps, "Sampler": sampler.label, "Schedule type": SCHEDULES[s.schedule], "CFG scale": s.scale,
        "Seed": seed, "Size": f"{s.width}x{s.height}", "Model hash": sd.model_hash, "Model": sd.name,
        "VAE hash": sd.vae[1] if sd.vae else None, "VAE": sd.vae[0] if sd.vae else None,
        "Denoising strength": strength, "Eta": s.eta if sampler.eta is not None else None,
        "Clip skip": s.clip_skip if s.clip_skip > 1 else None, "Lora hashes": loras or None,
        "Prediction": s.prediction if s.prediction not in (None, "eps") else None,
        "CFG rescale": s.cfg_rescale or None,
        "Noise schedule": "Zero Terminal SNR" if s.zero_snr else None,
        "Version": f"booth {__version__}",
    }  # fmt: skip
    return infotext(prompt, negative_prompt, params)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of `infotext` for the simple cases: (prompt, negative prompt, parameters)."""
    *head, last = text.split("\n")
    prompt_lines, neg_lines = [], None
    for line in head:  # as AUTOMATIC1111: every line after "Negative prompt: " belongs to the negative prompt
        if neg_lines is None and line.startswith("Negative prompt: "):
            neg_lines = [line[len("Negative prompt: ") :]]
        elif neg_lines is not None:
            neg_lines.append(line)
        else:
            prompt_lines.append(line)
    neg = "\n".join(neg_lines or [])
    params, rest = {}, last
    while rest:
        key, _, rest = rest.partition(": ")
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
            rest = "," + rest if rest else ""
        params[key.strip()] = str(value)
        rest = rest[2:] if rest.startswith(", ") else rest.lstrip(",")
    return "\n".join(prompt_lines), neg, params


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write a PNG atomically, with AUTOMATIC1111's `parameters` text chunk when given."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None) -> Image.Image:
    """Images in a rows x columns sheet, an optional label above each row."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    label_h = 20 if labels else 0
    sheet = Image.new("RGB", (cols * w, len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (h + label_h)
        if labels:
            draw.text((4, top + 4), labels[r], fill="black")
        for c, im in enumerate(row):
            sheet.paste(im.resize((w, h)) if im.size != (w, h) else im, (c * w, top + label_h))
    return sheet
