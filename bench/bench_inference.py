"""booth against diffusers, in one run, on the same weights and settings.

Each measurement runs in its own process so peak memory is that library's alone:
  - load: time to build the pipeline from disk, and peak host RSS while doing it;
  - sample: seconds per denoising step (DDIM, classifier-free guidance, so two UNet passes per step), the
    first step excluded as warm-up; peak host RSS and, on CUDA, peak allocated GPU memory over the whole run;
  - total: from the start of loading to the decoded images (booth reads each network when it is first needed,
    so its reading shows here, not in load).

Default: full SD1 config, random weights (written once to --workdir as a diffusers fp16 folder, which diffusers
loads, and as an fp16 and an fp32 .safetensors file and an fp16 .ckpt), CPU fp32 at 256x256. booth loads each of
the four, and the fp16 file again with --low-memory; every row is compared with diffusers' one run.
On a GPU: `--device cuda --dtype fp16 --size 512`.

`--family sdxl`: full SDXL base (2.57 B UNet parameters, both text encoders) in random weights instead, written as
an fp16 .safetensors file (SGM's layout) and as diffusers' fp16 folder (StableDiffusionXLPipeline); booth loads the
file, diffusers its folder. About 7 GB of disk for each, and 16 GB of memory to write them.

    python bench/bench_inference.py                       # CPU: about 6 minutes on 2 cores
    python bench/bench_inference.py --family sdxl --size 512 --steps 3 --formats safetensors
    python bench/bench_inference.py --formats safetensors # booth from the fp16 file only
    python bench/bench_inference.py --device cuda --dtype fp16 --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import run_worker

PROMPT = "a photo of an astronaut riding a horse on mars"


def peak_rss_mb() -> float:
    """The whole process's peak RSS (VmHWM: fresh in each worker), as booth's own metrics measure it."""
    import torch

    from booth.device import peak_memory_mb

    return peak_memory_mb(torch.device("cpu"))


FORMATS = ("safetensors", "safetensors-fp32", "ckpt", "diffusers", "low-memory")


def prepare_sdxl(workdir: Path) -> dict[str, Path]:
    """Random SDXL weights, made in fp16 (half the memory of fp32), as a single file and a diffusers folder."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import diffusers_sdxl_pipeline

    from booth.checkpoint import save_checkpoint
    from booth.config import SDXL
    from booth.model import build

    files = {
        "safetensors": workdir / "sdxl-random.safetensors",
        "diffusers": workdir / "sdxl-random-diffusers",
    }
    files["low-memory"] = files["safetensors"]
    if files["safetensors"].exists() and (files["diffusers"] / "model_index.json").exists():
        return files
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    model = build(SDXL, device="cpu")
    save_checkpoint(model.state_dict(), files["safetensors"], dtype=torch.float16)
    diffusers_sdxl_pipeline(model, workdir / "tokenizer-xl").save_pretrained(
        files["diffusers"], safe_serialization=True
    )
    torch.set_default_dtype(torch.float32)
    return files


def prepare(workdir: Path) -> dict[str, Path]:
    """Random SD1 weights in each format (the diffusers folder converted by diffusers), written once."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import diffusers_pipeline

    from booth.checkpoint import read_checkpoint, save_checkpoint
    from booth.config import SD1
    from booth.model import random_weights

    files = {"safetensors": workdir / "sd1-random.safetensors", "diffusers": workdir / "sd1-random-diffusers",
             "safetensors-fp32": workdir / "sd1-random-fp32.safetensors", "ckpt": workdir / "sd1-random.ckpt"}  # fmt: skip
    files["low-memory"] = files["safetensors"]
    if not files["safetensors"].exists() or not (files["diffusers"] / "model_index.json").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        model = random_weights(SD1, seed=0)
        save_checkpoint(model.state_dict(), files["safetensors"], dtype=torch.float16)
        pipe = diffusers_pipeline(model, workdir / "tokenizer")
        pipe.to(torch.float16).save_pretrained(files["diffusers"], safe_serialization=True)
        del model, pipe
    if not files["safetensors-fp32"].exists() or not files["ckpt"].exists():
        sd16 = read_checkpoint(files["safetensors"]).state_dict
        torch.save({"state_dict": sd16}, files["ckpt"])
        save_checkpoint(sd16, files["safetensors-fp32"], dtype=torch.float32)
    return files


def worker(args) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    t0 = time.perf_counter()
    run = _booth(args, device, dtype) if args.worker == "booth" else _diffusers(args, device, dtype)
    load_s = time.perf_counter() - t0
    load_rss = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps = run()
    total_s = time.perf_counter() - t0
    per_step = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # stamps[0] is the start, step 1 is warm-up
    result = {"load_s": load_s, "load_peak_rss_mb": load_rss, "s_per_step": sum(per_step) / len(per_step),
              "total_s": total_s, "peak_rss_mb": peak_rss_mb()}  # fmt: skip
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _clock(device):
    import torch

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def _booth(args, device, dtype):
    from booth.pipeline import Settings, StableDiffusion

    sd = StableDiffusion.from_pretrained(args.model, device=device, dtype=dtype, low_memory=args.low_memory)
    settings = Settings(
        steps=args.steps, sampler="ddim", schedule="uniform", height=args.size, width=args.size
    )
    now = _clock(device)

    def run():
        stamps = [now()]
        sd.txt2img(
            PROMPT, seeds=range(args.batch), settings=settings, callback=lambda _: stamps.append(now())
        )
        return stamps

    return run


def _diffusers(args, device, dtype):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if args.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    now = _clock(device)

    def run():
        stamps = [now()]

        def step_end(pipe, i, t, kwargs):
            stamps.append(now())
            return kwargs

        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, generator=gens,
             num_images_per_prompt=args.batch, callback_on_step_end=step_end)  # fmt: skip
        return stamps

    return run


def spawn(which: str, model: Path, args, low_memory: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--device", args.device,
           "--dtype", args.dtype, "--size", str(args.size), "--steps", str(args.steps), "--batch", str(args.batch),
           "--family", args.family]  # fmt: skip
    return run_worker(cmd + ["--low-memory"] * low_memory, which)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternate booth/diffusers runs this many times")
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".cache")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="what booth loads (default: all; low-memory is the fp16 file with --low-memory)")  # fmt: skip
    p.add_argument("--worker", choices=["booth", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    files = prepare_sdxl(args.workdir) if args.family == "sdxl" else prepare(args.workdir)
    if not set(args.formats) <= files.keys():
        sys.exit(f"--family {args.family} has the formats {', '.join(files)}")
    runs = {k: [] for k in ["(diffusers)", *args.formats]}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        runs["(diffusers)"].append(spawn("diffusers", files["diffusers"], args))
        for fmt in args.formats:
            runs[fmt].append(spawn("booth", files[fmt], args, low_memory=fmt == "low-memory"))
    best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"{args.family.upper()} random weights, {args.device} {args.dtype}, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.steps} DDIM steps with CFG (best of {args.repeats}); diffusers loads its fp16 folder")  # fmt: skip
    d = best["(diffusers)"]
    print(f"{'booth from':<18}" + "".join(f"{m:>18}" for m in d))
    print(f"{'(diffusers)':<18}" + "".join(f"{v:>18.3f}" for v in d.values()))
    for fmt in args.formats:
        b = best[fmt]
        print(f"{fmt:<18}" + "".join(f"{b[m]:>10.3f} ({b[m] / d[m]:.2f}x)" for m in d))


if __name__ == "__main__":
    main()
