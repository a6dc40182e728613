"""Estimators: turn losses at perturbed weights into projected gradients (scalars) and seeds.

An estimate is q pairs (seed_k, g_k); the gradient estimate it stands for is (1/q)·Σ_k g_k·z(seed_k),
which is never materialized. Estimators leave the weights perturbed at `Estimate.pending` so the
update can restore and step in the same pass (see `ParameterSpace.transition`).

Cost per call, with q queries (the update then regenerates each z_k once more, restoring the
pending offset in the same pass; MeZO with q = 1 totals 2 forwards and 3 regenerations a step):

| estimator | forward passes | passes regenerating z |
|-----------|----------------|-----------------------|
| two-sided | 2q             | 3q - 1                |
| one-sided | q + 1          | 2q - 1                |

Neither keeps anything the size of the model: memory is one block of z per thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .space import Offset, ParameterSpace

Closure = Callable[[], "float | torch.Tensor"]


@dataclass
class Estimate:
    seeds: list[int]
    grads: list[float]  # projected gradients g_k, one per seed
    loss: float  # the loss to report: mean of all evaluated losses (≈ L(θ) up to O(ε²))
    forward_passes: int
    pending: Offset | None = None  # where the estimator left the weights
    losses: list[float] = field(default_factory=list)


class MicroBatches:
    """A closure over K micro-batches (gradient accumulation): calling it returns the mean of
    the K losses, each micro-batch a forward pass of its own. For a zeroth-order step every
    evaluation of the loss is then the mean over the K·b examples under the same direction
    (2K forward passes a MeZO step): the projected gradient is the average of the K micro-batch
    projected gradients, the same as one K-times-larger batch up to float rounding (the losses
    are summed in float64, in micro-batch order). A first-order optimizer backpropagates each
    micro-batch's loss / K in turn (`optim.fo`), holding one micro-batch's graph at a time."""

    def __init__(self, losses: Sequence[Callable[[], float | torch.Tensor]]):
        if not losses:
            raise ValueError("MicroBatches needs at least one closure")
        self.losses = list(losses)

    def __call__(self) -> float:
        return self.mean([loss_value(loss()) for loss in self.losses])

    @staticmethod
    def mean(values: Sequence[float]) -> float:
        """The mean of the micro-batch losses, summed in float64 in micro-batch order. A
        data-parallel run (`zotune.distributed`) combines its ranks' micro-batch losses with
        this same function, so it gets the same bits as one process accumulating them."""
        total = 0.0
        for value in values:
            total += value
        return total / len(values)


def loss_value(value: float | torch.Tensor) -> float:
    """A closure's loss (a tensor or a number) as a float."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def evaluate(closure: Closure) -> float:
    """Call the closure (a forward pass with no backward) and return its loss as a finite float."""
    value = closure()
    loss = float(value.detach().float()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(loss):
        raise FloatingPointError(f"the closure returned a non-finite loss ({loss})")
    return loss


def two_sided(
    space: ParameterSpace, closure: Closure, seeds: Sequence[int], eps: float
) -> Estimate:
    """SPSA (MeZO): g_k = (L(θ + εz_k) - L(θ - εz_k)) / 2ε."""
    grads, losses, pending = [], [], None
    try:
        for s in seeds:
            space.transition(pending, Offset(s, eps))
            pending = Offset(s, eps)
            plus = evaluate(closure)
            space.transition(pending, Offset(s, -eps))
            pending = Offset(s, -eps)
            minus = evaluate(closure)
            grads.append((plus - minus) / (2 * eps))
            losses += [plus, minus]
    except BaseException:
        space.transition(pending, None)  # never leave the model perturbed
        raise
    return Estimate(list(seeds), grads, sum(losses) / len(losses), len(losses), pending, losses)


def one_sided(
    space: ParameterSpace, closure: Closure, seeds: Sequence[int], eps: float
) -> Estimate:
    """g_k = (L(θ + εz_k) - L(θ)) / ε, with L(θ) evaluated once and shared by the q queries."""
    pending = None
    base = evaluate(closure)
    grads, losses = [], [base]
    try:
        for s in seeds:
            space.transition(pending, Offset(s, eps))
            pending = Offset(s, eps)
            plus = evaluate(closure)
            grads.append((plus - base) / eps)
            losses.append(plus)
    except BaseException:
        space.transition(pending, None)
        raise
    return Estimate(list(seeds), grads, base, len(losses), pending, losses)


def combine(estimator: str, parts: Sequence[Estimate]) -> Estimate:
    """One estimate from the estimates of consecutive slices of a step's seeds, each made from
    the same θ (query parallelism: each rank evaluates its slice): the same numbers, summed in
    the same order, as one call of `estimator` with all the seeds. `pending` is left unset (each
    part left its own weights perturbed). One-sided parts each evaluated L(θ), counted once."""
    seeds = [s for part in parts for s in part.seeds]
    grads = [g for part in parts for g in part.grads]
    if estimator == "two-sided":
        losses = [v for part in parts for v in part.losses]
        return Estimate(seeds, grads, sum(losses) / len(losses), len(losses), None, losses)
    base = parts[0].losses[0]
    losses = [base, *(v for part in parts for v in part.losses[1:])]
    return Estimate(seeds, grads, base, len(losses), None, losses)


ESTIMATORS = {"two-sided": two_sided, "one-sided": one_sided}
