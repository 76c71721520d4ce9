"""The `booth` command: txt2img, img2img and download (the seed tool's scripts and flags, as subcommands).

Conventions: image paths go to stdout, one per line; progress and messages go to stderr; a problem the user
can fix is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path

from . import __version__
from .errors import BoothError

MAX_SIDE = 768  # img2img without --hw: larger inputs are scaled down to this (SD1 was trained at 512)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def _sampling_args(p: argparse.ArgumentParser, hw_default) -> None:
    from .pipeline import Settings
    from .sampling import SAMPLERS, SCHEDULES

    d = Settings()
    p.add_argument("-p", "--prompt", required=True, help="what to draw")
    p.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    p.add_argument(
        "-v", "--variations", type=int, default=1, help="number of images (seeds S, S+1, ...; default 1)"
    )
    p.add_argument("-b", "--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("-c", "--ckpt-path", metavar="MODEL", default=None,
                   help="checkpoint: .safetensors/.ckpt file, diffusers folder, Hugging Face repo id or alias "
                        "(sd15, sd14), or a folder of checkpoints to compare (default sd15)")  # fmt: skip
    p.add_argument("-m", "--model", default=None,
                   help="same as -c/--ckpt-path; with -c FOLDER of LoRA files: the base model they are applied to")  # fmt: skip
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (kohya/A1111, diffusers or peft file) at WEIGHT (default 1, from -10 to 10; "
                        "negative inverts it); repeat to stack several")  # fmt: skip
    p.add_argument("--ema", action="store_true", help="use the file's EMA UNet weights (model_ema.*)")
    p.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    p.add_argument("--hw", nargs=2, type=int, metavar=("H", "W"), default=None, help="image height and width, multiples of 8 (default: the model's own size, 512 for SD1)" if hw_default == "model" else "image height and width, multiples of 8 (default: the input image's size, scaled down to fit 768)")  # fmt: skip
    p.add_argument(
        "--steps",
        "--ddim-steps",
        dest="steps",
        type=int,
        default=d.steps,
        help=f"sampling steps (default {d.steps})",
    )
    p.add_argument("--sampler", default=d.sampler, help=f"{', '.join(SAMPLERS)} (default {d.sampler})")
    p.add_argument(
        "--schedule",
        default=d.schedule,
        help=f"sigma schedule: {', '.join(SCHEDULES)} (default {d.schedule})",
    )
    p.add_argument(
        "--scale", type=float, default=d.scale, help=f"classifier-free guidance scale (default {d.scale})"
    )
    p.add_argument("--ddim-eta", "--eta", dest="eta", type=float, default=None,
                   help="noise of ddim (default 0), euler_a and dpmpp_2m_sde (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    p.add_argument(
        "--clip-skip", type=int, default=1, help="stop the text encoder N-1 layers early (default 1)"
    )
    p.add_argument("--precision", choices=["full", "autocast", "fp32", "fp16", "bf16"], default=None,
                   help="weights dtype: full=fp32, autocast=fp16 on GPU (default: fp16 on CUDA, fp32 elsewhere)")  # fmt: skip
    p.add_argument(
        "-d", "--device", default=None, help="0, cuda:1, cpu or mps (default: first GPU, else cpu)"
    )


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other booth error (still exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"booth: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="booth", description="Stable Diffusion txt2img, img2img and DreamBooth.")
    parser.add_argument("--version", action="version", version=f"booth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "txt2img", help="generate images from a prompt", description="Generate images from a prompt."
    )
    _sampling_args(t, "model")
    t.set_defaults(func=run_txt2img)

    i = sub.add_parser("img2img", help="repaint an image guided by a prompt", description="Repaint an image.")
    i.add_argument("-i", "--image", required=True, help="input image (any format Pillow reads)")
    i.add_argument(
        "-s",
        "--strength",
        type=float,
        default=0.75,
        help="0 keeps the image, 1 repaints it fully (default 0.75)",
    )
    _sampling_args(i, None)
    i.set_defaults(func=run_img2img)

    _dreambooth_args(sub)
    _merge_args(sub)

    from .demo import DemoRecipe

    r = DemoRecipe()
    td = sub.add_parser("train-demo", help="train the built-in demo model from scratch",
                        description="Train booth's demo model (the one `-m demo` loads) on synthetic shapes: the VAE, "
                        "then the UNet and text encoder. The defaults reproduce the shipped weights, about an hour "
                        "on 2 CPU cores.")  # fmt: skip
    td.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    td.add_argument("-r", "--resume-dir", metavar="RUN", help="continue RUN where it stopped")
    td.add_argument("--seed", type=int, default=r.seed, help=f"default {r.seed}")
    td.add_argument("--vae-steps", type=int, default=r.vae_steps, help=f"default {r.vae_steps}")
    td.add_argument("--unet-steps", type=int, default=r.unet_steps, help=f"default {r.unet_steps}")
    td.add_argument(
        "--scenes",
        type=int,
        default=r.scenes,
        help=f"captioned scenes in the training set (default {r.scenes})",
    )
    td.add_argument("-d", "--device", default=None, help="default: first GPU, else cpu")
    td.set_defaults(func=run_train_demo)

    dl = sub.add_parser("download", help="download model weights into the Hugging Face cache",
                        description="Download weights: an alias (sd15, sd14), a repo id, or a repo id and a file.")  # fmt: skip
    dl.add_argument("spec", nargs="?", default=None, help="alias or OWNER/NAME (default sd15)")
    dl.add_argument("filename", nargs="?", default=None, help="a file inside the repo")
    dl.set_defaults(func=run_download)
    return parser


def _dreambooth_args(sub) -> None:
    from .lora import LEARNING_RATE, TARGETS
    from .train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "dreambooth", help="teach the model a subject from a few photos",
        description="DreamBooth fine-tuning with prior preservation. Defaults follow diffusers' published recipe "
        "and the paper: lr 5e-6 (1e-4 with --lora), lambda 1, 800 iterations, 200 class images. --lora RANK trains "
        "only small LoRA adapters and saves LoRA files. Runs go to OUTPUT_DIR/runK/; "
        "checkpoints to runK/ckpts/, usable with `booth txt2img -c runK/ckpts`.",
    )  # fmt: skip
    a = p.add_argument
    a("-c", "--class-name", help="the subject's class, e.g. dog (required unless -r)")
    a("-i", "--instance-img-dir", help="folder with 3-5 photos of the subject (required unless -r)")
    a("-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)")
    a("-r", "--resume-dir", metavar="RUN", help="continue RUN from its newest saved state")
    a("-m", "--model", default=None, help=f"base weights, any format txt2img loads (default {d.model})")
    a("--token", default=None, help=f"the rare token naming the subject (default {d.token})")
    a("--instance-prompt", default=None, help="default 'a {token} {class}'")
    a("--class-prompt", default=None, help="default 'a {class}'")
    a(
        "--class-dir",
        default=None,
        help="class images to use (generated there if fewer than --class-img-count)",
    )
    a(
        "--class-img-count",
        type=int,
        default=None,
        help=f"class images for prior preservation (default {d.class_img_count})",
    )
    a("--gb", "--generation-batch-size", dest="generation_batch_size", type=int, default=None,
      help=f"class images per forward pass (default {d.generation_batch_size})")  # fmt: skip
    a(
        "--hw",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        default=None,
        help="training resolution (default 512 512)",
    )
    a(
        "--ddim-steps",
        type=int,
        default=None,
        help=f"sampling steps for class images (default {d.ddim_steps})",
    )
    a("--sampler", default=None, help=f"sampler for class images and previews (default {d.sampler})")
    a("--schedule", default=None, help=f"schedule for class images (default {d.schedule})")
    a("--scale", type=float, default=None, help=f"guidance scale for class images (default {d.scale})")
    a("--ddim-eta", type=float, default=None, help="sampler noise for class images (default 0)")
    a("--learning-rate", type=float, default=None,
      help=f"default {d.learning_rate}, {LEARNING_RATE:g} with --lora (2e-6 is advised with -t)")  # fmt: skip
    a(
        "-l",
        "--lamb",
        type=float,
        default=None,
        help=f"prior-preservation loss weight lambda (default {d.lamb}; 0 turns it off)",
    )
    a("--iterations", type=int, default=None, help=f"optimizer steps (default {d.iterations})")
    a(
        "-s",
        "--save-every",
        type=int,
        default=None,
        help="also save a checkpoint every N steps (default: only at the end)",
    )
    a(
        "-t",
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="train the text encoder too (more memory)",
    )
    a("-d", "--devices", nargs="+", default=None, help="devices, e.g. 0 1 2 3 (one process each, DDP) or cpu")
    a(
        "--batch-size",
        type=int,
        default=None,
        help="instance images per step per device (plus as many class images)",
    )
    a("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    a("--lr-warmup", type=int, default=None, help="linear warm-up steps (default 0)")
    a("--seed", type=int, default=None, help=f"default {d.seed}")
    a("--precision", choices=["full", "autocast", "fp32", "fp16", "bf16"], default=None,
      help="mixed precision with fp32 master weights (default fp16 on CUDA, fp32 elsewhere)")  # fmt: skip
    a(
        "--save-precision",
        choices=["fp16", "fp32"],
        default=None,
        help="checkpoint dtype (default fp16, 2 GB)",
    )
    a(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations: less memory, slower",
    )
    a(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default=None,
        help="adamw8bit needs: pip install 'booth[8bit]'",
    )
    a(
        "--cache-latents",
        action="store_true",
        default=None,
        help="encode images once (turns off resize and colour augmentation)",
    )
    a("--noise-offset", type=float, default=None, help="noise offset, e.g. 0.05 (default 0)")
    a("--pyramid-noise", type=float, default=None, metavar="DISCOUNT",
      help="multi-resolution noise, each coarser level DISCOUNT times the finer one, e.g. 0.3 (default: the "
      "noise the base model was trained with, stored in booth-trained files; off for SD); 0 is white noise")  # fmt: skip
    a("--snr-gamma", type=float, default=None, help="min-SNR loss weighting, e.g. 5 (default off)")
    a("--sample-every", type=int, default=None, help="save fixed-seed previews every N steps")
    a("--sample-prompt", default=None, help="prompt of the previews (default: the instance prompt)")
    a("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flips")
    a("--no-random-resize", dest="random_resize", action="store_false", default=None, help="no random zoom")
    a("--no-color-jitter", dest="color_jitter", action="store_false", default=None, help="no colour jitter")
    a("--lora", type=int, default=None, metavar="RANK",
      help="train only LoRA adapters of this rank (e.g. 4-32) on the frozen model; saves kohya-format LoRA files")  # fmt: skip
    a(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha; the update is scaled by alpha/rank (default: the rank)",
    )
    a("--lora-targets", choices=list(TARGETS), default=None,
      help="attn (default): attention q/k/v/out; attn-ff: and feed-forward; all: and every conv/linear layer (LoCon)")  # fmt: skip
    a("--lora-text-encoder", action="store_true", default=None,
      help="LoRA on the text encoder's attention and MLP layers too")  # fmt: skip
    p.set_defaults(func=run_dreambooth)


def _merge_args(sub) -> None:
    p = sub.add_parser(
        "merge", help="bake LoRAs into a single-file model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add LoRAs into a base model's weights and write one SD1 .safetensors file (CompVis layout)\n"
        "that booth, AUTOMATIC1111, ComfyUI and diffusers' from_single_file load like any checkpoint.\n"
        "Each LoRA adds weight * alpha/rank * up @ down to the layers it covers; several are summed.\n\n"
        "example:\n  booth merge -m sd15 --lora style.safetensors:0.8 --lora dog.safetensors -o dog-style.safetensors",
    )  # fmt: skip
    p.add_argument(
        "-m", "--model", default="sd15", help="base model, any format txt2img loads (default sd15)"
    )
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file (kohya/A1111, diffusers or peft) and its weight (default 1, from -10 to 10); "
                        "repeat to merge several")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="the merged model, a .safetensors file")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--save-precision", choices=["fp16", "fp32"], default="fp16",
                   help="dtype of the written weights (default fp16, a 2 GB file)")  # fmt: skip
    p.add_argument("--ema", action="store_true", help="use the base file's EMA UNet weights (model_ema.*)")
    p.set_defaults(func=run_merge)


# ----------------------------------------------------------------------------- resolving what to run on


def pick_device(spec: str | None):
    import torch

    if spec is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    spec = f"cuda:{spec}" if spec.isdigit() else spec
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BoothError(f"unknown device {spec!r}; use 0, cuda:1, cpu or mps") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise BoothError(
            f"{spec} is not available (this PyTorch sees {torch.cuda.device_count()} CUDA devices); use -d cpu"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise BoothError("mps is not available on this machine; use -d cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise BoothError(f"unsupported device {spec!r}; use 0, cuda:1, cpu or mps")
    return device


def pick_dtype(precision: str | None, device):
    import torch

    gpu = device.type == "cuda"
    if precision is None:
        return torch.float16 if gpu else torch.float32
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise BoothError("this GPU does not support bf16; use --precision fp16")
    return {"full": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "autocast": torch.float16 if gpu else torch.float32}[precision]  # fmt: skip


def natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def checkpoints(spec: str) -> list[Path]:
    """One model, or every checkpoint file of a folder that is not itself a diffusers model."""
    from .checkpoint import SINGLE_FILE_SUFFIXES
    from .hub import resolve

    path = resolve(spec)
    if path.is_dir() and not (path / "model_index.json").exists():
        found = sorted(
            (p for p in path.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES and p.is_file()), key=natural_key
        )
        if not found:
            raise BoothError(
                f"{path} holds no checkpoints (.safetensors, .ckpt) and is not a diffusers folder"
            )
        return found
    return [path]


def new_run_dir(out: Path) -> Path:
    """OUT/runK with the next free K, created atomically so two runs never share a folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BoothError(f"cannot create output folder {out}: {e.strerror}") from None
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"run(\d+)", p.name))]
    k = max(taken, default=-1) + 1
    while True:
        try:
            (out / f"run{k}").mkdir()
            return out / f"run{k}"
        except FileExistsError:
            k += 1
        except OSError as e:
            raise BoothError(f"cannot write to {out}: {e.strerror}") from None


def check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BoothError(f"cannot write to output folder {out} ({probe} is not a writable folder)")


# ----------------------------------------------------------------------------- commands


def _settings(args):
    from .pipeline import Settings

    for flag, value in (
        ("--scale", args.scale),
        ("--ddim-eta", args.eta),
        ("--strength", getattr(args, "strength", 0)),
    ):
        if value is not None and not math.isfinite(value):
            raise BoothError(f"{flag} must be a finite number (got {value})")
    eta = args.eta = args.eta if args.eta is not None else (0.0 if args.sampler == "ddim" else 1.0)
    h, w = args.hw or (None, None)
    s = Settings(args.steps, args.sampler, args.schedule, args.scale, eta, h, w, args.clip_skip)
    s.validate()
    if args.variations < 1:
        raise BoothError(f"--variations must be at least 1 (got {args.variations})")
    if args.batch_size < 1:
        raise BoothError(f"--batch-size must be at least 1 (got {args.batch_size})")
    last_seed = 2**64 - args.variations  # torch generators take seeds below 2**64; image i uses seed S+i
    if args.seed is not None and not 0 <= args.seed <= last_seed:
        raise BoothError(
            f"--seed must be between 0 and {last_seed} (got {args.seed}); omit it for a random seed"
        )
    if args.scale < 0:
        raise BoothError(f"--scale must be >= 0 (got {args.scale})")
    return s


def _models(args) -> tuple[list[Path], Path | None]:
    """The models to render, and the base model when they include LoRA files: a folder of LoRAs (a LoRA
    DreamBooth run's ckpts/) is compared over -m, else over the base its files record, else sd15."""
    from .hub import DEFAULT_MODEL, resolve
    from .lora import is_lora_file

    two = bool(args.ckpt_path and args.model and args.ckpt_path != args.model)
    once = ("give the model once: -c/--ckpt-path and -m/--model name the same thing (-m names a base only when "
            "-c is a folder of LoRA files)")  # fmt: skip
    if two and not Path(args.ckpt_path).is_dir():  # before anything is downloaded
        raise BoothError(once)
    path = resolve(args.ckpt_path or args.model or DEFAULT_MODEL)  # may download
    models = checkpoints(str(path))
    loras = models != [path] and any(is_lora_file(p) for p in models)
    if two and not loras:
        raise BoothError(once)
    if not loras:
        return models, None
    return models, resolve(args.model if two else _recorded_base([p for p in models if is_lora_file(p)]))


def _recorded_base(paths: list[Path]) -> str:
    from .checkpoint import safetensors_header
    from .hub import DEFAULT_MODEL, parse

    header = next((safetensors_header(p)[0] for p in paths if p.suffix == ".safetensors"), {})
    spec = (header.get("__metadata__") or {}).get("booth.base_model")
    if not spec:
        return DEFAULT_MODEL
    try:
        parse(spec)  # an alias or repo id (fetched if needed), or a local file that is still there
        return spec
    except BoothError:
        log(f"booth: the LoRAs' base model {spec} is not here; using {DEFAULT_MODEL} (give the base with -m)")
        return DEFAULT_MODEL


def run_txt2img(args) -> int:
    return _generate(args, _settings(args), image=None)


def run_img2img(args) -> int:
    from .images import load_image

    if not 0.0 <= args.strength <= 1.0:
        raise BoothError(f"--strength must be between 0 and 1 (got {args.strength})")
    image = load_image(args.image)
    if args.hw is None:
        scale = min(1.0, MAX_SIDE / max(image.size))
        args.hw = [max(8, int(image.height * scale) // 8 * 8), max(8, int(image.width * scale) // 8 * 8)]
    return _generate(args, _settings(args), image=image)


def run_download(args) -> int:
    from .hub import download

    print(download(args.spec, args.filename) if args.spec else download())
    return 0


def _generate(args, settings, image) -> int:
    from .lora import read_specs
    from .render import Job, render

    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    out = Path(args.output_dir)
    check_writable(out)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    job = Job(args.prompt, args.negative_prompt, settings, seed, args.variations, args.batch_size,
              image, getattr(args, "strength", None), args.ema)  # fmt: skip
    loras = read_specs(args.lora)
    models, base = _models(args)  # may download; after all cheap checks
    args.lora_base = str(base) if base else None
    runs = []

    def start_run() -> Path:  # called by render once the first model has loaded
        runs.append(new_run_dir(out))
        log(f"booth: writing to {runs[0]} (seed {seed}, {device}, {str(dtype).replace('torch.', '')})")
        return runs[0]

    written = 0
    try:
        for path in render(job, models, start_run, device, dtype, vars(args), loras, base):
            written += 1
            print(path, flush=True)
    except BaseException:
        if runs and not written:  # out of memory or Ctrl-C before the first image: leave no empty run behind
            shutil.rmtree(runs[0], ignore_errors=True)
        raise
    return 0


def run_merge(args) -> int:
    import json

    import torch

    from .checkpoint import file_hash, read_checkpoint, save_checkpoint
    from .hub import resolve
    from .lora import merge, read_specs

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise BoothError(f"--output must be a .safetensors file (got {out})")
    if out.is_dir() or (out.exists() and not args.force):
        raise BoothError(
            f"{out} exists; give --force to overwrite it" if out.is_file() else f"{out} is a folder"
        )
    check_writable(out.parent)
    loras = read_specs(args.lora)
    path = resolve(args.model)
    ckpt = read_checkpoint(path, ema=args.ema)
    dtype = torch.float16 if args.save_precision == "fp16" else torch.float32
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    merge(sd, loras, ckpt.config, keep=False)
    merged = [{"name": lora.name, "hash": lora.short_hash, "weight": w} for lora, w in loras]
    meta = {"booth.base_model": args.model, "booth.base_hash": file_hash(path) if path.is_file() else "",
            "booth.loras": json.dumps(merged)}  # fmt: skip
    save_checkpoint(sd, out, metadata=meta, config=ckpt.config)
    print(out, flush=True)
    return 0


def run_dreambooth(args) -> int:
    from .train import Interrupted, setup_distributed, train

    cfg, resume = _train_config(args)
    if len(cfg.devices) > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_distributed(len(cfg.devices), args.argv)
    dist = setup_distributed(cfg.devices)
    run = _prepare_run(cfg, args, resume, dist)
    try:
        last = train(cfg, run, resume, dist)
    except Interrupted as e:
        log(f"booth: {e}")
        return 130
    if dist.main:
        print(last, flush=True)
        log(f'booth: done. Try: booth txt2img -c {run / "ckpts"} -p "{cfg.instance_text} on the beach"')
    return 0


_RESUME_CAN_CHANGE = {
    "iterations",
    "save_every",
    "sample_every",
    "sample_prompt",
    "devices",
    "generation_batch_size",
}


def _train_config(args):
    """TrainConfig from the flags (a new run) or from RUN/args.yaml plus the few flags that may change (-r)."""
    import dataclasses

    from .train import TrainConfig, newest_state

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.instance_img_dir is not None:
        given["instance_dir"] = args.instance_img_dir
    if "hw" in given:
        given["hw"] = tuple(given["hw"])
    if not args.resume_dir:
        if not args.class_name or not args.instance_img_dir:
            raise BoothError("give the subject's class with -c (e.g. -c dog) and its photos with -i FOLDER")
        _lora_defaults(given)
        return _validated(TrainConfig(**given)), False
    run = Path(args.resume_dir)
    if not (run / "args.yaml").is_file():
        raise BoothError(
            f"{run} is not a DreamBooth run folder (no args.yaml); -r takes a folder like outputs/run0"
        )
    saved = TrainConfig.from_yaml((run / "args.yaml").read_text())
    changed = [k for k, v in given.items() if k not in _RESUME_CAN_CHANGE and v != getattr(saved, k)]
    if changed:
        raise BoothError(
            f"with -r only {', '.join(sorted(_RESUME_CAN_CHANGE))} can change; drop {', '.join(changed)}"
        )
    cfg = dataclasses.replace(saved, **{k: v for k, v in given.items() if k in _RESUME_CAN_CHANGE})
    state = newest_state(run)
    if state is None:
        raise BoothError(
            f"{run} has no saved training state to resume from ({run / 'state'} is empty or missing)"
        )
    done = int(state.stem.split("-")[1])
    if cfg.iterations < done:
        raise BoothError(
            f"{run} is already at step {done}; --iterations must be at least that (got {cfg.iterations})"
        )
    return _validated(cfg), True


def _lora_defaults(given: dict) -> None:
    """--lora flags need --lora; LoRA training takes a higher default learning rate (adapters start at zero)."""
    from .lora import LEARNING_RATE

    extra = [
        f"--{k.replace('_', '-')}" for k in ("lora_alpha", "lora_targets", "lora_text_encoder") if k in given
    ]
    if extra and "lora" not in given:
        raise BoothError(f"{', '.join(extra)} only apply with --lora RANK")
    if "lora" in given and "learning_rate" not in given:
        given["learning_rate"] = LEARNING_RATE
    if "lora" in given and given.get("train_text_encoder"):
        raise BoothError("-t trains the whole text encoder; with --lora use --lora-text-encoder instead")


def _validated(cfg):
    from .data import find_images
    from .pipeline import Settings

    Settings(
        cfg.ddim_steps, cfg.sampler, cfg.schedule, cfg.scale, cfg.ddim_eta, *(cfg.hw or (None, None))
    ).validate()
    for flag, value, low in (("--iterations", cfg.iterations, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--grad-accum", cfg.grad_accum, 1), ("--class-img-count", cfg.class_img_count, 0),
                             ("--generation-batch-size", cfg.generation_batch_size, 1), ("--lr-warmup", cfg.lr_warmup, 0),
                             ("--save-every", cfg.save_every or 1, 1), ("--sample-every", cfg.sample_every or 1, 1)):  # fmt: skip
        if value < low:
            raise BoothError(f"{flag} must be at least {low} (got {value})")
    if cfg.lora is not None and cfg.lora < 1:
        raise BoothError(f"--lora (the rank) must be at least 1 (got {cfg.lora})")
    for flag, value in (("--learning-rate", cfg.learning_rate), ("--lamb", cfg.lamb), ("--noise-offset", cfg.noise_offset),
                        ("--snr-gamma", cfg.snr_gamma or 1.0), ("--lora-alpha", 1.0 if cfg.lora_alpha is None else cfg.lora_alpha)):  # fmt: skip
        if (
            not math.isfinite(value)
            or value < 0
            or (flag in ("--learning-rate", "--snr-gamma", "--lora-alpha") and value == 0)
        ):
            raise BoothError(
                f"{flag} must be a {'positive' if flag != '--lamb' else 'non-negative'} number (got {value})"
            )
    if cfg.pyramid_noise is not None and not 0 <= cfg.pyramid_noise <= 1:
        raise BoothError(f"--pyramid-noise must be between 0 and 1 (got {cfg.pyramid_noise})")
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BoothError("--optimizer adamw8bit needs bitsandbytes: pip install 'booth[8bit]'") from None
    for device in cfg.devices:
        pick_device(device)
    find_images(cfg.instance_dir, "instance", warn=False)  # fail before any weights are loaded
    return cfg


def _prepare_run(cfg, args, resume: bool, dist) -> Path:
    from .atomic import write_text
    from .train import broadcast

    if resume:
        return Path(args.resume_dir)
    out = Path(args.output_dir)
    if (out / "args.yaml").is_file():
        raise BoothError(
            f"{out} is already a run folder; resume it with -r {out}, or give -o a parent folder"
        )
    check_writable(out)
    run = None
    if dist.main:
        run = new_run_dir(out)
        write_text(run / "args.yaml", cfg.to_yaml())
        log(f"booth: DreamBooth run in {run}")
    return Path(broadcast(str(run) if run else None, dist))


def run_train_demo(args) -> int:
    import dataclasses

    import yaml

    from .atomic import write_text
    from .demo import DemoRecipe, train_demo
    from .train import Dist, Interrupted

    if args.resume_dir:
        run = Path(args.resume_dir)
        if not (run / "recipe.yaml").is_file():
            raise BoothError(f"{run} is not a train-demo run (no recipe.yaml)")
        try:
            recipe = DemoRecipe(**yaml.safe_load((run / "recipe.yaml").read_text()))
        except (yaml.YAMLError, TypeError) as e:
            raise BoothError(f"cannot read {run / 'recipe.yaml'}: {str(e).splitlines()[0]}") from None
    else:
        recipe = DemoRecipe(
            seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, scenes=args.scenes
        )
        for name in ("vae_steps", "unet_steps", "scenes"):
            if getattr(recipe, name) < 1:
                raise BoothError(f"--{name.replace('_', '-')} must be at least 1")
        out = Path(args.output_dir)
        check_writable(out)
        run = new_run_dir(out)
        write_text(run / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
        log(f"booth: training the demo model in {run}")
    try:
        path = train_demo(recipe, run, Dist(device=pick_device(args.device)), resume=bool(args.resume_dir))
    except Interrupted as e:
        log(f"booth: {e}")
        return 130
    print(path, flush=True)
    log(f'booth: done. Try: booth txt2img -m {path} -p "a red circle on a blue background" -v 4')
    return 0


def _launch_distributed(n: int, argv: list[str]) -> int:
    """`-d 0 1 ...`: one process per device through PyTorch's own launcher (torchrun)."""
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nproc-per-node", str(n), "-m", "booth", *argv])
    except Exception as e:  # torchrun raises ChildFailedError; the children already printed their error
        log(f"booth: a training process failed ({type(e).__name__})")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except BoothError as e:
        log(f"booth: error: {e}")
        return 1
    except KeyboardInterrupt:
        log("booth: interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug, not bad input: say so in one line unless asked for the traceback
        if os.environ.get("BOOTH_DEBUG"):
            raise
        log(
            f"booth: internal error: {type(e).__name__}: {e} (a bug in booth; rerun with BOOTH_DEBUG=1 for details)"
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
