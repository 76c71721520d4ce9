"""Memory forecasts, so a caller can refuse a size or batch that cannot fit before it starts.

`weights_bytes` counts the model's parameters. `sampling_bytes` forecasts the peak of the activations of one
txt2img or img2img call (classifier-free guidance, then the VAE decode, and for img2img the VAE encode) by
walking the model's own module tree, built on the meta device (no memory), with one rule per kind of layer.
Each rule counts the tensors alive at that layer's peak, its input included, as measured on PyTorch 2.13 on
CPU (oneDNN convolutions, glibc malloc); bench/bench_memory.py holds the forecast against whole runs.

A training step is not walked by rules: `booth.train.forecast` runs the step itself on the meta device (or on
fake tensors, where autocast must take effect), shapes and dtypes with no memory, and `LiveBytes` counts the
bytes each op's outputs keep alive until they are freed, so autograd's saved tensors, gradient checkpointing,
autocast's cast weights and the gradients are counted as the step makes them.

Every term grows with the pixel count, none with its square: the VAE's mid-block attention passes contiguous
q, k and v, so scaled_dot_product_attention takes its flash kernel, which walks the scores in blocks and never
materialises them. (Its time still grows with the square: one over the 256x256 pixels of the demo's 1024x1024
decode takes 18 s on 2 cores, over the 512x512 of a 2048x2048 one 3-4 minutes.) From 256 px a side on, the VAE
decoder's full-resolution level dominates: the upsample into it, its ResnetBlocks and GroupNorms, maps of
ch * ch_mult[1] or ch channels over every pixel (demo at 1024x1024: 941 of the 1172 MB; SD1 at 512x512:
1009 of 1271 MB); the UNet's heap, kept through the decode, is most of the rest. Below that the fixed
overhead is most of the forecast (the demo at its own 64x64: 150 of 155 MB).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import unet as U
from . import vae as V
from .config import ModelConfig
from .model import PARTS, LatentDiffusion, build, part_of

# What a sampling run needs beyond the tensors the rules count: the first call's oneDNN and OpenMP buffers,
# the text encoder, the sampler's latents, the PIL images. Measured 14-40 MB over the rules at the smallest
# sizes (bench/bench_memory.py); the rest is margin for the allocator's run-to-run spread (glibc's per-thread
# arenas are the likely cause), which is large: the demo's txt2img of two 256x256 images measured 213-305 MB
# in 8 runs (its rules: 147 MB), SD1's of one 256x256 image 385-499 MB in 4 (its rules: 389 MB).
OVERHEAD_BYTES = 150_000_000

Size = tuple[int, int]


@functools.lru_cache(maxsize=8)
def _meta_model(config: ModelConfig) -> LatentDiffusion:
    return build(config)  # the module tree on the meta device: shapes only, no memory


@functools.lru_cache(maxsize=8)
def parameter_count(config: ModelConfig) -> int:
    """Parameters of the UNet, the VAE and the text encoder (booth's modules have no buffers)."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def weights_bytes(config: ModelConfig, itemsize: int) -> int:
    """Bytes of the model's weights stored in a dtype of `itemsize` bytes."""
    return parameter_count(config) * itemsize


def part_bytes(config: ModelConfig, itemsize: int) -> dict[str, int]:
    """Bytes of the weights of each of booth.model.PARTS, stored in a dtype of `itemsize` bytes."""
    out = dict.fromkeys(PARTS, 0)
    for k, v in _meta_model(config).state_dict().items():
        out[part_of(k)] += v.numel() * itemsize
    return out


def sampling_bytes(
    config: ModelConfig, height: int, width: int, batch: int, itemsize: int, guidance: bool, encode: bool
) -> int:
    """Forecast peak bytes of activations (weights excluded) of sampling `batch` images of height x width."""
    model, f = _meta_model(config), config.vae.downscale
    latent = (height // f, width // f)
    unet = _unet_bytes(model.unet, 2 * batch if guidance else batch, latent, itemsize)
    decode = _decode_bytes(model.vae, batch, latent, itemsize)  # booth decodes the whole batch at once
    # img2img first encodes its one input image (one posterior sample per seed is drawn from it)
    encoded = _encode_bytes(model.vae, (height, width), itemsize) if encode else 0
    # glibc serves blocks under 32 MB from its heap, and the UNet's many small tensors fragment it, so what
    # the UNet grew the heap to mostly stays resident through the decode: SD1's decode measured 212 MB (at
    # 256x256) and 278 MB (512x512) more after the UNet than alone, its UNet forecast 135 and 262 MB. Some
    # runs reuse it instead (the demo's 1024x1024 txt2img measured 883-1181 MB in 4 runs, its decode alone 957
    # MB), which this overestimates (bench: up to 1.5x). The VAE's peaks are full-resolution maps, mostly
    # mmapped blocks returned when freed, so the encode adds nothing beyond the spread (the demo's 1024x1024
    # img2img measured 952-1260 MB in 4 runs; counting the encoder's 684 MB too would forecast 2.0 GB).
    return OVERHEAD_BYTES + max(encoded, unet + decode)


# ---------------------------------------------------------------------------------------- the phases


def _unet_bytes(unet: U.UNetModel, n: int, hw: Size, itemsize: int) -> int:
    """One UNet call on n latents: the skip connections it holds for the output blocks, plus the block in flight."""
    c, skips, peak = unet.input_blocks[0][0].in_channels, [], 0

    def held(tensors: list[tuple[int, Size]]) -> int:
        return sum(ch * s[0] * s[1] for ch, s in tensors) * n * itemsize

    for block in [*unet.input_blocks, unet.middle_block]:
        p, c, hw = _layer(block, c, hw, n, itemsize)
        peak = max(peak, held(skips[:-1]) + p)  # the block's input is the last skip: count it once
        skips.append((c, hw))
    skips.pop()  # the middle block's output is not a skip
    for block in unet.output_blocks:
        skip_c, _ = skips.pop()
        cat = (c + skip_c) * hw[0] * hw[1] * n * itemsize
        peak = max(peak, held(skips) + 2 * cat)  # torch.cat: both halves and the result
        size = skips[-1][1] if skips else None  # upsample to the next skip's size, as UNetModel.forward does
        p, c, hw = _layer(block, c + skip_c, hw, n, itemsize, size)
        peak = max(peak, held(skips) + p)
    return max(peak, _layer(unet.out, c, hw, n, itemsize)[0])


def _decode_bytes(vae: V.AutoencoderKL, n: int, latent: Size, itemsize: int) -> int:
    """AutoencoderKL.decode of n latents."""
    d = vae.decoder
    layers = [vae.post_quant_conv, d.conv_in, d.mid, *reversed(d.up), d.norm_out, nn.SiLU(), d.conv_out]
    return _chain(layers, vae.post_quant_conv.in_channels, latent, n, itemsize)[0]


def _encode_bytes(vae: V.AutoencoderKL, image: Size, itemsize: int) -> int:
    """AutoencoderKL.encode of one image."""
    e = vae.encoder
    layers = [e.conv_in, *e.down, e.mid, e.norm_out, nn.SiLU(), e.conv_out, vae.quant_conv]
    return _chain(layers, e.conv_in.in_channels, image, 1, itemsize)[0]


# ---------------------------------------------------------------------------------------- the layers


def _chain(layers: list[nn.Module], c: int, hw: Size, n: int, itemsize: int, size: Size | None = None):
    """Layers run one after the other: (peak bytes, output channels, output size)."""
    # The caller keeps the chain's input alive until the chain returns.
    held = c * hw[0] * hw[1] * n * itemsize
    peak = 0
    for i, layer in enumerate(layers):
        p, c, hw = _layer(layer, c, hw, n, itemsize, size)
        peak = max(peak, p + (held if i else 0))  # the first layer's peak already counts the input
    return peak, c, hw


def _layer(m: nn.Module, c: int, hw: Size, n: int, itemsize: int, size: Size | None = None):
    """(peak bytes while `m` runs on n maps of c channels at hw, its input included; output channels; size)."""
    px, e = hw[0] * hw[1], n * itemsize  # e: bytes of one channel-pixel over the batch
    if isinstance(m, (U.ResBlock, V.ResnetBlock)):
        out = m.out_layers[-1].out_channels if isinstance(m, U.ResBlock) else m.conv2.out_channels
        return _resblock(c, out, px * e, itemsize), out, hw
    if isinstance(m, U.SpatialTransformer):
        # input, tokens, LayerNorm, then the feed-forward's GEGLU: its 8c projection, gelu(gate) 4c, product 4c
        # (20c measured with depth 1; blocks of a deeper transformer run one after the other)
        return 20 * c * px * e, c, hw
    if isinstance(m, V.AttnBlock):
        return _attn_block(c, px * e, n * px, itemsize), c, hw
    if isinstance(m, (U.Downsample, V.Downsample)):
        unet = isinstance(m, U.Downsample)  # padding 1 rounds up; the VAE's asymmetric pad rounds down
        out = ((hw[0] + 1) // 2, (hw[1] + 1) // 2) if unet else (hw[0] // 2, hw[1] // 2)
        # input, its padded copy (VAE) or the strided conv's workspace (1.5-1.9x its input, measured), output
        return (3 * px + out[0] * out[1]) * c * e + 9 * c * c * itemsize, c, out
    if isinstance(m, (U.Upsample, V.Upsample)):
        out = size or (2 * hw[0], 2 * hw[1])
        # input, interpolated, the conv's output and workspace, its weights
        return (px + 3 * out[0] * out[1]) * c * e + 9 * c * c * itemsize, c, out
    if isinstance(m, nn.Conv2d):  # kernel 3 padding 1 or kernel 1: the size stays
        return _conv(c, m.out_channels) * px * e + m.weight.numel() * itemsize, m.out_channels, hw
    if isinstance(m, (nn.GroupNorm, nn.SiLU)):
        return 2 * c * px * e, c, hw
    if isinstance(m, (V.Level, V.Mid, nn.Sequential)):  # nn.Sequential covers TimestepEmbedSequential
        return _chain(_children(m), c, hw, n, itemsize, size)
    raise TypeError(f"no memory rule for {type(m).__name__}")


def _children(m: nn.Module) -> list[nn.Module]:
    """A container's layers in the order its forward runs them."""
    if isinstance(m, V.Level):
        return [*m.block, *([getattr(m, m.resample_name)] if m.resample_name else [])]
    if isinstance(m, V.Mid):
        return [m.block_1, m.attn_1, m.block_2]
    return list(m)


def _conv(cin: int, cout: int) -> int:
    # oneDNN reorders the larger operand into its blocked layout, and on every call its weights too (added by the
    # callers): measured on 1x1 and 3x3 convolutions, a convolution's transient is its output plus max(cin, cout)
    # channels plus a copy of its weights. Channels here, its input included.
    return cin + cout + max(cin, cout)


def _resblock(cin: int, cout: int, e: int, itemsize: int) -> int:
    """Bytes at the peak of a UNet ResBlock or a VAE ResnetBlock on `e` bytes per channel, its input included."""
    # GroupNorm and SiLU each make a new tensor and the block's input stays alive to the final addition.
    first = max(3 * cin * e, (cin + _conv(cin, cout)) * e + 9 * cin * cout * itemsize)  # x, silu, conv1
    second = (cin + cout + _conv(cout, cout)) * e + 9 * cout * cout * itemsize  # x, h, silu, conv2
    shortcut = cout * e if cin != cout else 0  # UNet: the projected shortcut is computed before out_layers
    return max(first, second + shortcut)


def _attn_block(c: int, e: int, pixels: int, itemsize: int) -> int:
    """Bytes at the peak of a VAE AttnBlock on `e` bytes per channel, `pixels` over the batch, input included."""
    # Measured with the torch profiler at c = 64 and 512: 8.00 maps of x's size at proj_out, after the
    # attention (peak RSS 7.03-7.10 above x, at c = 64 over 384x384 and 512x512 pixels, c = 512 over
    # 128x128): x; q, k and v, locals alive to the return; the attention's output; the contiguous copy the
    # convolution makes of its transposed view; the conv's output and oneDNN's copy of it; proj_out's weights.
    # (The 1x1 convolutions make no copy in bf16 and fp16: 7 maps, so this overestimates those a little.)
    at_proj = 8 * c * e + c * c * itemsize
    # Inside the kernel only x, the norm, q, k, v and the output are alive, with the kernel's own buffers.
    in_flash = 6 * c * e + 4 * pixels + _flash_buffers(c, itemsize)  # logsumexp: one float32 per pixel
    return max(at_proj, in_flash)


def _flash_buffers(c: int, itemsize: int) -> int:
    # The CPU flash kernel gives each thread a block of at most 256 queries x 512 keys of float32 scores,
    # 256 x c float32 for its output rows and 2 x 256 for the running max and sum, and half types a reduced-
    # precision copy of the block. Measured on 2 threads: 1.18 MB for c = 64 and 2.1 MB for c = 512 in fp32,
    # 1.70 MB for c = 64 in bf16 and fp16; none of it grows with the pixels. On CUDA, SDPA may pick another
    # fused kernel (flash or memory-efficient) with a workspace of its own, unmeasured here. No CUDA-only term
    # is added: an underestimate there only loses the early refusal (the out-of-memory error still explains),
    # whereas an overestimate would refuse runs that fit.
    q, kv = 256, 512
    block = 4 * (q * kv + q * c + 2 * q) + (q * kv * itemsize if itemsize < 4 else 0)
    return torch.get_num_threads() * block


# ---------------------------------------------------------------------------------------- training


def fake_model(
    config: ModelConfig, dtypes: dict[str, torch.dtype], mode: FakeTensorMode | None
) -> LatentDiffusion:
    """The model on the meta device, or with fake CPU tensors of `mode` as parameters, each network in its dtype
    in `dtypes` ("unet", "vae", "text_encoder"): code run on it computes shapes and dtypes only, with no memory.
    Autocast takes no effect on the meta device, but does on fake CPU tensors (under `mode`), which are slower."""
    model = build(config).eval().requires_grad_(False)  # as checkpoint.load_model gives it
    for name, dtype in dtypes.items():
        getattr(model, name).to(dtype)
    if mode is None:
        return model
    with mode:
        for m in model.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
    return model


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage itself: views and in-place results share it


class LiveBytes(TorchDispatchMode):
    """Counts the bytes that code keeps alive (on the meta device, fake tensors or real ones), and their peak:
    each op's outputs by storage,
    from the op that makes it until the last tensor on it is freed (autograd's saved tensors hold theirs until
    the backward pass has used them). Tensors in `existing` (the weights, counted apart) are not counted."""

    def __init__(self, existing: Iterable[torch.Tensor] = (), workspace=None):
        super().__init__()
        self.live = self.peak = 0
        self._skip = {_storage(t) for t in existing}
        self._refs: dict[int, list[int]] = {}  # storage -> [bytes, tensors on it]
        self._workspace = workspace  # (op, args) -> bytes a kernel holds beyond its inputs and outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._workspace is not None:
            self.peak = max(self.peak, self.live + self._workspace(func, args))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        key = _storage(t)
        if key in self._skip:
            return
        entry = self._refs.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._refs[key]
            self.live -= entry[0]


def cpu_workspace(func, args) -> int:
    """Bytes a CPU convolution (forward or backward) holds while it runs, beyond its inputs and outputs. Half
    precision on a CPU without oneDNN's bf16 takes the slow path, which unfolds the batch into k*k-times larger
    columns (the demo VAE's 32-channel convolutions on two 256x256 images: 75 MB; measured with the encode:
    109 MB, traced 102); oneDNN reorders the larger of input and output, and the weights, into its blocked
    layout (see `_conv`)."""
    aten = torch.ops.aten
    if func is aten.convolution.default:
        x, w = args[0], args[1]
    elif func is aten.convolution_backward.default:
        x, w = args[1], args[2]
    else:
        return 0
    cout, cin, kh, kw = w.shape
    pixels = x.shape[2] * x.shape[3]  # stride 1 (the strided convolutions' smaller output is not modelled)
    if x.dtype in (torch.bfloat16, torch.float16) and not _onednn_half():
        return x.shape[0] * cin * kh * kw * pixels * x.element_size() if kh * kw > 1 else 0
    return (max(cin, cout) * pixels * x.shape[0] + w.numel()) * x.element_size()


@functools.cache
def _onednn_half() -> bool:
    try:  # a private op of PyTorch's: where it is missing, assume the slow path (the larger forecast)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def optimizer_bytes(make, params: list[torch.Tensor], mode: FakeTensorMode) -> tuple[int, int]:
    """(bytes of the state `make([p])`'s optimizer keeps for all of `params`, the largest transient of one
    parameter's step), from one traced step per distinct shape and dtype. For optimizers torch and booth write in
    torch ops; bitsandbytes' kernels cannot run on fake tensors (see `adamw8bit_state_bytes`)."""
    kinds: dict[tuple, int] = {}
    for p in params:
        kinds[(tuple(p.shape), p.dtype)] = kinds.get((tuple(p.shape), p.dtype), 0) + 1
    state = transient = 0
    for (shape, dtype), count in kinds.items():
        with mode:
            p = nn.Parameter(torch.empty(shape, dtype=dtype))
            p.grad = torch.empty(shape, dtype=dtype)
        optimizer = make([p])
        with mode, LiveBytes([p, p.grad]) as live:
            optimizer.step()
        state += count * live.live
        transient = max(transient, live.peak - live.live)
    return state, transient


def adamw8bit_state_bytes(params: list[torch.Tensor]) -> int:
    """bitsandbytes' AdamW8bit: two uint8 moments and their fp32 absmax per block of 256 for tensors of at least
    4096 elements (its min_8bit_size), two fp32 moments for smaller ones."""
    return sum(2 * (n + 4 * -(-n // 256)) if n >= 4096 else 8 * n for n in (p.numel() for p in params))


# ---------------------------------------------------------------------------------------- the device


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes `device` can still give: CUDA's free memory, Linux's MemAvailable for the CPU, else None (unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return _mem_available()
    return None  # mps and others: no reliable figure


def _mem_available(path: str = "/proc/meminfo") -> int | None:
    # MemAvailable is the kernel's estimate of what can be allocated without swapping (free plus reclaimable
    # page cache); absent off Linux, where the file does not exist.
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc/self/statm), or 0 where that is not known."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def fits(needed: int, device: torch.device | str) -> tuple[bool, int | None]:
    """(whether `needed` bytes fit in what `device` has free, that amount); an unknown amount fits."""
    available = available_bytes(device)
    return (available is None or needed <= available), available


def format_gb(n: int, digits: int = 1) -> str:
    """Bytes as decimal gigabytes: 12_600_000_000 -> '12.6 GB'."""
    return f"{n / 1e9:.{digits}f} GB"
