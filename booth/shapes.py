"""A synthetic captioned dataset of coloured shapes, drawn with PIL from a seed, and a judge that reads a shape
image back from its pixels. It is what booth's built-in demo model is trained on, and how tests check that the
model follows the prompt.

    a red circle on a blue background
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}  # fmt: skip
# Colour-shape pairs never drawn in training, so tests can ask for them and see whether the model generalises.
HELD_OUT = {("red", "triangle"), ("blue", "star"), ("green", "circle"), ("yellow", "square")}


@dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    background: str
    cx: float  # centre, as a fraction of the image side
    cy: float
    size: float  # outer radius, as a fraction of the image side
    angle: float  # rotation in degrees (squares, triangles and stars)

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def random_sample(rng: random.Random, held_out: bool = False) -> Sample:
    """A random scene; `held_out` picks only among the colour-shape pairs kept out of training."""
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        if ((color, shape) in HELD_OUT) == held_out:
            break
    background = rng.choice([c for c in COLORS if c != color])
    return Sample(shape, color, background, rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65),
                  rng.uniform(0.2, 0.3), rng.uniform(-15, 15))  # fmt: skip


def polygon(sample: Sample, side: float) -> list[tuple[float, float]]:
    cx, cy, r = sample.cx * side, sample.cy * side, sample.size * side
    if sample.shape == "square":
        corners = [(45 + 90 * k, r) for k in range(4)]
    elif sample.shape == "triangle":
        corners = [(-90 + 120 * k, r) for k in range(3)]
    else:  # a five-pointed star, inner radius 0.45 of the outer
        corners = [(-90 + 36 * k, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    a0 = sample.angle
    return [
        (cx + d * math.cos(math.radians(a + a0)), cy + d * math.sin(math.radians(a + a0))) for a, d in corners
    ]


def draw(
    sample: Sample, size: int = 64, outline: str | None = None, outline_width: float = 0.0
) -> Image.Image:
    """Render a scene, 4x supersampled for smooth edges. `outline` adds a border (DreamBooth test subjects)."""
    big = size * 4
    image = Image.new("RGB", (big, big), COLORS[sample.background])
    d = ImageDraw.Draw(image)
    width = round(outline_width * big)
    fill, line = COLORS[sample.color], COLORS[outline] if outline else None
    if sample.shape == "circle":
        cx, cy, r = sample.cx * big, sample.cy * big, sample.size * big * 0.9  # equal area to the eye
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=width)
    else:
        pts = polygon(sample, big)
        d.polygon(pts, fill=fill)
        if line and width:
            d.line(pts + pts[:1], fill=line, width=width, joint="curve")
    return image.resize((size, size), Image.LANCZOS)


def partial_caption(sample: Sample, rng: random.Random) -> str:
    """Captions that leave things out, so the model also answers "a star" or "a red star" (and "" for
    classifier-free guidance)."""
    r = rng.random()
    if r < 0.6:
        return sample.caption
    if r < 0.7:
        return f"a {sample.color} {sample.shape}"
    if r < 0.8:
        return f"a {sample.shape} on a {sample.background} background"
    if r < 0.9:
        return f"a {sample.shape}"
    return ""


def dataset(n: int, seed: int = 0, size: int = 64) -> Iterator[tuple[Image.Image, Sample]]:
    """`n` training scenes, the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(n):
        sample = random_sample(rng)
        yield draw(sample, size), sample


def outlined_star_subject(folder: Path | None = None) -> list[Image.Image]:
    """A DreamBooth subject the demo never saw: a green star with a thick white outline, in four scenes on
    varied backgrounds. With `folder`, also saved there as 0.png ... 3.png."""
    scenes = [("blue", 0.45, 0.5), ("red", 0.55, 0.45), ("yellow", 0.5, 0.55), ("blue", 0.5, 0.5)]
    images = [draw(Sample("star", "green", bg, cx, cy, 0.3, 6.0 * i), outline="white", outline_width=0.05)
              for i, (bg, cx, cy) in enumerate(scenes)]  # fmt: skip
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i}.png")
    return images


# ----------------------------------------------------------------------------- reading an image back


@dataclass(frozen=True)
class Judgement:
    color: str
    background: str
    shape: str
    compactness: float  # foreground area / area of the circle through the 90th-percentile outline radius
    solidity: float  # foreground area / area of its convex hull
    center: tuple[float, float]  # foreground centroid, as fractions of the side


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]


def foreground(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the pixels far from the background, the background's RGB: the median of the border pixels)
    of an (H, W, 3) float array."""
    bg_rgb = np.median(np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]]), axis=0)
    return np.sqrt(((px - bg_rgb) ** 2).sum(-1)) > 80, bg_rgb


def judge(image: Image.Image) -> Judgement:
    """What a shape image shows, from pixel statistics alone. The background is the colour of the border; the
    foreground is the pixels far from it. Two rotation-invariant measures tell the shape: solidity (area over
    convex-hull area) singles out the star, and compactness separates the convex ones: the area over the circle
    through the 90th percentile of the outline's distances from the centre (about 0.95 for a circle, 0.72 for a
    square, 0.51 for a triangle). A percentile rather than the farthest pixel, so that one bump on a generated
    circle does not make it a square."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    far, bg_rgb = foreground(px)
    background = nearest_color(bg_rgb)
    if far.sum() < 0.01 * far.size:
        return Judgement("none", background, "none", 0.0, 0.0, (0.5, 0.5))
    color = nearest_color(np.median(px[far], axis=0))
    ys, xs = np.nonzero(far)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    center = pts.mean(axis=0)
    inner = far.copy()  # the outline: foreground pixels with a background neighbour
    inner[1:-1, 1:-1] = far[1:-1, 1:-1] & far[:-2, 1:-1] & far[2:, 1:-1] & far[1:-1, :-2] & far[1:-1, 2:]
    by, bx = np.nonzero(far & ~inner)
    edge = np.stack([bx, by], axis=1).astype(np.float64) if len(bx) else pts
    radius = np.quantile(np.sqrt(((edge - center) ** 2).sum(1)), 0.9) + 0.5  # to the pixel's edge
    compactness = float(len(pts) / (math.pi * radius**2))
    solidity = float(len(pts) / max(_hull_area(edge), 1.0))
    if solidity < 0.8:
        shape = "star"
    else:
        shape = "circle" if compactness > 0.82 else "square" if compactness > 0.62 else "triangle"
    h, w = far.shape
    return Judgement(color, background, shape, compactness, solidity, (center[0] / w, center[1] / h))


def _hull_area(pts: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (Andrew's monotone chain over their corners)."""
    corners = np.unique(np.concatenate([pts + d for d in ((0, 0), (1, 0), (0, 1), (1, 1))]), axis=0)
    corners = corners[np.lexsort((corners[:, 1], corners[:, 0]))]

    def half(points):
        chain = []
        for p in points:
            while len(chain) >= 2 and np.cross(chain[-1] - chain[-2], p - chain[-2]) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = np.array(half(corners)[:-1] + half(corners[::-1])[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
