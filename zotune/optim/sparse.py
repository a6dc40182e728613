"""Sparse MeZO (Liu et al., 2024, arXiv 2402.15751) and its random-mask baseline R-MeZO."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from .mezo import MeZO


class SparseMeZO(MeZO):
    """MeZO restricted to small-magnitude weights.

    Per tensor, a threshold h is fixed once so that the (1 − sparsity) fraction of entries with
    the smallest |θ| falls under it. Each use of z is masked by m = |θ0| ≤ h, recomputed from the
    current unperturbed weights: ẑ = m ⊙ z, g = (L(θ + εẑ) − L(θ − εẑ))/2ε, θ ← θ − η·g·ẑ.
    Masked-out weights are neither perturbed nor updated. Cost per step as MeZO: 2 forward
    passes, 3 regenerations of z; no mask is stored beyond a 1-bit record while perturbed.
    A tensor tied at its threshold (zeros, ones, quantized weights) takes its threshold again
    each step, from a band around the last one: one more read of it and a buffer of at most
    1/16 of it, freed after (`MagnitudeMask`).
    """

    name = "sparse-mezo"
    summary: ClassVar[str] = "MeZO perturbing only each tensor's smallest-|θ| entries"
    forwards: ClassVar[str] = "2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        sparsity: float = 0.8,
        mask: str = "magnitude",
        **kw: Any,
    ):
        if mask != "magnitude":
            raise ValueError(f"sparse-mezo's mask is 'magnitude', got '{mask}'")
        super().__init__(params, lr=lr, mask=mask, sparsity=sparsity, **kw)


class RMeZO(MeZO):
    """R-MeZO: MeZO with a random mask of the same sparsity, drawn afresh every `resample`
    steps (1: every step; the Sparse MeZO paper's baseline; ZO-Bench's
    `--sparse_gradient_resample_steps`): steps t with the same t − t mod `resample` share a
    mask. Costs as MeZO."""

    name = "r-mezo"
    summary: ClassVar[str] = (
        "MeZO with a random mask of the same sparsity, redrawn every `resample` steps"
    )
    forwards: ClassVar[str] = "2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        sparsity: float = 0.8,
        mask: str = "random",
        resample: int = 1,
        **kw: Any,
    ):
        if mask != "random":
            raise ValueError(f"r-mezo's mask is 'random', got '{mask}'")
        if int(resample) != resample or resample < 1:
            raise ValueError(f"resample must be an integer >= 1 (steps), got {resample}")
        config = {"resample": int(resample)} if resample != 1 else {}
        super().__init__(params, lr=lr, mask=mask, sparsity=sparsity, config=config, **kw)
        self.resample = int(resample)

    def mask_step(self) -> int:
        return self.steps - self.steps % self.resample
