"""zotune: fine-tune language models with forward passes only, at the memory cost of inference."""

import os

# After each parallel torch op, OpenMP's worker threads spin, waiting for more work; between
# its forward passes a ZO step runs its own threads over the weights, and a spinning worker
# takes a core from them (MiniLM-L6: 61 -> 41 ms of passes a step, forward passes no slower).
# Let idle workers sleep unless the user chose otherwise; this only takes effect when zotune
# is imported before torch (the `zotune` command always is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import optim
from .optim import replay

__version__ = "0.1.0"

__all__ = ["optim", "replay", "__version__"]
