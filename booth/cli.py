"""The `booth` command: txt2img, img2img, dreambooth, merge, train-demo and download (the seed tool's scripts and
flags, as subcommands).

Conventions: image paths go to stdout, one per line; progress and messages go to stderr; a problem the user
can fix is one line on stderr and a non-zero exit, never a traceback.

Flags are rows (`Flag`) naming the field of a booth.options dataclass they set; type, default and choices come
from that dataclass, and the same `validate()` runs as for the Python API. Only the modules a command needs are
imported when it runs, so `booth --help` and a bad flag answer without loading PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import random
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .atomic import check_writable, clean_stale, new_run_dir, write_text
from .config import PREDICTIONS
from .errors import BoothError
from .hub import ALIASES, DEFAULT_MODEL, VAE_ALIASES
from .options import (
    CLIP_MODEL,
    DINO_MODEL,
    DREAMBOOTH_LEARNING_RATE,
    LEAN,
    LORA_LEARNING_RATE,
    LORA_TARGETS,
    LR_SCHEDULES,
    METRICS,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    SAVE_PRECISIONS,
    SCHEDULES,
    WEIGHTS,
    DemoRecipe,
    Job,
    Settings,
    TrainConfig,
    check_seeds,
    check_text,
)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class Flag:
    """One flag: its names, the dataclass field it sets, and its help ("{default}" is the field's default)."""

    names: str
    dest: str
    help: str
    extra: dict = field(default_factory=dict)  # argparse extras (metavar, choices, required, ...)


LEAN_HELP = ", ".join(
    f"--{k.replace('_', '-')}" + (f" {v}" if isinstance(v, str) else "") for k, v in LEAN.items()
)
LEAN_HELP += " (--weights only without --lora); each can still be set, e.g. --no-gradient-checkpointing"
SCHEDULE_HELP = (
    f"sigma schedule: {', '.join(SCHEDULES)}; automatic is each sampler's own (default {{default}})"
)
# fmt: off
SAMPLING = (  # booth.options.Settings
    Flag("--steps --ddim-steps", "steps", "sampling steps (default {default})"),
    Flag("--sampler", "sampler", f"{', '.join(SAMPLERS)} (default {{default}})"),
    Flag("--schedule", "schedule", SCHEDULE_HELP),
    Flag("--scale", "scale", "classifier-free guidance scale; 1 turns guidance off (default {default})"),
    Flag("--ddim-eta --eta", "eta", "noise of ddim (default 0), euler_a and dpmpp_2m_sde (default 1)"),
    Flag("--clip-skip", "clip_skip", "stop the text encoder N-1 layers early (default {default})"),
    Flag("--prediction", "prediction", "what the UNet predicts: eps or v (default: what the model records: a "
                                       "diffusers folder's scheduler config, a v_pred key, booth's own header)",
         {"choices": PREDICTIONS}),
    Flag("--cfg-rescale", "cfg_rescale", "guidance rescale phi from 0 to 1 (Lin et al. 2023; 0.7 is usual for v "
                                         "models; default {default})"),
    Flag("--zero-snr", "zero_snr", "the noise schedule rescaled to zero terminal SNR (Lin et al. 2023), for v "
                                   "models trained on it (default: what the model records: a ztsnr key, a diffusers "
                                   "scheduler config, booth's header)"),
)
VAE_HELP = ("a VAE instead of the model's own: a file (original or diffusers layout), a diffusers VAE folder, "
            f"OWNER/NAME/FILE on the Hub, or {', '.join(VAE_ALIASES)} (SDXL in fp16)")
JOB = (  # booth.options.Job
    Flag("-p --prompt", "prompt", "what to draw", {"required": True}),
    Flag("-n --negative-prompt", "negative_prompt", "what to steer away from"),
    Flag("-v --variations", "variations", "number of images (seeds S, S+1, ...; default {default})"),
    Flag("-b --batch-size", "batch_size", "images per forward pass (default {default})"),
    Flag("--seed", "seed", "seed of the first image (default: random)"),
    Flag("--ema", "ema", "use the file's EMA UNet weights (model_ema.*)"),
    Flag("--vae", "vae", VAE_HELP),
)
IMG2IMG = (  # booth.options.Job
    Flag("-i --image", "image", "input image (any format Pillow reads)", {"required": True}),
    Flag("-s --strength", "strength", "0 keeps the image, 1 repaints it fully (default {default})"),
)
DREAMBOOTH = (  # booth.options.TrainConfig
    Flag("-c --class-name", "class_name", "the subject's class, e.g. dog (required unless -r)"),
    Flag("-i --instance-img-dir", "instance_dir", "folder with 3-5 photos of the subject (required unless -r)"),
    Flag("-m --model", "model", "base weights, any format txt2img loads (default {default})"),
    Flag("--vae", "vae", VAE_HELP + "; the checkpoints keep it"),
    Flag("--token", "token", "the rare token naming the subject (default {default})"),
    Flag("--instance-prompt", "instance_prompt", "default 'a TOKEN CLASS'"),
    Flag("--class-prompt", "class_prompt", "default 'a CLASS'"),
    Flag("--class-dir", "class_dir", "class images to use, made there if fewer than --class-img-count "
                                     "(default RUN/class-imgs)"),
    Flag("--class-img-count", "class_img_count", "class images for prior preservation (default {default})"),
    Flag("--gb --generation-batch-size", "generation_batch_size", "class images per forward pass (default {default})"),
    Flag("--hw", "hw", "training resolution (default: the base model's own: 512 for SD1, 768 for SD 2.x 768-v, "
                        "1024 for SDXL)"),
    Flag("--ddim-steps", "ddim_steps", "sampling steps of class images (default {default})"),
    Flag("--sampler", "sampler", "sampler of class images and previews (default {default})"),
    Flag("--schedule", "schedule", SCHEDULE_HELP),
    Flag("--scale", "scale", "guidance scale of class images (default {default})"),
    Flag("--ddim-eta", "ddim_eta", "sampler noise of class images (default: the sampler's own)"),
    Flag("--learning-rate", "learning_rate", f"default {DREAMBOOTH_LEARNING_RATE:g}, {LORA_LEARNING_RATE:g} with "
                                             "--lora (2e-6 is advised with -t)"),
    Flag("-l --lamb", "lamb", "prior-preservation loss weight lambda; 0 turns it off (default {default})"),
    Flag("--iterations", "iterations", "optimizer steps (default {default})"),
    Flag("-s --save-every", "save_every", "also save a checkpoint every N steps (default: only at the end)"),
    Flag("-t --train-text-encoder", "train_text_encoder", "train the text encoder too (more memory)"),
    Flag("-d --devices", "devices", "devices, e.g. 0 1 2 3 (one process each, DDP) or cpu (default: the first GPU)"),
    Flag("--batch-size", "batch_size", "instance images per step per device, plus as many class images "
                                       "(default {default})"),
    Flag("--grad-accum", "grad_accum", "micro-batches per optimizer step (default {default})"),
    Flag("--lr-warmup", "lr_warmup", "linear warm-up steps (default {default})"),
    Flag("--lr-schedule", "lr_schedule", "constant, or cosine decay to 0 (default {default})",
         {"choices": LR_SCHEDULES}),
    Flag("--max-grad-norm", "max_grad_norm", "clip the gradients' global norm (each tensor's with "
                                             "--fused-backward) to N; 0 turns it off (default {default})",
         {"metavar": "N"}),
    Flag("--seed", "seed", "data order, augmentation and noise (default {default})"),
    Flag("--lean", "lean", "the least memory that still learns well: " + LEAN_HELP),
    Flag("--precision", "precision", "compute dtype (default: fp16 on CUDA, fp32 elsewhere; bf16 with --weights "
                                     "bf16, and on CUDA with --fused-backward)", {"choices": PRECISIONS}),
    Flag("--weights", "weights", "dtype of the trained weights; bf16 keeps no fp32 copy and rounds each update "
                                 "stochastically (default fp32, bf16 with --lean)", {"choices": WEIGHTS}),
    Flag("--save-precision", "save_precision", "checkpoint dtype (default {default}: 2 GB for SD1, 7 GB for SDXL)",
         {"choices": SAVE_PRECISIONS}),
    Flag("--gradient-checkpointing", "gradient_checkpointing", "recompute activations: less memory, slower"),
    Flag("--optimizer", "optimizer", "adamw8bit (needs pip install 'booth[8bit]') and adafactor keep far less "
                                     "state (default adamw, adafactor with --lean)", {"choices": OPTIMIZERS}),
    Flag("--fused-backward", "fused_backward", "step each weight as soon as its gradient is complete, so the "
                                               "gradients never all exist (clipping is then per tensor)"),
    Flag("--split-prior", "split_prior", "with prior preservation, run the class images' forward and backward pass "
                                         "after the subject's, not in one batch: half the UNet's activations, "
                                         "the same gradients (worth it without --gradient-checkpointing; with "
                                         "--fused-backward the first pass's gradients are all kept)"),
    Flag("--cache-latents", "cache_latents", "encode images once (turns off resize and colour augmentation)"),
    Flag("--noise-offset", "noise_offset", "noise offset, e.g. 0.05 (default {default})"),
    Flag("--pyramid-noise", "pyramid_noise", "multi-resolution noise, each coarser level DISCOUNT times the finer "
                                             "one, e.g. 0.3; 0 is white noise (default: the noise the base model "
                                             "was trained with, recorded in booth-trained files; white for SD)",
         {"metavar": "DISCOUNT"}),
    Flag("--snr-gamma", "snr_gamma", "min-SNR loss weighting, e.g. 5 (default off)"),
    Flag("--sample-every", "sample_every", "save fixed-seed previews every N steps"),
    Flag("--sample-prompt", "sample_prompt", "prompt of the previews (default: the instance prompt)"),
    Flag("--eval-every", "eval_every", "score the model every N steps as `booth evaluate` does, on a small "
                                       "prompt set (saving a checkpoint then too), watch the class drift, and "
                                       "name the best in RUN/best.txt and RUN/eval/report.html"),
    Flag("--eval-metric", "eval_metric", "--eval-every's scorer: paper (DINO, CLIP-I, CLIP-T, PRES) or demo "
                                         "(default: demo for -m demo, else paper)", {"choices": METRICS}),
    Flag("--dino-model", "dino_model", "--eval-every's DINO tower, a repo id or local folder (default {default})"),
    Flag("--clip-model", "clip_model", "--eval-every's CLIP tower, a repo id or local folder (default {default})"),
    Flag("--no-flip", "flip", "no horizontal flips"),
    Flag("--no-random-resize", "random_resize", "no random zoom"),
    Flag("--no-color-jitter", "color_jitter", "no colour jitter"),
    Flag("--lora", "lora", "train only LoRA adapters of this rank (e.g. 4-32) on the frozen model; saves "
                           "kohya-format LoRA files", {"metavar": "RANK"}),
    Flag("--lora-alpha", "lora_alpha", "LoRA alpha; the update is scaled by alpha/rank (default: the rank)"),
    Flag("--lora-targets", "lora_targets", "attn (default): attention q/k/v/out; attn-ff: and feed-forward; all: "
                                           "and every conv/linear layer (LoCon)", {"choices": tuple(LORA_TARGETS)}),
    Flag("--lora-text-encoder", "lora_text_encoder", "LoRA on the text encoder's attention and MLP layers too"),
)
TRAIN_DEMO = (  # booth.options.DemoRecipe
    Flag("--seed", "seed", "default {default}"),
    Flag("--vae-steps", "vae_steps", "default {default}"),
    Flag("--unet-steps", "unet_steps", "default {default}"),
    Flag("--scenes", "scenes", "captioned scenes in the training set (default {default})"),
)
# fmt: on


def add_flags(parser: argparse.ArgumentParser, cls, flags) -> None:
    """Add `flags` for the fields of dataclass `cls`: the type from the field's annotation, the default shown
    in the help from the field's default. Flags not given stay out of the namespace (see `given`)."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for flag in flags:
        kind, default = _base(hints[flag.dest]), defaults[flag.dest]
        shown = f"{default:g}" if isinstance(default, float) else default
        kw = {"dest": flag.dest, "default": argparse.SUPPRESS, "help": flag.help.format(default=shown)}
        if kind is bool and default is None:  # left to another flag (--lean): either way can be given
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is bool:
            kw["action"] = "store_false" if default is True else "store_true"
        elif kind is tuple:
            kw.update(nargs=2, type=int, metavar=("H", "W"))
        elif kind is list:
            kw["nargs"] = "+"
        elif kind in (int, float, str):
            kw["type"] = kind
        if (
            kind is not bool and kind is not tuple
        ):  # named after the flag, as argparse names it, not the field
            kw["metavar"] = (
                next(n for n in flag.names.split() if n.startswith("--"))[2:].replace("-", "_").upper()
            )
        parser.add_argument(*flag.names.split(), **{**kw, **flag.extra})


def _base(hint) -> type:
    """int for `int | None`, tuple for `tuple[int, int] | None`, and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    return typing.get_origin(hint) or hint


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set by flags on this command line (lists of fixed length as tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) and f.name == "hw" else value
    return out


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
    _render_flags(
        t,
        "image height and width, multiples of 8 (default: the model's own size: 512 for SD1, 1024 for SDXL)",
    )
    t.set_defaults(func=run_txt2img)
    i = sub.add_parser("img2img", help="repaint an image guided by a prompt", description="Repaint an image.")
    add_flags(i, Job, IMG2IMG)
    _render_flags(i, "image height and width, multiples of 8 (default: the model's own number of pixels, 512x512 "
                  "for SD1 and 1024x1024 for SDXL, in the input's aspect ratio)")  # fmt: skip
    i.set_defaults(func=run_img2img)
    _dreambooth_parser(sub)
    _merge_parser(sub)
    _convert_parser(sub)
    _evaluate_parser(sub)
    _train_demo_parser(sub)
    dl = sub.add_parser("download", help="download model weights (or the DreamBench photos) into the Hugging Face "
                        "cache", description=f"Download weights: an alias ({', '.join(ALIASES)}), a repo id, or a repo id and a "
                        "file; or `dreambench`, the DreamBooth benchmark's subject photos (for booth evaluate "
                        "--subject-dir dreambench:SUBJECT).")  # fmt: skip
    dl.add_argument("spec", nargs="?", default=None, help="alias, OWNER/NAME or dreambench (default sd15)")
    dl.add_argument("filename", nargs="?", default=None, help="a file inside the repo")
    dl.set_defaults(func=run_download)
    return parser


def _render_flags(p: argparse.ArgumentParser, hw_help: str) -> None:
    add_flags(p, Job, JOB)
    add_flags(p, Settings, SAMPLING)
    p.add_argument("--hw", nargs=2, type=int, metavar=("H", "W"), default=None, help=hw_help)
    p.add_argument("-c", "--ckpt-path", metavar="MODEL", default=None,
                   help="checkpoint: .safetensors/.ckpt file, diffusers folder, Hugging Face repo id or alias "
                        f"({', '.join(ALIASES)}, demo), or a folder of checkpoints to compare (default sd15)")  # fmt: skip
    p.add_argument("-m", "--model", default=None,
                   help="same as -c/--ckpt-path; with -c FOLDER of LoRA files: the base model they are applied to")  # fmt: skip
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (kohya/A1111, diffusers or peft file) at WEIGHT (default 1, from -10 to 10; "
                        "negative inverts it); repeat to stack several")  # fmt: skip
    p.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="weights dtype: full=fp32, autocast=fp16 on GPU (default: fp16 on CUDA, fp32 elsewhere)")  # fmt: skip
    p.add_argument(
        "-d", "--device", default=None, help="0, cuda:1, cpu or mps (default: first GPU, else cpu)"
    )
    p.add_argument("--low-memory", action="store_true",
                   help="keep only the network at work on the device (like AUTOMATIC1111's --medvram): slower, "
                        "the least memory; on by itself when the forecast says the whole model would not fit")  # fmt: skip


def _dreambooth_parser(sub) -> None:
    p = sub.add_parser(
        "dreambooth", help="teach the model a subject from a few photos",
        description="DreamBooth fine-tuning with prior preservation. Defaults follow diffusers' published recipe "
        f"and the paper: lr {DREAMBOOTH_LEARNING_RATE:g} ({LORA_LEARNING_RATE:g} with --lora), lambda 1, 800 "
        "iterations, 200 class images. --lora RANK trains only small LoRA adapters and saves LoRA files. Runs go "
        "to OUTPUT_DIR/runK/; checkpoints to runK/ckpts/, usable with `booth txt2img -c runK/ckpts`.",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    p.add_argument("-r", "--resume-dir", metavar="RUN", help="continue RUN from its newest saved state (only "
                   f"{', '.join('--' + k.replace('_', '-') for k in TrainConfig.RESUMABLE)} may change)")  # fmt: skip
    add_flags(p, TrainConfig, DREAMBOOTH)
    p.set_defaults(func=run_dreambooth)


def _convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="write any model booth loads as one single file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a model (a diffusers folder, a .ckpt, a .safetensors file, a Hub repo or alias) as one "
        ".safetensors file\nin the original (CompVis) layout, which booth, AUTOMATIC1111, ComfyUI and diffusers' "
        "from_single_file load.\n\nexamples:\n  booth convert path/to/diffusers-folder -o model.safetensors\n"
        "  booth convert sd14 -o sd14.safetensors --save-precision fp32",
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL", help="any model txt2img loads")
    _single_file_flags(p, "the single file to write, a .safetensors file",
                       "write the file's EMA UNet weights (model_ema.*)", "2 GB for SD1, 7 GB for SDXL")  # fmt: skip
    p.set_defaults(func=run_convert)


def _single_file_flags(p: argparse.ArgumentParser, output: str, ema: str, size: str) -> None:
    """What merge and convert share: the file they write (checked by `_output_file`), its dtype, the EMA choice."""
    p.add_argument("-o", "--output", required=True, help=output)
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, default="fp16",
                   help=f"dtype of the written weights (default fp16, {size})")  # fmt: skip
    p.add_argument("--ema", action="store_true", help=ema)


def _merge_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="bake LoRAs into a single-file model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add LoRAs into a base model's weights and write one .safetensors file in the original layout\n"
        "(CompVis', SGM's for SDXL) that booth, AUTOMATIC1111, ComfyUI and diffusers' from_single_file\n"
        "load like any checkpoint.\n"
        "Each LoRA adds weight * alpha/rank * up @ down to the layers it covers; several are summed.\n\n"
        "example:\n  booth merge -m sd15 --lora style.safetensors:0.8 --lora dog.safetensors -o dog-style.safetensors",
    )  # fmt: skip
    p.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model, any format txt2img loads (default {DEFAULT_MODEL})",
    )
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file (kohya/A1111, diffusers or peft) and its weight (default 1, from -10 to 10); "
                        "repeat to merge several")  # fmt: skip
    _single_file_flags(p, "the merged model, a .safetensors file",
                       "use the base file's EMA UNet weights (model_ema.*)", "2 GB for SD1, 7 GB for SDXL")  # fmt: skip
    p.set_defaults(func=run_merge)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score DreamBooth checkpoints and name the best",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render each checkpoint (and the base model, as step 0) over a prompt set, score the images as "
        "the DreamBooth paper does\n(DINO, CLIP-I and CLIP-T against the subject's photos; PRES for the class), "
        "rank the checkpoints and name the best.\nWrites OUT/metrics.json, OUT/metrics.csv and the renders; a "
        "second call reuses the renders.\n\nexamples:\n  booth evaluate outputs/run0 --subject-dir photos/dog -c dog"
        "\n  booth evaluate outputs/run1 --subject-dir subject -c star --metric demo",
    )  # fmt: skip
    p.add_argument("targets", nargs="+", metavar="RUN|CKPT_DIR|CKPT", help="a DreamBooth run, a checkpoint folder, "
                   "checkpoint or LoRA files")  # fmt: skip
    p.add_argument("--subject-dir", required=True, help="the real photos of the subject: a folder, or "
                   "dreambench:SUBJECT (e.g. dreambench:dog; see booth download dreambench)")  # fmt: skip
    p.add_argument(
        "-c",
        "--class-word",
        dest="cls",
        metavar="CLASS",
        required=True,
        help="the subject's class (dog, backpack)",
    )
    p.add_argument("--token", default=None, help="the subject's identifier (default: the run's, else sks)")
    p.add_argument("-m", "--model", default=None, help="the base model (default: the one the run recorded)")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="paper: DINO, CLIP-I, CLIP-T, PRES; demo: the demo model's shapes judge (default: demo for "
                        "the demo model's runs, else paper)")  # fmt: skip
    p.add_argument("--prompts", default=None, help="dreambench (the benchmark's 25; default), or a text file of "
                   "prompts, one a line, {} standing for the subject (default with --metric demo: the demo's own)")  # fmt: skip
    p.add_argument("--live", action="store_true",
                   help="a live subject's dreambench prompts (default: for the classes dog and cat)")  # fmt: skip
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt and checkpoint (4)")
    p.add_argument(
        "--seed", type=int, default=0, help="the first image's seed (default 0); image i uses seed+i"
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="the sampler (default dpmpp_2m)")
    p.add_argument(
        "--dino-model", default=DINO_MODEL, help=f"a repo id or a local folder (default {DINO_MODEL})"
    )
    p.add_argument(
        "--clip-model", default=CLIP_MODEL, help=f"a repo id or a local folder (default {CLIP_MODEL})"
    )
    p.add_argument(
        "-o", "--output-dir", default=None, help="where results go (default RUN/eval, else ./eval)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="as for txt2img")
    p.add_argument(
        "-d", "--device", default=None, help="0, cuda:1, cpu or mps (default: first GPU, else cpu)"
    )
    p.set_defaults(func=run_evaluate)


def _train_demo_parser(sub) -> None:
    p = sub.add_parser("train-demo", help="train the built-in demo model from scratch",
                       description="Train booth's demo model (the one `-m demo` loads) on synthetic shapes: the VAE, "
                       "then the UNet and text encoder. The defaults reproduce the shipped weights, about an hour "
                       "on 2 CPU cores.")  # fmt: skip
    p.add_argument(
        "-o", "--output-dir", default="outputs", help="runs go to OUTPUT_DIR/runK/ (default outputs)"
    )
    p.add_argument("-r", "--resume-dir", metavar="RUN", help="continue RUN where it stopped")
    add_flags(p, DemoRecipe, TRAIN_DEMO)
    p.add_argument("-d", "--device", default=None, help="default: first GPU, else cpu")
    p.set_defaults(func=run_train_demo)


# ----------------------------------------------------------------------------- txt2img and img2img


def run_txt2img(args) -> int:
    return _generate(args)


def run_img2img(args) -> int:
    return _generate(args)


def render_job(args) -> Job:
    """The Job the flags describe, validated before anything is loaded; the seed is drawn here when not given."""
    h, w = args.hw or (None, None)
    job = Job(**given(args, Job), settings=Settings(**given(args, Settings), height=h, width=w))
    job.validate()
    return job if job.seed is not None else dataclasses.replace(job, seed=random.randrange(2**32))


def _generate(args) -> int:
    job = render_job(args)
    out = Path(args.output_dir)
    check_writable(out)

    from .device import pick_device, pick_dtype
    from .images import load_image
    from .lora import read_specs
    from .render import render, rows

    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    image = load_image(job.image) if job.image is not None else None
    loras = read_specs(args.lora)
    models = rows(args.ckpt_path, args.model)  # may download; after all cheap checks
    for run in out.glob("run*") if out.is_dir() else ():
        if not (
            run / ".lock"
        ).exists():  # a training run's folder is cleaned when it is resumed, under its lock
            clean_stale(run, recursive=True)
    made = []

    def start_run() -> Path:  # called by render once the first model has loaded
        made.append(new_run_dir(out))
        log(f"booth: writing to {made[0]} (seed {job.seed}, {device}, {str(dtype).replace('torch.', '')})")
        return made[0]

    written = 0
    try:
        for path in render(job, models, start_run, device, dtype, loras, image, args.low_memory):
            written += 1
            print(path, flush=True)
    except BaseException:
        if made and not written:  # out of memory or Ctrl-C before the first image: leave no empty run behind
            shutil.rmtree(made[0], ignore_errors=True)
        raise
    return 0


# ----------------------------------------------------------------------------- dreambooth


def run_dreambooth(args) -> int:
    cfg, resume = train_config(args)

    from .device import pick_device
    from .train import Interrupted, preflight, train

    if len(cfg.devices) > 1 and "WORLD_SIZE" not in os.environ:  # checked once here, not in each process
        for device in cfg.devices:
            pick_device(device)
        preflight(cfg, None if resume else Path(args.output_dir), warn=False)  # rank 0 warns
        return _launch_distributed(len(cfg.devices), args.argv)
    try:
        last = train(cfg, args.output_dir, resume)
    except Interrupted as e:
        log(f"booth: {e}")
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(last, flush=True)
        log(f'booth: done. Try: booth txt2img -c {last.parent} -p "{cfg.instance_text} on the beach"')
    return 0


def train_config(args) -> tuple[TrainConfig, Path | None]:
    """A new run's TrainConfig from the flags; with -r, RUN/args.yaml plus the flags -r may change."""
    flags = given(args, TrainConfig)
    if not args.resume_dir:
        cfg = TrainConfig(**flags)
        cfg.validate()
        return cfg, None
    run = Path(args.resume_dir)
    if not (run / "args.yaml").is_file():
        raise BoothError(
            f"{run} is not a DreamBooth run folder (no args.yaml); -r takes a folder like outputs/run0"
        )
    saved = TrainConfig.from_yaml(_read_text(run / "args.yaml"), str(run / "args.yaml"))
    fixed = [k for k, v in flags.items() if k not in TrainConfig.RESUMABLE and v != getattr(saved, k)]
    if fixed:
        raise BoothError(
            f"with -r only {', '.join(TrainConfig.RESUMABLE)} can change; drop {', '.join(fixed)}"
        )
    cfg = dataclasses.replace(saved, **{k: v for k, v in flags.items() if k in TrainConfig.RESUMABLE})
    cfg.validate()
    return cfg, run


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BoothError(f"cannot read {path}: it is not UTF-8 text") from None
    except OSError as e:
        raise BoothError(f"cannot read {path}: {e.strerror or e}") from None


def _launch_distributed(n: int, argv: list[str]) -> int:
    """`-d 0 1 ...`: one process per device through PyTorch's own launcher (torchrun)."""
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nproc-per-node", str(n), "-m", "booth", *argv])
    except Exception as e:  # torchrun raises ChildFailedError; the children already printed their error
        log(f"booth: a training process failed ({type(e).__name__})")
        return 1
    return 0


# ----------------------------------------------------------------------------- merge, train-demo, download


def run_merge(args) -> int:
    from .lora import merge_to_file, parse_spec, read_specs

    out = _output_file(args, [parse_spec(s)[0] for s in args.lora] + [Path(args.model)], "merge")
    print(merge_to_file(args.model, read_specs(args.lora), out, args.save_precision, args.ema), flush=True)
    return 0


def run_convert(args) -> int:
    out = _output_file(args, [Path(args.model)], "conversion")

    from .checkpoint import convert_to_file
    from .hub import find_model

    found = find_model(args.model, "MODEL")
    print(convert_to_file(found.path, out, args.save_precision, args.ema, source=args.model), flush=True)
    return 0


def _output_file(args, inputs: list[Path], what: str) -> Path:
    """--output checked before anything is read: a .safetensors file that is not there (or --force), in a
    writable folder, and none of the inputs."""
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise BoothError(f"--output must be a .safetensors file (got {out})")
    if out.is_dir() or (out.exists() and not args.force):
        raise BoothError(
            f"{out} exists; give --force to overwrite it" if out.is_file() else f"{out} is a folder"
        )
    check_writable(out.parent)
    if out.exists() and any(p.exists() and os.path.samefile(p, out) for p in inputs):
        raise BoothError(f"--output {out} is one of the {what}'s inputs; write the {what} to another file")
    clean_stale(out.parent)
    return out


def run_evaluate(args) -> int:
    from .data import find_images
    from .dreambench import subject_dir

    if args.images_per_prompt < 1 or args.images_per_prompt > 1000:
        raise BoothError(f"--images-per-prompt must be from 1 to 1000 (got {args.images_per_prompt})")
    settings = Settings(
        **{k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v is not None}
    )
    settings.validate()
    check_seeds([args.seed + args.images_per_prompt - 1, args.seed])
    reals = find_images(subject_dir(args.subject_dir), "subject")
    first = Path(args.targets[0])
    out = Path(args.output_dir or (first / "eval" if (first / "ckpts").is_dir() else "eval"))
    check_writable(out)
    custom = _prompt_file(Path(args.prompts)) if args.prompts not in (None, "dreambench") else None

    from . import evaluate as ev
    from .device import pick_device, pick_dtype
    from .metrics import without_identifier

    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    cands = ev.candidates(args.targets, args.model)
    token, cls = ev.identity(cands, args.cls, args.token)
    metric = args.metric or ev.default_metric(cands[0].row.model)
    prompts = ev.prompt_set(f"{token} {cls}", custom, metric if args.prompts is None else "paper",
                            args.live or cls in ev.LIVE_CLASSES)  # fmt: skip
    texts = [without_identifier(p, token) for p in prompts]
    seeds = list(range(args.seed, args.seed + args.images_per_prompt))
    scorer = (
        ev.DemoScorer(cls) if metric == "demo" else ev.PaperScorer(args.dino_model, args.clip_model, device)
    )
    plan = ev.Plan(prompts, f"a {cls}", seeds, settings)
    recipe = (
        _read_text(first / "args.yaml")
        if (first / "ckpts").is_dir() and (first / "args.yaml").is_file()
        else None
    )
    doc = ev.evaluate(cands, scorer, plan, texts, reals, out, device, dtype, recipe)
    print(ev.table(doc, scorer.keys))
    for warning in doc["warnings"]:
        log(f"booth: warning: {warning}")
    log(f"booth: best: {doc['best']} ({doc['rule']}); {out / 'metrics.json'}, {out / 'report.html'}")
    return 0


def _prompt_file(path: Path) -> list[str]:
    prompts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise BoothError(f"{path} has no prompts (one a line)")
    for p in prompts:
        check_text(f"a prompt in {path}", p)
    return prompts


def run_train_demo(args) -> int:
    if args.resume_dir:
        run = Path(args.resume_dir)
        if not (run / "recipe.yaml").is_file():
            raise BoothError(f"{run} is not a train-demo run (no recipe.yaml)")
        recipe = DemoRecipe.from_yaml(_read_text(run / "recipe.yaml"), str(run / "recipe.yaml"))
    else:
        recipe = DemoRecipe(**given(args, DemoRecipe))
        recipe.validate()
        check_writable(Path(args.output_dir))

    from .demo import train_demo
    from .device import pick_device
    from .train import Dist, Interrupted

    dist = Dist(device=pick_device(args.device))
    if not args.resume_dir:
        run = new_run_dir(Path(args.output_dir))
        write_text(run / "recipe.yaml", recipe.to_yaml())
        log(f"booth: training the demo model in {run}")
    try:
        path = train_demo(recipe, run, dist, resume=bool(args.resume_dir))
    except Interrupted as e:
        log(f"booth: {e}")
        return 130
    print(path, flush=True)
    log(f'booth: done. Try: booth txt2img -m {path} -p "a red circle on a blue background" -v 4')
    return 0


def run_download(args) -> int:
    from .hub import download

    if args.spec == "dreambench":
        from . import dreambench

        if args.filename:
            raise BoothError("`booth download dreambench` takes no file name (it fetches the whole dataset)")
        print(dreambench.download(), flush=True)
        return 0
    print(download(args.spec, args.filename) if args.spec else download())
    return 0


# ----------------------------------------------------------------------------- main


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
    except OSError as e:  # the machine's doing, not booth's: a full disk, a name too long, a denied path
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            log(
                f"booth: error: the disk is full ({e.filename or e}): free some space, then run the command again"
            )
            return 1
        if e.filename is None:
            return _internal(e)
        log(f"booth: error: {e.strerror or e}: {e.filename}")
        return 1
    except Exception as e:
        return _internal(e)


def _internal(e: Exception) -> int:
    """A bug, not bad input: say so in one line unless asked for the traceback."""
    if os.environ.get("BOOTH_DEBUG"):
        raise e
    log(
        f"booth: internal error: {type(e).__name__}: {e} (a bug in booth; rerun with BOOTH_DEBUG=1 for details)"
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
