"""The README's pictures of the built-in demo model: a grid of prompts, and a DreamBooth before/after.

python examples/demo_figures.py            # writes docs/demo-grid.png and docs/demo-dreambooth.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

from booth.cli import main as booth
from booth.images import grid, save_png
from booth.pipeline import StableDiffusion
from booth.shapes import COLORS, SHAPES, outlined_star_subject

DOCS = Path(__file__).resolve().parents[1] / "docs"
ZOOM = 2  # 64 px images are small on a page


def big(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def prompt_grid(sd: StableDiffusion) -> Image.Image:
    colors = list(COLORS)
    rows, labels = [], []
    for i, shape in enumerate(SHAPES):
        row = []
        for j, color in enumerate(colors):
            background = colors[(j + i + 1) % len(colors)]
            if background == color:
                background = colors[(j + i + 2) % len(colors)]
            row.append(big(sd.txt2img(f"a {color} {shape} on a {background} background", seeds=[j])[0]))
        rows.append(row)
        labels.append(f"a <colour> {shape} on a <colour> background")
    return grid(rows, labels)


def dreambooth_figure(sd: StableDiffusion, tmp: Path) -> Image.Image:
    inputs = outlined_star_subject(tmp / "subject")
    code = booth(["dreambooth", "-m", "demo", "-c", "star", "-i", str(tmp / "subject"), "-o", str(tmp / "run"),
                  "--iterations", "600", "--learning-rate", "1e-4", "--class-img-count", "20", "--ddim-steps", "20",
                  "--seed", "0", "--no-random-resize"])  # fmt: skip
    if code:
        sys.exit(code)
    after = StableDiffusion.from_pretrained(str(tmp / "run" / "run0" / "ckpts" / "step-000600.safetensors"))
    prompts = [f"a sks star on a {bg} background" for bg in ("black", "white", "red", "yellow")]
    before_row = [big(sd.txt2img(p, seeds=[0])[0]) for p in prompts]
    after_row = [big(after.txt2img(p, seeds=[0])[0]) for p in prompts]
    return grid([[big(i) for i in inputs], before_row, after_row],
                ["the 4 training images", "before: a sks star on a black/white/red/yellow background", "after 600 steps (lambda 1)"])  # fmt: skip


if __name__ == "__main__":
    DOCS.mkdir(exist_ok=True)
    demo = StableDiffusion.from_pretrained("demo")
    save_png(prompt_grid(demo), DOCS / "demo-grid.png")
    with tempfile.TemporaryDirectory() as tmp:
        save_png(dreambooth_figure(demo, Path(tmp)), DOCS / "demo-dreambooth.png")
    print(DOCS / "demo-grid.png")
    print(DOCS / "demo-dreambooth.png")
