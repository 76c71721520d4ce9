import os
import sys

# Under pytest-xdist (CI: -n 2 on 2 cores) each worker, and each booth process a test starts, computes on one
# thread: the workers share the cores, and every process of one run reduces in the same order.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# No test may touch the network: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
