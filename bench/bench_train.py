"""Peak memory and seconds per step of DreamBooth training: booth's loop against the same step through diffusers'
modules (UNet2DConditionModel, AutoencoderKL, transformers' CLIPTextModel, torch AdamW), each in its own process.

One step = encode 1 instance + 1 class image with the frozen VAE, noise them, UNet forward and backward with
the DreamBooth loss (prior preservation), gradient clipping, AdamW. Full SD1 config, random weights.

    python bench/bench_train.py                                    # CPU, fp32, 256x256
    python bench/bench_train.py --gradient-checkpointing
    python bench/bench_train.py --device cuda --precision fp16 --size 512 --steps 20 --gradient-checkpointing
    python bench/bench_train.py --lora 4                           # LoRA and full fine-tuning side by side
    python bench/bench_train.py --optimizer adafactor --fused-backward
    python bench/bench_train.py --modes --size 64 --steps 3         # diffusers' AdamW against booth's modes

--modes runs, in one go, diffusers' AdamW step and booth's default, `--optimizer adamw8bit` (where bitsandbytes
imports) and `--lean`, and prints each one's peak and its ratio to diffusers', and booth's memory forecast of
each run against its peak (on the CPU the whole run's, its final checkpoint included).

--optimizer adafactor is transformers' Adafactor with kohya's settings on the diffusers side. --fused-backward
is booth's alone (diffusers' script has no such step): the diffusers side then steps after the backward pass.

With --lora RANK both sides also train rank-RANK adapters on the attention projections of a frozen UNet
(booth's --lora; diffusers: peft adapters added with UNet2DConditionModel.add_adapter, as its LoRA DreamBooth
script does), at the LoRA learning rate 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from common import run_worker

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import peak_rss_mb, prepare  # noqa: E402


def class_images(folder: Path, n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


def worker_booth(args) -> dict:
    from booth.options import TrainConfig
    from booth.train import train

    out = Path(args.workdir) / f"train-runs-{os.getpid()}"
    flags = dict(gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                 fused_backward=args.fused_backward, precision=args.precision)  # fmt: skip
    flags.update(json.loads(args.overrides))  # --modes: e.g. {"lean": true, "optimizer": null, ...}
    cfg = TrainConfig(class_name="dog", instance_dir=args.instance_dir, model=args.model, class_dir=args.class_dir,
                      class_img_count=2, hw=(args.size, args.size), iterations=args.steps, devices=[args.device],
                      lora=args.lora or None, **flags)  # fmt: skip
    forecast = _forecast(cfg, args.device)
    try:
        run = train(cfg, out).parents[1]  # OUT/run0/ckpts/step-N.safetensors
        m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finally:  # a full fine-tuning run leaves a 2 GB checkpoint and a 10 GB state: only the metrics are needed
        shutil.rmtree(out, ignore_errors=True)
    peak = m[-1]["peak_memory_mb"]
    cuda = args.device.startswith("cuda")
    out = {"s_per_step": sum(r["seconds"] for r in m[1:]) / (len(m) - 1),
           ("peak_cuda_mb" if cuda else "peak_rss_mb"): peak, "forecast_mb": forecast / 2**20}  # fmt: skip
    if not cuda:  # the whole run's peak, its last save included: what the forecast is of
        out["run_peak_rss_mb"] = peak_rss_mb()
    return out


def _forecast(cfg, device: str) -> float:
    """booth's memory forecast of the run (train() prints it too), in bytes; on the CPU with the process so far."""
    import torch

    from booth import memory
    from booth.hub import find_model
    from booth.train import forecast, forecast_inputs

    cfg, config, inputs = forecast_inputs(cfg, find_model(cfg.model, "-m").path)
    need = forecast(cfg, config, torch.device(device), **inputs)
    return need.total + (memory.resident_bytes() if device == "cpu" else 0)


def worker_diffusers(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(args.device)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    frozen = half or torch.float32
    folder = Path(args.model)
    unet = UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=frozen if args.lora else torch.float32
    )
    unet = unet.to(device).train()
    params = _diffusers_lora(unet, args.lora) if args.lora else list(unet.parameters())
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=frozen).to(device).requires_grad_(False)
    te = (
        CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=frozen)
        .to(device)
        .requires_grad_(False)
    )
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    ids = tok(["a sks dog", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(
        device
    )
    with torch.no_grad():
        ctx = te(ids)[0]
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4 if args.lora else 5e-6, weight_decay=1e-2)
    elif args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-4 if args.lora else 5e-6, weight_decay=1e-2, scale_parameter=False,
                        relative_step=False, warmup_init=False)  # fmt: skip
    else:
        opt = torch.optim.AdamW(params, lr=1e-4 if args.lora else 5e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    paths = sorted(Path(args.instance_dir).glob("*.jpg"))[:1] + sorted(Path(args.class_dir).glob("*.png"))[:1]
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((args.size, args.size)), dtype=np.float32))
        .permute(2, 0, 1) / 127.5 - 1 for p in paths
    ])  # fmt: skip
    stamps = []
    for _ in range(args.steps):
        with torch.no_grad():
            x0 = vae.encode(images.to(device, frozen)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (2,), device=device)
        noisy = sched.add_noise(x0.float(), noise.float(), t)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred[:1].float(), noise[:1].float()) + F.mse_loss(
            pred[1:].float(), noise[1:].float()
        )
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    per = [b - a for a, b in zip(stamps, stamps[1:])]
    out = {"s_per_step": sum(per) / len(per)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = peak_rss_mb()
    return out


def _diffusers_lora(unet, rank: int) -> list:
    """diffusers' LoRA DreamBooth recipe: frozen UNet, peft adapters on to_q/k/v/out.0, trained in fp32."""
    import torch
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(torch.float32)
    return params


def spawn(which: str, model: Path, args, overrides: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--device", args.device, "--size",
           str(args.size), "--steps", str(args.steps), "--optimizer", args.optimizer, "--workdir", str(args.workdir),
           "--instance-dir", str(args.instance_dir), "--class-dir", str(args.class_dir),
           "--overrides", json.dumps(overrides or {})]  # fmt: skip
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--fused-backward"] if args.fused_backward else []
    cmd += ["--lora", str(args.lora)] if args.lora else []
    return run_worker(cmd, which)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "adafactor"])
    p.add_argument("--fused-backward", action="store_true", help="booth only: the step fused into backward")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="also run LoRA training of this rank")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".cache")
    p.add_argument("--instance-dir", type=Path, default=Path(__file__).parents[1] / "tests" / "data" / "dog")
    p.add_argument("--class-dir", type=Path, default=None)
    p.add_argument(
        "--modes", action="store_true", help="diffusers' AdamW against booth's default, adamw8bit, --lean"
    )
    p.add_argument("--worker", choices=["booth", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((worker_booth if args.worker == "booth" else worker_diffusers)(args)))
        return
    file, folder = prepare(args.workdir)
    args.class_dir = args.class_dir or class_images(args.workdir / "class-imgs")
    if args.modes:
        return modes(file, folder, args)
    rank, args.lora = args.lora, 0
    results = {"booth": spawn("booth", file, args), "diffusers": spawn("diffusers", folder, args)}
    if rank:
        args.lora = rank
        results.update(
            {"booth LoRA": spawn("booth", file, args), "diffusers LoRA": spawn("diffusers", folder, args)}
        )
    print(f"DreamBooth step, SD1 random weights, {args.device} {args.precision or 'default precision'}, "
          f"{args.size}x{args.size}, 1 instance + 1 class image, {args.optimizer}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', booth with --fused-backward' if args.fused_backward else ''}"
          f"{f', LoRA rank {rank} on attention' if rank else ''}")  # fmt: skip
    pairs = [("booth", "diffusers")] + ([("booth LoRA", "diffusers LoRA")] if rank else [])
    print(
        f"{'metric':<16}"
        + "".join(f"{name:>16}" for name in results)
        + "".join(f"{a + '/' + b.split()[0]:>22}" for a, b in pairs)
    )
    for metric in results["booth"]:
        row = "".join(f"{r[metric]:>16.3f}" for r in results.values())
        print(
            f"{metric:<16}{row}"
            + "".join(f"{results[a][metric] / results[b][metric]:>22.3f}" for a, b in pairs)
        )


def modes(file: Path, folder: Path, args) -> None:
    """The issue's table: one diffusers AdamW step against booth's memory modes, each in its own process."""
    import importlib.util

    lean = {"lean": True, "optimizer": None, "fused_backward": None, "gradient_checkpointing": None,
            "precision": None}  # fmt: skip
    runs = {"diffusers AdamW": ("diffusers", {}), "booth default": ("booth", {})}
    if importlib.util.find_spec("bitsandbytes"):
        runs["booth adamw8bit"] = ("booth", {"optimizer": "adamw8bit"})
    runs["booth --lean"] = ("booth", lean)
    results = {
        name: spawn(which, file if which == "booth" else folder, args, o) for name, (which, o) in runs.items()
    }
    print(
        f"DreamBooth step, SD1 random weights, {args.device}, {args.size}x{args.size}, 1 instance + 1 class image"
    )
    ref = results["diffusers AdamW"]
    for name, r in results.items():
        line = "".join(f"  {k} {v:10.1f} ({v / ref[k]:.2f}x)" for k, v in r.items() if k in ref)
        if "forecast_mb" in r:  # against the whole run's peak on the CPU, the step's on a GPU
            peak = r.get("run_peak_rss_mb") or r["peak_cuda_mb"]
            line += f"  forecast {r['forecast_mb']:10.1f} ({r['forecast_mb'] / peak:.2f}x the run's peak)"
        print(f"{name:<18}{line}")


if __name__ == "__main__":
    main()
