"""Shared test setup: never touch the network, import the top-level modules, keep CPU threads sane."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.backends.cudnn.deterministic = True

# The test models are tiny (or full-size at a few latent pixels): intra-op threads only add OpenMP spin-waiting,
# which cost 5-10x on a loaded 2-core machine (a 40k-element GroupNorm: 9 ms with 2 threads, 0.02 ms with 1).
# Subprocesses (train.py, sample.py, torchrun) keep their own defaults.
torch.set_num_threads(1)
