"""What the benches share: each measured run is a fresh process (so its peak memory is its own) that prints its
result as JSON on the last line of stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_worker(cmd: list[str], which: str) -> dict:
    """Run one worker offline and return its JSON result; a failed worker ends the bench with its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.exit(f"{which} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
