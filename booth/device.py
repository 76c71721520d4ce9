"""Where and in what precision a command runs, and the one translation of running out of memory into advice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import BoothError


def pick_device(spec: str | None) -> torch.device:
    """`0`, `cuda:1`, `cpu` or `mps`; None: the first GPU, else mps, else the CPU."""
    if spec is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
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
    if device.type == "mps" and not _mps_available():
        raise BoothError("mps is not available on this machine; use -d cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise BoothError(f"unsupported device {spec!r}; use 0, cuda:1, cpu or mps")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype of a precision name (booth.options.PRECISIONS); None: fp16 on CUDA, fp32 elsewhere.
    `autocast` is the seed tool's name for half precision on a GPU, and `full` for fp32."""
    gpu = device.type == "cuda"
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise BoothError("this GPU does not support bf16; use --precision fp16")
    half = torch.float16 if gpu else torch.float32
    return {None: half, "autocast": half, "full": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}[precision]  # fmt: skip


def training_precision(
    precision: str | None, device: torch.device, fused: bool, weights: str = "fp32"
) -> str | None:
    """The precision a training run uses when none is given. bf16 weights compute in bf16, on every device. The
    fused step cannot skip a step after an fp16 overflow, so on a GPU it takes bf16, or fp32 where the GPU has
    no bf16."""
    bf16_gpu = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if weights == "bf16":
        if not bf16_gpu:
            raise BoothError("this GPU does not support bf16, so cannot hold --weights bf16 (--lean turns it on): "
                             "give --weights fp32")  # fmt: skip
        return "bf16"
    if precision is not None or not fused or device.type != "cuda":
        return precision
    return "bf16" if bf16_gpu else "fp32"


def training_dtypes(precision: str | None, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype, or None for plain fp32; dtype of the frozen networks). Trained weights stay fp32."""
    dtype = pick_dtype(precision, device)
    return (None if dtype == torch.float32 else dtype), dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def out_of_memory(hint: str) -> Iterator[None]:
    """A CUDA or CPU allocation failure becomes BoothError("out of memory ...: <hint>")."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        yield
    except (oom, MemoryError):
        raise BoothError(f"out of memory {hint}") from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise BoothError(f"out of memory {hint}") from None
        raise


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory on a GPU, else the whole process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows, which has no /proc either

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
