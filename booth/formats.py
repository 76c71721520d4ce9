"""What booth knows about model files, in one place: which file names and extensions hold weights, how to read a
safetensors header safely, how to tell a LoRA from a model without loading either, and what a local path is.

`identify(path)` answers the one question every command asks of a model path: is it a single-file checkpoint, a
diffusers folder, a LoRA, or a folder of checkpoints to compare? It reads headers only (never tensors, never
code), and imports no torch.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BoothError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The diffusers sub-models booth loads; anything else in a pipeline repo (safety_checker, ...) is skipped.
COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENT = (
    "text_encoder_2"  # SDXL's OpenCLIP bigG (a CLIPTextModelWithProjection), needed where present
)
# Small folders fetched whole when present; booth ships its own CLIP vocabulary, so they are optional.
OPTIONAL_FOLDERS = ("tokenizer", "scheduler")
# One weights file per diffusers component, best first: safetensors never run code on load, full precision before
# the fp16 variant, pickles last. Both the Hub download and the folder reader take the first that exists.
WEIGHTS_PREFERENCE = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)
# A transformers model folder (the metrics' CLIP and DINO): its config, then one weights file, best first.
TOWER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
LORA_FOLDER_FILE = (
    "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes into a folder
)
CHECKPOINT_FOLDER = "ckpts"  # where a training run (RUN/) keeps its checkpoints
# booth's own small model, trained by booth on synthetic shapes and shipped in the package (see booth.demo).
DEMO_FILE = Path(__file__).parent / "data" / "demo.safetensors"
# safetensors dtype names and their sizes in bytes
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                        "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

# Key endings of LoRA-style files (kohya, diffusers, peft, LyCORIS): never found in a full model.
_LORA_KEY = re.compile(
    r"(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down)\.weight$|\.(hada_w1_a|lokr_w1)$"
)


# ----------------------------------------------------------------------------- safetensors


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed JSON header and where the data starts; BoothError unless it is a complete safetensors file."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BoothError(f"{bad} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise BoothError(f"{bad} (header length {n} does not fit in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BoothError(f"{bad} (unreadable header: {e})") from None
        except RecursionError:
            raise BoothError(f"{bad} (its header is nested too deeply to be one)") from None
    if not isinstance(header, dict):
        raise BoothError(f"{bad} (header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise BoothError(f"{bad} (its __metadata__ is not a mapping of strings)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _valid_entry(info):
            raise BoothError(f"{bad} (bad entry for {name!r})")
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise BoothError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def _valid_entry(info: object) -> bool:
    """dtype known, shape and offsets non-negative integers (not bools), the byte range exactly the tensor's."""
    try:
        itemsize, shape, (begin, end) = (
            SAFETENSORS_ITEMSIZE[info["dtype"]],
            info["shape"],
            info["data_offsets"],
        )
        ints = isinstance(shape, list) and all(type(v) is int and v >= 0 for v in (*shape, begin, end))
        return ints and end - begin == math.prod(shape) * itemsize
    except (KeyError, TypeError, ValueError):
        return False


def safetensors_metadata(path: Path) -> dict[str, str]:
    return safetensors_header(path)[0].get("__metadata__") or {}


# ----------------------------------------------------------------------------- pickles, read without running them


def pickle_contents(path: Path, limit: int = 64 << 20) -> tuple[list[str], list[str]]:
    """(globals the pickle would import, strings it holds), read with pickletools, which executes nothing. A torch
    zip file is read from its data.pkl; a legacy pickle from its first `limit` bytes. Damage ends the scan: what
    was found until then is returned."""
    names, strings = [], []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # a legacy torch file is several pickles in a row
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # damaged or not a pickle at all: the file's reader reports that in its own words
        pass
    return list(dict.fromkeys(names)), strings


# ----------------------------------------------------------------------------- what a path is


def looks_like_lora(keys) -> bool:
    """Whether tensor names (of a state dict or a safetensors header) are those of a LoRA, not of a model."""
    return any(_LORA_KEY.search(k) for k in keys if isinstance(k, str) and k != "__metadata__")


def natural_key(path: Path) -> list:
    """Sort key that puts step-20 before step-100."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class Found:
    """What a local path holds. `kind` is "checkpoint" (one model file), "diffusers" (a diffusers model folder),
    "lora" (adapter weights: a file or a diffusers LoRA folder) or "folder" (checkpoints and LoRAs to compare, in
    `members`, in natural order)."""

    path: Path
    kind: str
    members: tuple[Found, ...] = ()

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def not_a_model(path: Path, kind: str) -> BoothError:
    """The error for a LoRA or a folder of checkpoints where one model is needed."""
    if kind == "lora":
        return BoothError(f"{path} is a LoRA (adapter weights), not a full model: give a base model here and the LoRA "
                          f"with --lora {path}")  # fmt: skip
    return BoothError(f"{path} is a folder of checkpoints, not one model: give one of its files")


def identify(path: Path) -> Found:
    """Look at a local path (headers only) and say what it holds; BoothError if it holds no model."""
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return Found(path, "diffusers")
        if (path / LORA_FOLDER_FILE).is_file():
            return Found(path, "lora")
        files = sorted(
            (p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()), key=natural_key
        )
        if not files and (path / CHECKPOINT_FOLDER).is_dir():  # a training run folder
            return identify(path / CHECKPOINT_FOLDER)
        if not files:
            raise BoothError(
                f"{path} holds no checkpoints (.safetensors, .ckpt) and is not a diffusers folder"
            )
        return Found(
            path, "folder", tuple(Found(p, "lora" if _is_lora_file(p) else "checkpoint") for p in files)
        )
    if not path.exists():
        raise BoothError(f"checkpoint not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise BoothError(
            f"unknown checkpoint format {path.suffix!r} ({path}); use .safetensors, .ckpt or a diffusers folder"
        )
    return Found(path, "lora" if _is_lora_file(path) else "checkpoint")


def _is_lora_file(path: Path) -> bool:
    """From the tensor names alone. A damaged file is not a LoRA here: reading it as a model reports the damage."""
    try:
        if path.suffix == ".safetensors":
            return looks_like_lora(safetensors_header(path)[0])
        return looks_like_lora(pickle_contents(path)[1])
    except (BoothError, OSError):
        return False
