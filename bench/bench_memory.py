"""booth.memory's sampling forecast against the memory sampling really takes.

Each configuration runs in a fresh process: it loads the model, makes the input image, resets the process's
peak RSS (writing 5 to /proc/self/clear_refs; where that is refused the peak of loading may show), samples
(steps=2, classifier-free guidance at scale 7.5, fp32 on the CPU) and reports the peak RSS (VmHWM) minus the RSS
just before sampling. The table prints the forecast of activations, that measurement and their ratio.

    python bench/bench_memory.py            # the demo model (up to 1024x1024) and booth.config.TINY: 4 minutes
    python bench/bench_memory.py --sd1      # also full SD1 (random weights) at 256 and 512: 4 GB of weights, 2 minutes more
    python bench/bench_memory.py --big      # also TINY at 512x512 and the demo at 2048x2048: well over 15 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (model, mode, side, batch); the demo model's native side is 64, its VAE downscales by 4; TINY's by 2.
CONFIGS = [
    ("demo", "txt2img", 64, 1), ("demo", "txt2img", 64, 2), ("demo", "txt2img", 128, 1),
    ("demo", "txt2img", 256, 1), ("demo", "txt2img", 256, 2), ("demo", "txt2img", 512, 1),
    ("demo", "txt2img", 512, 2), ("demo", "txt2img", 1024, 1), ("demo", "img2img", 64, 1),
    ("demo", "img2img", 256, 1), ("demo", "img2img", 256, 2), ("demo", "img2img", 512, 1),
    ("demo", "img2img", 1024, 1),
    ("tiny", "txt2img", 64, 1), ("tiny", "txt2img", 128, 1), ("tiny", "txt2img", 128, 2),
    ("tiny", "txt2img", 256, 1), ("tiny", "img2img", 128, 1), ("tiny", "img2img", 256, 1),
]  # fmt: skip
# Memory now grows with the pixels, but the flash kernels' time still with their square: on 2 cores TINY at its
# own 512x512 took 2-3 minutes each; the demo at 2048x2048 (its UNet attending over 256x256 tokens at each of 2
# steps, its VAE over 512x512 pixels) had not finished after 9 minutes, though its decode alone took 3 minutes
# and 3.78 GB, the rules' 3.76 GB. So these run only when asked.
BIG_CONFIGS = [("tiny", "txt2img", 512, 1), ("tiny", "img2img", 512, 1), ("demo", "txt2img", 2048, 1)]
SD1_CONFIGS = [("sd1", "txt2img", 256, 1), ("sd1", "txt2img", 512, 1)]


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
        return True
    except OSError:
        return False


def load(name: str):
    from booth.pipeline import StableDiffusion

    if name == "demo":
        return StableDiffusion.from_pretrained("demo")
    from booth.config import SD1, TINY
    from booth.model import random_weights

    return StableDiffusion(random_weights({"tiny": TINY, "sd1": SD1}[name]))


def worker(name: str, mode: str, side: int, batch: int) -> dict:
    """Measure one configuration in this (fresh) process."""
    import numpy as np
    from PIL import Image

    from booth import memory

    sd = load(name)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    seeds = list(range(batch))
    base, exact = status("VmRSS"), reset_peak()
    start = time.perf_counter()
    if mode == "txt2img":
        sd.txt2img("a red circle", "", seeds=seeds, steps=2, height=side, width=side)
    else:
        sd.img2img(image, "a red circle", "", seeds=seeds, strength=0.5, steps=2, height=side, width=side)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    forecast = memory.sampling_bytes(sd.config, side, side, batch, 4, guidance=True, encode=mode == "img2img")
    return {"measured": peak - base, "forecast": forecast, "peak": peak, "seconds": seconds, "exact": exact}


def measure(config: tuple) -> dict:
    """Run `worker` for `config` in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--worker", *map(str, config)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd1", action="store_true", help="also full SD1 with random weights (4 GB more)")
    p.add_argument(
        "--big", action="store_true", help="also TINY at 512 and the demo at 2048 (slow attention)"
    )
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "MODE", "SIDE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, mode, side, batch = args.worker
        print(json.dumps(worker(name, mode, int(side), int(batch))))
        return
    print(f"{'config':<25} {'forecast':>9} {'measured':>9} {'ratio':>6} {'peak RSS':>9} {'seconds':>8}")
    for config in CONFIGS + (BIG_CONFIGS if args.big else []) + (SD1_CONFIGS if args.sd1 else []):
        r = measure(config)
        name, mode, side, batch = config
        label = f"{name} {mode} {side}x{side} b{batch}" + ("" if r["exact"] else " *")
        mb = lambda n: f"{n / 1e6:,.0f} MB"
        print(f"{label:<25} {mb(r['forecast']):>9} {mb(r['measured']):>9} {r['forecast'] / r['measured']:>6.2f} "
              f"{mb(r['peak']):>9} {r['seconds']:>8.1f}", flush=True)  # fmt: skip
    print(
        "forecast: booth.memory.sampling_bytes (activations only); measured: peak RSS minus RSS before sampling; "
        "ratio: forecast / measured (* = peak not reset); peak RSS: the whole process's, weights included"
    )


if __name__ == "__main__":
    main()
