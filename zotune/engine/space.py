"""The parameter space: where the weights are (θ0, or θ0 + c·z), and moving them in one pass.

The weights are always either at θ0 (their true value) or at θ0 + c·z for one (seed, c)
(`Offset`). `ParameterSpace.transition` moves them from one such point to another, optionally
changing θ0 on the way (an `Update`), in a single pass over the weights: this is the hot loop.

Moves are exactly invertible in any precision (fp32, fp16, bf16): undoing θ0 + c·z computes
(θ0 + c·z) - c·z, which gives θ0 back bit for bit except where rounding lost low bits (typically
elements much smaller than c·z). Those elements' θ0 (in the C kernel also those whose move by
-c·z would not invert, so that one record serves a step's θ0 + c·z and θ0 - c·z) are kept aside
while the weights are perturbed (one bit per element marks them, 1/32 of fp32 weights, plus
their values: a few percent of elements at ε = 1e-3), and put back on the way home. A mask, when
there is one, is kept as bits for the same span. Everything kept is freed when the weights
return to θ0. All arithmetic is plain IEEE mul/add in float32 (no fused multiply-add), so
results do not depend on vector widths, thread counts or which path computes them.

The space itself is the state machine; three paths move the weights:

- `kernel_path.KernelPath`: float32 CPU units through the C kernel (`native`), no Python per unit;
- `torch_path.TorchPath`: everything else (other dtypes and devices, custom masks, updates
  without a kernel form) as torch ops, block by block;
- `rows.EmbeddingRows`: an attached embedding table, only the rows a forward pass reads.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native
from .directions import Direction, Mask, make_direction
from .kernel_path import KernelPath
from .moves import Offset, Update, ZScale
from .rows import EmbeddingRows
from .torch_path import UNIT, TorchPath, serial_ops


class ParameterSpace:
    """The trainable tensors of an optimizer, their keys, the direction law and an optional mask."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        keys: Sequence[int] | None = None,
        direction: str | Direction = "gaussian",
        mask: Mask | None = None,
        threads: int | None = None,
    ):
        self.tensors = list(tensors)
        self.keys = list(range(len(self.tensors))) if keys is None else list(keys)
        if len(self.keys) != len(self.tensors):
            raise ValueError("one key per tensor")
        for t in self.tensors:
            if t.numel() >= 1 << 32:
                raise ValueError("tensors of 2^32 elements or more are not supported: split them")
            if not t.is_contiguous():
                raise ValueError("zotune perturbs tensors in place: they must be contiguous")
        self.direction = make_direction(direction)
        self._mask = mask
        self.mask_seed = 0  # set by the optimizer each step (random masks change per step)
        # z's per-element scale (moves.ZScale), or None; set at θ0 (HiZOO sets it at the start)
        self.z_scale: ZScale | None = None
        self.threads = threads or min(2, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.at: Offset | None = None  # where the weights sit now (set by every transition)
        self.regenerations = 0.0  # full passes of z drawn so far (the per-step cost docs state)
        self.units_moved = {"kernel": 0, "torch": 0}  # units each path has moved, for checks
        self._numel = max(sum(t.numel() for t in self.tensors), 1)  # (shapes never change)
        lib = native.lib()  # the C kernel, or None: resolved once per space
        self.kernel = KernelPath(self, lib) if lib is not None else None
        self.torch_path = TorchPath(self)
        self.rows = EmbeddingRows(self)

    @property
    def mask(self) -> Mask | None:
        """Which elements z perturbs (None: all). Set only at θ0: a perturbation is undone by
        the mask it was made with, which its record keeps."""
        return self._mask

    @mask.setter
    def mask(self, mask: Mask | None) -> None:
        if not self.at_rest():
            raise RuntimeError(
                "set a space's mask at θ0: the weights are perturbed by the current one"
            )
        self._mask = mask

    @functools.cached_property
    def units(self) -> list[tuple[int, int, int]]:
        """Work items (tensor index, lo, hi): what is kept aside is kept per unit."""
        return [
            (i, lo, min(lo + UNIT, t.numel()))
            for i, t in enumerate(self.tensors)
            for lo in range(0, t.numel(), UNIT)
        ]

    @functools.cached_property
    def unit_at(self) -> dict[tuple[int, int], int]:
        """Unit number by (tensor index, lo)."""
        return {(i, lo): k for k, (i, lo, _) in enumerate(self.units)}

    def transition(
        self, current: Offset | None, target: Offset | None, update: Update | None = None
    ) -> None:
        """Move the weights from θ0 + current to θ0' + target, where θ0' = update(θ0), in one pass."""
        if current is None and target is None and update is None:
            return
        self.rows.before_pass(current, target, update is not None)
        self.at = target
        kernel = self.kernel if self.kernel is not None and self.kernel.moves() else None
        try:
            if kernel is not None:
                order, drawn, rest = kernel.jobs(current, target, update)
            else:
                order, drawn, rest = (
                    [],
                    0.0,
                    self.torch_path.work(range(len(self.units)), current, target, update),
                )
        except BaseException:
            self.at = current  # nothing has moved
            raise
        if order:
            kernel.run(order, current, target, update is not None)
            self.units_moved["kernel"] += len(order)
        if rest:
            drawn += self.torch_path.run(rest, update)
            self.units_moved["torch"] += len(rest)
        self.count_draws(drawn)

    def count_draws(self, elements: float) -> None:
        """`regenerations` counts full passes of z over the space: draws weighted by size."""
        self.regenerations += elements / self._numel

    def pool(self) -> ThreadPoolExecutor:
        """The worker threads the paths share (as many as `threads`, this one not counted)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.threads, thread_name_prefix="zotune", initializer=serial_ops
            )
        return self._pool

    def set_aside(self) -> tuple:
        """Take what keeps the current perturbation invertible, leaving the space as if at θ0,
        so that the same tensors can hold other values meanwhile (MeZO-SVRG's anchor);
        `take_back` returns it before the perturbation is moved again."""
        kept = (
            self.at,
            self.torch_path.set_aside(),
            self.rows.set_aside(),
            self.kernel.set_aside() if self.kernel is not None else None,
        )
        self.at = None
        return kept

    @contextlib.contextmanager
    def holding(self, values: Sequence[torch.Tensor]) -> Iterator[None]:
        """Let the tensors hold `values` (same shapes and dtypes) inside the block, by swapping
        storage (no copy), with the current perturbation set aside meanwhile: MeZO-SVRG
        evaluates its anchor in the model's own tensors. The block must end at θ0 (of
        `values`); if it raises, the values are brought back to θ0 where possible."""
        kept = self.set_aside()
        self._swap(values)
        try:
            yield
        except BaseException:
            if self.at is not None:
                try:
                    self.transition(self.at, None)
                except BaseException:
                    pass  # (the error below is the one to report)
            self.set_aside()  # whatever a failed move left: the kept perturbation comes first
            raise
        finally:
            self._swap(values)
            if not self.at_rest():
                self.set_aside()
            self.take_back(kept)

    def _swap(self, values: Sequence[torch.Tensor]) -> None:
        for p, v in zip(self.tensors, values, strict=True):
            p.data, v.data = v.data, p.data

    def take_back(self, kept: tuple) -> None:
        if not self.at_rest():
            raise RuntimeError("take_back needs the space at rest")
        self.at, torch_kept, rows_kept, kernel_kept = kept
        self.torch_path.take_back(torch_kept)
        self.rows.take_back(rows_kept)
        if self.kernel is not None:
            self.kernel.take_back(kernel_kept)

    def at_rest(self) -> bool:
        """Whether the weights are at θ0 with nothing kept aside."""
        kernel_empty = self.kernel is None or self.kernel.empty()
        return self.at is None and self.torch_path.empty() and self.rows.empty() and kernel_empty

    def lazy_rows(self, index: int) -> bool:
        """Let tensor `index`, an embedding table read only by row lookups, be perturbed row by
        row (see `rows.EmbeddingRows.enable`). Returns whether that applies."""
        return self.rows.enable(index)

    def read_rows(self, index: int, ids: torch.Tensor) -> None:
        """Bring rows `ids` of row-lazy tensor `index` to the current offset, before a lookup."""
        self.rows.read(index, ids)
