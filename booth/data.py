"""DreamBooth data: finding usable images, the seed tool's augmentations, and a resumable sampling order.

All randomness comes from an explicit `torch.Generator`, so a run resumed from saved state draws exactly the
batches and augmentations the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import BoothError
from .images import load_image


def readable_images(folder: Path) -> tuple[list[Path], list[str]]:
    """(the images of `folder` Pillow can read, sorted; the names of the other files). Hidden files are left out."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    good, skipped = [], []
    for p in files:
        try:
            load_image(p)
            good.append(p)
        except BoothError:
            skipped.append(p.name)
    return good, skipped


def find_images(folder: str | Path, what: str = "instance", warn: bool = True) -> list[Path]:
    """Readable images of `folder`, sorted; unreadable files are named in a warning and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise BoothError(f"the {what} images must be a folder of images; {folder} is a file")
        raise BoothError(f"{what} image folder not found: {folder}")
    good, skipped = readable_images(folder)
    if skipped and warn:
        print(f"booth: warning: skipping {len(skipped)} file(s) in {folder} that are not images: "
              f"{', '.join(skipped[:10])}", file=sys.stderr)  # fmt: skip
    if not good and not skipped:
        photos = (
            "the photos of your subject" if what == "instance" else "class images, or leave out --class-dir"
        )
        raise BoothError(f"{what} image folder {folder} is empty; put {photos} there")
    if not good:
        raise BoothError(f"no readable images in {folder} (skipped {len(skipped)} files that are not images)")
    return good


@dataclass
class Augment:
    """The seed tool's augmentations; each can be switched off from the CLI."""

    flip: bool = True  # horizontal flip with probability 1/2
    resize: bool = True  # aspect-preserving random zoom of up to `max_zoom` before the crop
    jitter: bool = True  # small random brightness, contrast and saturation changes
    max_zoom: float = 1.2
    jitter_amount: float = 0.1


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def prepare(image: Image.Image, size: tuple[int, int], aug: Augment | None = None,
            g: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """PIL image -> (3, H, W) tensor in [-1, 1]: aspect-preserving resize (randomly zoomed), center crop, then
    flip and colour jitter. With `aug=None` only the deterministic resize and crop are done."""
    h, w = size
    zoom = _uniform(g, 1.0, aug.max_zoom) if aug and aug.resize else 1.0
    scale = max(h / image.height, w / image.width) * zoom
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, Image.LANCZOS) if new != image.size else image
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    image = image.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if aug and aug.flip and torch.rand((), generator=g).item() < 0.5:
        x = x.flip(-1)
    if aug and aug.jitter:
        x = _jitter(x, aug.jitter_amount, g)
    return x * 2 - 1


def _jitter(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    b, c, s = (_uniform(g, 1 - amount, 1 + amount) for _ in range(3))
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    return ((x - gray) * s + gray).clamp(0, 1)


class Cycler:
    """Endless shuffled passes over n items; `state_dict` makes the order resumable."""

    def __init__(self, n: int, g: torch.Generator):
        self.n, self.g = n, g
        self.perm, self.pos = [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            out.append(self.perm[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"perm": list(self.perm), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = list(state["perm"]), int(state["pos"])


class ImageSet:
    """A folder's images, decoded once and kept in memory (DreamBooth uses a handful to a few hundred)."""

    def __init__(self, paths: list[Path], size: tuple[int, int], aug: Augment | None):
        self.paths, self.size, self.aug = paths, size, aug
        # Pre-shrink big photos once: every later random resize starts from at most max_zoom x the target.
        limit = max(size) * (aug.max_zoom if aug and aug.resize else 1.0)
        self.images = [_shrink(load_image(p), limit) for p in paths]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        return torch.stack([prepare(self.images[i], self.size, self.aug, g) for i in indices])


def _shrink(image: Image.Image, limit: float) -> Image.Image:
    short = min(image.size)
    if short <= limit * 1.5:
        return image
    scale = limit * 1.5 / short
    return image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.LANCZOS)
