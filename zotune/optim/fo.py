"""First-order baselines with real backpropagation, in the same API and registry.

Their closure must call `backward()` (the training loop does). Memory: gradients (1 × d) plus
the activations kept for backward; FO-Adam adds 2 × d of moments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class FOSGD(torch.optim.SGD):
    """torch.optim.SGD (ZO-Bench's FO-SGD baseline)."""

    name = "fo-sgd"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, **kw: Any):
        super().__init__(params, lr=lr, momentum=momentum, **kw)


class FOAdam(torch.optim.Adam):
    """torch.optim.Adam (the fine-tuning baseline of MeZO and ZO-Bench)."""

    name = "fo-adam"

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, **kw: Any):
        super().__init__(params, lr=lr, **kw)
