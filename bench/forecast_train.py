"""booth's training-memory forecast (booth.train.forecast, issue 7) for the recipes the anchors report, on a
CUDA device with bf16, without one: the forecast traces a training step on fake tensors from the model's config
alone. These are forecasts, not measurements; bench/gpu_check.sh measures on a GPU.

    python bench/forecast_train.py                  # SDXL at 1024x1024
    python bench/forecast_train.py --family sd1     # SD1 at 512x512
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from booth import config as configs  # noqa: E402
from booth.options import TrainConfig  # noqa: E402
from booth.train import forecast  # noqa: E402

FAMILIES = {"sd1": configs.SD1, "sdxl": configs.SDXL}
LORA = dict(lora=16, gradient_checkpointing=True)
# "prior": prior preservation with the class images already made (making them is its own, earlier phase)
RECIPES = [  # (name, TrainConfig fields, whether class images are made)
    ("default (AdamW, fp32 weights), prior", {}, False),
    (
        "--optimizer adamw8bit --gradient-checkpointing, prior",
        dict(optimizer="adamw8bit", gradient_checkpointing=True),
        False,
    ),
    ("--lean, prior", dict(lean=True), False),
    ("--lean, no prior", dict(lean=True, lamb=0), False),
    ("--lean -t, prior", dict(lean=True, train_text_encoder=True), False),
    ("LoRA 16 + gradient checkpointing, prior", LORA, False),
    ("LoRA 16 + gradient checkpointing, no prior", dict(LORA, lamb=0), False),
    ("LoRA 16 + gradient checkpointing + --split-prior, prior", dict(LORA, split_prior=True), False),
    ("LoRA 16 --lean, prior", dict(lora=16, lean=True), False),
    ("LoRA 16 + gradient checkpointing, prior, class images made", LORA, True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    p.add_argument("--only", help="the recipes whose name holds this text")
    p.add_argument("--gb", type=int, default=1, help="class images per forward pass (booth's --gb)")
    args = p.parse_args()
    config = FAMILIES[args.family]
    cuda = torch.device("cuda", 0)
    print(f"{args.family} at {config.sample_size}x{config.sample_size}, cuda (bf16), --gb {args.gb}: GB")
    print(f"{'recipe':<62} {'total':>6} {'weights':>8} {'optim':>6} {'step':>6} {'sampling':>8}")
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        for name, fields, generate in RECIPES:
            if args.only and args.only not in name:
                continue
            cfg = TrainConfig(class_name="dog", instance_dir=".", generation_batch_size=args.gb, **fields)
            cfg = dataclasses.replace(cfg).resolve(config.sample_size, 0)
            f = forecast(cfg, config, cuda, itemsize=2, photos=5, generate=generate)
            row = (f.total, f.weights, f.optimizer, f.step, f.sampling)
            print(f"{name:<62} " + " ".join(f"{n / 1e9:>{w}.2f}" for n, w in zip(row, (6, 8, 6, 6, 8))))


if __name__ == "__main__":
    main()
