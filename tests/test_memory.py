"""booth.memory: weights counted exactly, the sampling forecast against real runs and the architecture's growth."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from booth import memory
from booth.config import SD1, TINY
from booth.model import build, random_weights

os.environ["HF_HUB_OFFLINE"] = "1"
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"
GB = 1e9


@pytest.fixture(scope="module")
def demo_config():
    from booth.pipeline import StableDiffusion

    return StableDiffusion.from_pretrained("demo").config


# ------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weights_bytes_equals_a_real_model(dtype):
    model = random_weights(TINY, dtype=dtype)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.weights_bytes(TINY, dtype.itemsize) == real


def test_weights_bytes_of_sd1_is_the_known_parameter_count():
    # Stable Diffusion v1's published sizes: UNet, KL autoencoder, CLIP ViT-L/14 text encoder (parameters only;
    # booth's modules register no buffers, e.g. no position_ids).
    unet, vae, clip = 859_520_964, 83_653_863, 123_060_480
    model = build(SD1)  # meta device: no memory
    assert [sum(p.numel() for p in m.parameters()) for m in (model.unet, model.vae, model.text_encoder)] == [
        unet,
        vae,
        clip,
    ]
    assert list(model.buffers()) == []
    assert memory.weights_bytes(SD1, 2) == 2 * (unet + vae + clip)
    assert memory.weights_bytes(SD1, 4) == 4 * (unet + vae + clip)


# ------------------------------------------------------------------------------------------------- vs real runs


def measure(model: str, mode: str, side: int, batch: int) -> int:
    """Peak RSS growth of one sampling call, in a fresh process (bench/bench_memory.py's worker).

    glibc's mmap threshold is pinned at its initial 128 KiB: by default each freed mmapped block raises it, so
    later blocks come from the heap and what stays resident depends on the order of frees. The same demo img2img
    512x512 run measured 332-407 MB over 5 runs here and 495 MB on a CI machine (the forecast, 443 MB, failed
    there), and 259 MB in each of 3 runs pinned: the bytes the tensors need, which is what the forecast counts.
    bench_memory reports the default allocator's spread."""
    cmd = [sys.executable, str(BENCH), "--worker", model, mode, str(side), str(batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["exact"]:
        pytest.skip("this kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    return result["measured"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc (Linux)")
@pytest.mark.parametrize(
    "model, mode, side, batch",
    # the demo's own size: a few MB, the forecast is mostly its fixed overhead; a batch of two decoded at once
    # (1.34 in bench_memory), where the activations are most of it; img2img, its encode, UNet and decode (1.11).
    # The tightest of the bench (demo 256x256 batch 2, 0.97-1.4 over 17 runs) is left to the bench: a CI run
    # should not fail on the allocator's spread.
    [("demo", "txt2img", 64, 1), ("demo", "txt2img", 512, 2), ("demo", "img2img", 512, 1)],
)
def test_forecast_bounds_the_measured_peak(demo_config, model, mode, side, batch):
    config = demo_config if model == "demo" else TINY
    forecast = memory.sampling_bytes(config, side, side, batch, 4, guidance=True, encode=mode == "img2img")
    measured = measure(model, mode, side, batch)
    # The forecast is used to refuse runs, so it may not fall short by more than 10% (bench_memory, 3 runs of
    # its table and 14 repeats: 0.97 at the least, the demo's 256x256 b2 that measured 213-305 MB). It may
    # exceed the peak by half plus its fixed overhead: it counts the UNet's heap as kept through the decode,
    # which some runs reuse instead (bench: the forecast less its overhead is at most 1.41x the peak, TINY at
    # 512x512).
    assert 0.9 * measured <= forecast <= 1.5 * measured + memory.OVERHEAD_BYTES


# ------------------------------------------------------------------------------------------------- growth


def last_upsample(config, side: int) -> int:
    """Closed form: the decoder's upsample into the full-resolution level holds its nearest-neighbour input,
    the 3x3 convolution's output and oneDNN's copy of it: 3 float32 maps of ch * ch_mult[1] channels over
    every pixel of one image."""
    return 3 * config.vae.ch * config.vae.ch_mult[1] * side * side * 4


@pytest.mark.parametrize("name", ["demo", "sd1"])
def test_linear_in_pixels_where_the_convolutions_dominate(demo_config, name):
    # Nothing is quadratic any more: the VAE attention's flash kernel keeps no (HW x HW) scores, so the peak
    # is the decoder's full-resolution level, 4x per doubled side; at 4096 px the old math kernel's scores
    # alone would have been 619 GB for SD1 and 9.9 TB for the demo.
    config = demo_config if name == "demo" else SD1
    act = {
        s: memory.sampling_bytes(config, s, s, 1, 4, True, False) - memory.OVERHEAD_BYTES
        for s in (1024, 2048, 4096)
    }
    assert 3.95 < act[2048] / act[1024] < 4.05
    assert 15.8 < act[4096] / act[1024] < 16.2
    for s, a in act.items():
        # above it: the rest of that level, the held input, the UNet's heap (demo 1.45x, SD1 1.58x)
        assert last_upsample(config, s) < a < 2 * last_upsample(config, s)


def test_a_1024_img2img_on_the_demo_model_fits_in_a_few_gb(demo_config):
    # Before the VAE attention took the flash kernel the forecast was 39.1 GB, 38.7 GB of it the scores of the
    # encode's and the decode's mid-block attention; bench_memory measured 0.95-1.26 GB for it now (5 runs).
    forecast = memory.sampling_bytes(demo_config, 1024, 1024, 1, 4, True, True)
    assert 0.9 * 1.26 * GB < forecast < 3 * GB


def test_half_precision_halves_the_activations(demo_config):
    # Every rule scales with the itemsize; the flash kernel's float32 logsumexp and per-thread blocks are a
    # few MB.
    full, half = (memory.sampling_bytes(demo_config, 2048, 2048, 1, n, True, False) for n in (4, 2))
    o = memory.OVERHEAD_BYTES
    assert (half - o) == pytest.approx((full - o) / 2, rel=0.01)


def test_the_encode_peaks_before_the_unet_and_decode_not_with_them(demo_config):
    # img2img encodes first and the encoder's full-resolution maps are freed (mmapped) before the UNet runs:
    # at 1024 px its 0.68 GB are not added to the 1.17 GB of the UNet and the decode (bench, 4-5 runs each:
    # img2img 0.95-1.26 GB, txt2img 0.88-1.18 GB).
    txt, img = (memory.sampling_bytes(demo_config, 1024, 1024, 1, 4, True, e) for e in (False, True))
    assert img == txt


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc (Linux)")
def test_vae_attention_holds_no_scores():
    """One real AttnBlock of booth.vae over 128x128 pixels, in a fresh process: with contiguous q, k, v the flash
    kernel runs, and the peak is a few maps of the 4 MB input, where the math kernel would have held 9 bytes per
    (pixel x pixel) entry: 2.4 GB."""
    script = """
import torch
from booth.vae import AttnBlock

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

block, x = AttnBlock(64, groups=8), torch.randn(1, 64, 128, 128)
with torch.no_grad():
    block(torch.randn(1, 64, 8, 8))  # warm-up on a small map: the first call's oneDNN and OpenMP buffers
    before = hwm()
    block(x)
print(hwm() - before, 64 * 128 * 128 * 4)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    grown, input_bytes = map(int, out.stdout.split())
    scores = 9 * (128 * 128) ** 2  # what the math kernel held: 2.4 GB
    # A few maps of the input (8 by the profiler), plus the allocator's run-to-run spread (14 inputs in one CI
    # run): far from the scores either way.
    assert grown < scores / 10, (grown, input_bytes)


# ------------------------------------------------------------------------------------------------- training


def test_live_bytes_counts_what_autograd_keeps():
    """relu(x @ w): mm keeps x and w for its backward, relu its own output; the product itself is freed. The same
    on real CPU tensors and on the meta device."""
    for device in ("cpu", "meta"):
        w = torch.zeros(64, 32, device=device, requires_grad=True)
        with memory.LiveBytes([w]) as live:
            x = torch.zeros(16, 64, device=device, requires_grad=True)
            y = torch.relu(x @ w)
            assert live.live == (16 * 64 + 16 * 32) * 4  # x and relu's output
            assert live.peak == (16 * 64 + 2 * 16 * 32) * 4  # and the product, until relu had run
            y.sum().backward()
            del y
            assert live.live == (2 * 16 * 64 + 64 * 32) * 4  # what is left: x, its gradient and w's


def demo_cfg(config, **kw):
    from booth.options import TrainConfig

    cfg = TrainConfig(class_name="dog", instance_dir="x", model="demo", hw=(64, 64), **kw)
    return cfg.resolve(config.sample_size, 0.0)


def test_forecast_counts_the_weights_and_optimizer_state_exactly(demo_config):
    from booth.train import forecast

    unet, vae, text = (sum(p.numel() for p in m.parameters()) for m in (memory._meta_model(demo_config).unet,
                       memory._meta_model(demo_config).vae, memory._meta_model(demo_config).text_encoder))  # fmt: skip
    cpu = torch.device("cpu")
    full = forecast(demo_cfg(demo_config), demo_config, cpu)
    assert full.weights == 4 * (unet + vae + text)
    tensors = len(list(memory._meta_model(demo_config).unet.parameters()))
    assert full.optimizer == 8 * unet + 4 * tensors  # torch's AdamW: two fp32 moments, a float32 step count
    lean = forecast(demo_cfg(demo_config, lean=True), demo_config, cpu)
    assert lean.weights == 2 * (unet + vae + text)  # everything bf16
    shapes = [p.shape for p in memory._meta_model(demo_config).unet.parameters()]
    factored = sum(4 * (s[0] + math.prod(s[1:])) if len(s) > 1 else 4 * s[0] for s in shapes)
    assert (
        lean.optimizer == factored
    )  # Adafactor: a row and a column per matrix, conv kernels as (out, in*k*k)
    assert lean.step < full.step  # bf16 activations, checkpointing, and no gradient of the whole UNet at once


def test_adamw8bit_state_is_what_bitsandbytes_allocates():
    bnb = pytest.importorskip("bitsandbytes")
    params = [
        torch.nn.Parameter(torch.randn(*shape)) for shape in ((320, 4, 3, 3), (1280, 320), (320,), (77, 77))
    ]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    real = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for k, t in s.items()
        if torch.is_tensor(t) and not k.startswith("qmap")
    )  # fmt: skip  (the qmaps are shared tables)
    assert memory.adamw8bit_state_bytes(params) == real


TRAIN_WORKER = """
import sys
from booth.cli import main
try:
    main(sys.argv[1:])
finally:
    print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024)
"""


# A known gap: on a CPU with oneDNN's bf16 kernels (avx512_bf16) --lean's forecast is 0.79-0.81 of the peak, some
# 95 MB short whatever part of --lean is turned off; the slow path the other CPUs take is modelled (0.92).
LEAN_ON_ONEDNN_BF16 = pytest.mark.xfail(
    memory._onednn_half(), reason="oneDNN bf16's workspace is under-counted (0.8 of the peak)", strict=False
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc (Linux)")
@pytest.mark.parametrize(
    "flags",
    [[], pytest.param(["--lean"], marks=LEAN_ON_ONEDNN_BF16), ["--lora", "4"]],
    ids=["full", "lean", "lora"],
)
def test_training_forecast_is_within_15_percent_of_the_peak(flags, tmp_path):
    """A DreamBooth run of the demo model at 256x256 (its activations most of what it allocates), two steps and
    a checkpoint, against the whole process's peak RSS, glibc's mmap threshold pinned as in `measure`. Measured
    here: forecast / peak 0.90 (full), 0.92 (--lean), 0.89 (--lora 4)."""
    from PIL import Image

    classes = tmp_path / "class"
    classes.mkdir()
    for i in range(2):
        Image.new("RGB", (256, 256), (40 * i, 90, 200)).save(classes / f"{i:04d}.png")
    argv = ["dreambooth", "-c", "dog", "-i", str(Path(__file__).parent / "data" / "dog"), "-m", "demo",
            "-o", str(tmp_path / "out"), "--class-dir", str(classes), "--class-img-count", "2", "--hw", "256", "256",
            "--iterations", "2", *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", TRAIN_WORKER, *argv], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.strip().splitlines()[-1])
    forecast = float(re.search(r"this run needs about ([0-9.]+) GB", out.stderr).group(1)) * GB
    assert 0.85 * peak <= forecast <= 1.15 * peak, (forecast, peak)


def test_a_cuda_run_that_cannot_fit_is_refused_with_the_flags_that_fit(demo_config, monkeypatch, tmp_path):
    """The forecast of the default run (fp16 mixed precision on a GPU) exceeds what is free, --lean's does not."""
    from booth import device as D
    from booth import train as T
    from booth.errors import BoothError
    from booth.hub import find_model

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(D.torch.cuda, "is_bf16_supported", lambda: True)  # an Ampere or later GPU
    cfg = demo_cfg(demo_config)
    cfg = type(cfg)(**{**vars(cfg), "instance_dir": str(Path(__file__).parent / "data" / "dog")})
    full = T.forecast(cfg, demo_config, cuda, photos=5)
    lean = T.forecast(T.dataclasses.replace(cfg, lean=True, weights=None, fused_backward=None, optimizer=None,
                                            gradient_checkpointing=None), demo_config, cuda, photos=5)  # fmt: skip
    assert lean.total < full.total
    free = (lean.total + full.total) // 2
    monkeypatch.setattr(T, "available_bytes", lambda device: free)
    with pytest.raises(
        BoothError, match=r"needs about .* on cuda:0, and .* is free: it would fit with .*--lean"
    ):
        T.check_memory(cfg, find_model("demo", "-m").path, None, T.Dist(device=cuda))
    monkeypatch.setattr(T, "available_bytes", lambda device: full.total + 1)
    assert T.check_memory(cfg, find_model("demo", "-m").path, None, T.Dist(device=cuda)).total == full.total


# ------------------------------------------------------------------------------------------------- the device


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux only")
def test_available_bytes_on_linux():
    available = memory.available_bytes(torch.device("cpu"))
    assert isinstance(available, int) and available > 0
    assert memory.fits(1, "cpu") == (True, pytest.approx(available, rel=0.5))
    assert memory.fits(10**18, torch.device("cpu"))[0] is False


def test_available_bytes_unknown_elsewhere(tmp_path):
    assert memory.available_bytes(torch.device("meta")) is None
    assert memory.fits(10**18, "meta") == (True, None)  # unknown: nothing to refuse on
    assert memory._mem_available(str(tmp_path / "missing")) is None
    (tmp_path / "meminfo").write_text("MemTotal:  2048 kB\nMemFree:  1000 kB\nMemAvailable:  1500 kB\n")
    assert memory._mem_available(str(tmp_path / "meminfo")) == 1500 * 1024


def test_format_gb():
    assert memory.format_gb(12_600_000_000) == "12.6 GB"
    assert memory.format_gb(0) == "0.0 GB"
