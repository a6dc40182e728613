"""zotune: fine-tune language models with forward passes only, at the memory cost of inference."""

from . import optim
from .trajectory import replay

__version__ = "0.1.0"

__all__ = ["optim", "replay", "__version__"]
