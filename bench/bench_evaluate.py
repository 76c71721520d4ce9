"""How long `booth evaluate` scores a checkpoint compared with rendering it (issue 12: scoring must not dominate).

Per checkpoint, evaluate renders 25 prompts x 4 images plus 4 of the class prompt (104 images) and scores them:
DINO and CLIP image embeddings of every image (in batches of 16), CLIP text embeddings of the 25 prompts, the
means. This bench times both on the same device:
  - paper: SD1's full config with random weights (booth.config), one 512x512 image timed over a few sampling
    steps (the first excluded as warm-up) plus its decode, scaled to --steps; the towers in their real shapes
    (ViT-S/16 DINO, CLIP ViT-B/32) with random weights, saved in Hugging Face format and loaded as evaluate loads
    them, scoring 104 images;
  - demo: booth's demo model rendering and the shapes judge scoring the demo's prompt set, measured whole.

    python bench/bench_evaluate.py                  # CPU: a few minutes on 2 cores
    python bench/bench_evaluate.py --device cuda    # on a GPU (fp16 rendering)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

IMAGES, CLASS_IMAGES, PROMPTS = 100, 4, 25


def towers(folder: Path) -> tuple[Path, Path]:
    """Random DINO ViT-S/16 and CLIP ViT-B/32 in their published shapes, in Hugging Face format."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    dino = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              patch_size=16, image_size=224), add_pooling_layer=False)  # fmt: skip
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           patch_size=32, image_size=224), projection_dim=512))  # fmt: skip
    dino.save_pretrained(folder / "dino")
    clip.save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"


def score_paper(device: torch.device, folder: Path) -> float:
    """Seconds to score one checkpoint's 104 images and 25 prompts against 5 real photos."""
    from booth import metrics
    from booth.evaluate import PaperScorer

    dino, clip = towers(folder)
    scorer = PaperScorer(str(dino), str(clip), device)
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 255, (512, 512, 3), generator=gen, dtype=torch.uint8).numpy())
              for _ in range(IMAGES + CLASS_IMAGES + 5)]  # fmt: skip
    reals = scorer.reals(images[-5:])
    sync(device)
    start = time.perf_counter()
    per = IMAGES // PROMPTS
    for p in range(PROMPTS):
        scorer.score_prompt(images[p * per : (p + 1) * per], f"a dog number {p}", reals)
    scorer.score_class(images[IMAGES : IMAGES + CLASS_IMAGES], reals)
    metrics.mean_cosine(torch.zeros(1, 4), torch.ones(1, 4))
    sync(device)
    return time.perf_counter() - start


def render_sd1(device: torch.device, dtype: torch.dtype, steps: int, timed: int = 3) -> float:
    """Seconds to render one 512x512 SD1 image with `steps` DPM++ steps (classifier-free guidance)."""
    from booth.config import SD1
    from booth.model import LatentDiffusion
    from booth.options import Settings
    from booth.pipeline import StableDiffusion

    torch.manual_seed(0)
    sd = StableDiffusion(LatentDiffusion(SD1).to(device, dtype).eval(), device, dtype)
    seconds = []
    for n in (1, 1 + timed):  # the difference of two runs: the per-step cost without loading and decoding
        sync(device)
        start = time.perf_counter()
        sd.txt2img("a dog", "", [0], Settings(steps=n, height=512, width=512))
        sync(device)
        seconds.append(time.perf_counter() - start)
    per_step = (seconds[1] - seconds[0]) / timed
    return seconds[0] - per_step + per_step * steps


def demo(device: torch.device) -> tuple[float, float]:
    """(render, score) seconds of one demo checkpoint over the demo's prompts, 4 images each plus the class's."""
    from booth.evaluate import DemoScorer, demo_prompts
    from booth.formats import DEMO_FILE
    from booth.options import Settings
    from booth.pipeline import StableDiffusion
    from booth.shapes import outlined_star_subject

    sd = StableDiffusion.from_pretrained(str(DEMO_FILE), device=device)
    prompts = [*demo_prompts("sks star"), "a star"]
    start = time.perf_counter()
    images = [sd.txt2img(p, "", [0, 1, 2, 3], Settings()) for p in prompts]
    render = time.perf_counter() - start
    scorer = DemoScorer("star")
    start = time.perf_counter()
    palette = scorer.reals(outlined_star_subject())
    for p, ims in zip(prompts[:-1], images[:-1]):
        scorer.score_prompt(ims, p, palette)
    scorer.score_class(images[-1], palette)
    return render, time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=25, help="evaluate's default sampling steps (25)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        score = score_paper(device, Path(tmp))
    image = render_sd1(device, dtype, args.steps)
    render = image * (IMAGES + CLASS_IMAGES)
    demo_render, demo_score = demo(device)
    result = {"device": str(device), "sd1_seconds_per_image": round(image, 2),
              "paper_render_s": round(render, 1), "paper_score_s": round(score, 2),
              "paper_score_share": round(score / (score + render), 4),
              "demo_render_s": round(demo_render, 2), "demo_score_s": round(demo_score, 2),
              "demo_score_share": round(demo_score / (demo_score + demo_render), 3)}  # fmt: skip
    print(json.dumps(result), file=sys.stdout)


if __name__ == "__main__":
    main()
