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
    p.add_argument("-m", "--model", default=None, help="same as -c/--ckpt-path")
    p.add_argument("--ema", action="store_true", help="use the file's EMA UNet weights (model_ema.*)")
    p.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    p.add_argument("--hw", nargs=2, type=int, metavar=("H", "W"), default=hw_default, help=f"image height and width, multiples of 8 (default {hw_default[0]} {hw_default[1]})" if hw_default else "image height and width, multiples of 8 (default: the input image's size, scaled down to fit 768)")  # fmt: skip
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
    _sampling_args(t, [512, 512])
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

    dl = sub.add_parser("download", help="download model weights into the Hugging Face cache",
                        description="Download weights: an alias (sd15, sd14), a repo id, or a repo id and a file.")  # fmt: skip
    dl.add_argument("spec", nargs="?", default=None, help="alias or OWNER/NAME (default sd15)")
    dl.add_argument("filename", nargs="?", default=None, help="a file inside the repo")
    dl.set_defaults(func=run_download)
    return parser


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
    h, w = args.hw or (512, 512)
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


def _model_spec(args) -> str:
    from .hub import DEFAULT_MODEL

    if args.ckpt_path and args.model and args.ckpt_path != args.model:
        raise BoothError("give the model once: -c/--ckpt-path and -m/--model name the same thing")
    return args.ckpt_path or args.model or DEFAULT_MODEL


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
    from .render import Job, render

    spec = _model_spec(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    out = Path(args.output_dir)
    check_writable(out)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    job = Job(args.prompt, args.negative_prompt, settings, seed, args.variations, args.batch_size,
              image, getattr(args, "strength", None), args.ema)  # fmt: skip
    models = checkpoints(spec)  # may download; after all cheap checks
    runs = []

    def start_run() -> Path:  # called by render once the first model has loaded
        runs.append(new_run_dir(out))
        log(f"booth: writing to {runs[0]} (seed {seed}, {device}, {str(dtype).replace('torch.', '')})")
        return runs[0]

    written = 0
    try:
        for path in render(job, models, start_run, device, dtype, vars(args)):
            written += 1
            print(path, flush=True)
    except BaseException:
        if runs and not written:  # out of memory or Ctrl-C before the first image: leave no empty run behind
            shutil.rmtree(runs[0], ignore_errors=True)
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
