"""Embedding rows: perturb only the rows of a table that a forward pass reads.

An attached embedding table (`ZOOptimizer.attach`) stays at θ0 through a step's passes except for
the update; a forward pre-hook on the embedding calls `read` with the batch's token ids, which
moves just those rows to the current offset. Rows never read are never seen perturbed, so no
loss and no weight changes, bit for bit, and a step draws z over the whole table once (the
update) instead of three times. Rows move through the C kernel (`zt_move_rows`), in segments
split over the space's threads; a low-rank direction's rows (LOZO, SubZero) are its factors'
products, which the kernel forms from the factors it is handed (row i of z is L[i]·Rᵀ).
"""

from __future__ import annotations

import ctypes
from concurrent.futures import wait
from typing import TYPE_CHECKING, Any

import torch

from . import native
from .directions import MASK_SALT, Gaussian, LowRank, MagnitudeMask, RandomMask, derive_seed
from .kernel_path import factors, law_of

if TYPE_CHECKING:
    from .moves import Offset, Space


class EmbeddingRows:
    """The row-lazy tensors of a space and the rows of each that are off θ0."""

    def __init__(self, space: Space):
        self.space = space
        self.lazy: dict[int, int] = {}  # row-lazy tensors: index -> row width
        self.segments: dict[int, list[tuple[torch.Tensor, tuple]]] = {}  # their rows off θ0
        # per row-lazy tensor: the ids (and their version) whose rows are all at the offset, so
        # that a step's second forward, reading the same batch, costs no lookup of its rows
        self.covers: dict[int, tuple[torch.Tensor, int]] = {}

    def enable(self, index: int) -> bool:
        """Make tensor `index`, a [rows × width] table that the model reads only by row
        lookups, row-lazy. Returns False where this does not apply (no C kernel, not 2-D
        float32 on the CPU, a width that is not a multiple of 8, a custom mask, a scale of z, perturbed,
        a low-rank z whose rows are not the table's)."""
        space = self.space
        t = space.tensors[index]
        direction = space.direction
        lowrank = isinstance(direction, LowRank)
        ok = (
            space.kernel is not None
            and space.kernel.moves()  # (a law it draws, or low-rank factors over one)
            and t.dim() == 2
            and t.dtype == torch.float32
            and t.is_cpu
            and t.shape[1] % 8 == 0
            and (space.mask is None or isinstance(space.mask, (MagnitudeMask, RandomMask)))
            and (
                not lowrank
                or (
                    space.mask is None and direction.shapes.get(space.keys[index]) == tuple(t.shape)
                )
            )
            and space.z_scale is None
            and space.at is None
        )
        if ok:
            self.lazy[index] = t.shape[1]
            space.kernel.invalidate()  # its units now stay at θ0 through the passes
        return ok

    def empty(self) -> bool:
        return not self.segments

    def set_aside(self) -> dict:
        kept, self.segments, self.covers = self.segments, {}, {}
        return kept

    def take_back(self, kept: dict) -> None:
        self.segments, self.covers = kept, {}

    def before_pass(self, current: Offset | None, target: Offset | None, update: bool) -> None:
        """Rows a forward pass read go to the target, or back to θ0 (straight to the next offset
        when nothing updates θ0 meanwhile: the next forward reads the same batch; the update
        pass assumes every row at θ0)."""
        for index in self.lazy:
            segments = self.segments.pop(index, [])
            to = target if not update else None
            moved = self._move_segments(index, segments, current, to)
            if to is not None:
                self.segments[index] = moved
            else:
                self.covers.pop(index, None)

    def read(self, index: int, ids: torch.Tensor) -> None:
        """Bring rows `ids` of row-lazy tensor `index` to the current offset, before a lookup."""
        space = self.space
        if space.at is None or index not in self.lazy:
            return
        covered = self.covers.get(index)
        if covered is not None and covered[0] is ids and covered[1] == ids._version:
            return  # (the estimator's second forward: the same batch, its rows already moved)
        rows = torch.unique(ids.detach().reshape(-1).cpu()).to(torch.int64)
        if rows.numel() == 0 or rows[0] < 0 or rows[-1] >= space.tensors[index].shape[0]:
            return  # the lookup itself will reject out-of-range ids
        segments = self.segments.setdefault(index, [])
        for done, _ in segments:
            rows = rows[~torch.isin(rows, done)]
        if rows.numel():
            parts = rows.tensor_split(min(space.threads, max(1, rows.numel() // 64)))
            segments += self._move_segments(index, [(r, None) for r in parts], None, space.at)
        self.covers[index] = (ids, ids._version)

    def _move_segments(
        self, index: int, segments: list[tuple], current: Offset | None, target: Offset | None
    ) -> list[tuple]:
        """Move row segments (rows, kept), one zt_move_rows call each, split over the threads;
        returns the segments at the target (rows, what is kept aside for them)."""
        space = self.space
        # one z per row: the current offset's and the target's share a seed or one is None
        space.count_draws(sum(rows.numel() for rows, _ in segments) * self.lazy[index])
        calls = [self._call(index, rows, current, target, kept) for rows, kept in segments]
        lib, threads = space.kernel.lib, min(space.threads, len(calls))
        team = native.team() if threads > 1 else None
        if threads <= 1:
            counts = [lib.zt_move_rows(ctypes.byref(move)) for move, _ in calls]
        elif team:  # torch's OpenMP team, as the kernel path's passes (native.team)
            jobs = (native.RowMove * len(calls))(*(move for move, _ in calls))
            kept = (ctypes.c_int64 * len(calls))()
            lib.zt_rows_team(team, threads, jobs, kept, len(calls))
            counts = list(kept)
        else:
            moves = [ctypes.byref(move) for move, _ in calls]
            futures = [space.pool().submit(lib.zt_move_rows, m) for m in moves[1:]]
            try:
                first = lib.zt_move_rows(moves[0])
            finally:
                wait(futures)
            counts = [first, *(f.result() for f in futures)]
        return [
            (rows, _kept(count, target, *outputs))
            for (rows, _), count, (_, outputs) in zip(segments, counts, calls)
        ]

    def _call(
        self,
        index: int,
        rows: torch.Tensor,
        current: Offset | None,
        target: Offset | None,
        kept: tuple | None = None,
    ) -> tuple:
        """A zt_rows for moving some rows (no update), and the buffers it fills (alive until
        `_kept` reads them)."""
        space = self.space
        t, width, key = space.tensors[index], self.lazy[index], space.keys[index]
        mask = space.mask
        n = rows.numel() * width
        bits = scratch = mask_out = None
        if target is not None:
            bits = torch.empty(n // 8, dtype=torch.uint8)
            scratch = torch.empty(n + native.PAD, dtype=torch.float32)
            mask_out = torch.empty(n // 8, dtype=torch.uint8) if mask is not None else None
        bits_in, aside_in, mask_in = kept or (None, None, None)
        # a row's mask: from |θ0| (magnitude), its hash (random) or, on the way back, kept bits
        kinds = native.MaskKind
        if mask is None:
            kind = kinds.NONE
        elif mask_in is not None:
            kind = kinds.KEPT
        else:
            kind = kinds.MAGNITUDE if isinstance(mask, MagnitudeMask) else kinds.RANDOM
        # a magnitude mask's ties at |θ| = h are hashed under the random mask's key
        tie = mask.tie_limit(key) if kind == kinds.MAGNITUDE else 0
        hashed = kind == kinds.RANDOM or (kind == kinds.MAGNITUDE and tie < MagnitudeMask.ALL)
        law, direction = law_of(space.direction), space.direction
        gaussian, alive = isinstance(law, Gaussian), []
        lowrank = None  # (a low-rank z: the table's factors at the offsets' seeds)
        if isinstance(direction, LowRank):
            seeds = {o.seed for o in (current, target) if o is not None}
            lowrank = factors(direction, key, seeds, alive)
        move = native.RowMove(
            flat=t.data_ptr(),
            width=width,
            rows=rows.data_ptr(),
            nrows=rows.numel(),
            law=native.Law.GAUSSIAN if gaussian else native.Law.RADEMACHER,
            cells=native.ptr(law.cells) if gaussian else None,
            has_cur=current is not None,
            key_cur=derive_seed(current.seed, key) if current else 0,
            cur_scale=current.scale if current else 0.0,
            bits_in=native.bptr(bits_in),
            aside_in=native.bptr(aside_in),
            has_tgt=target is not None,
            key_tgt=derive_seed(target.seed, key) if target else 0,
            tgt_scale=target.scale if target else 0.0,
            bits_out=native.bptr(bits),
            aside_out=native.bptr(scratch),
            mask_kind=kind,
            mask_h=mask.thresholds[key] if kind == kinds.MAGNITUDE else 0.0,
            mask_in=native.bptr(mask_in),
            mask_out=native.bptr(mask_out),
            mask_key=derive_seed(space.mask_seed, key, MASK_SALT) if hashed else 0,
            mask_limit=mask.limit if kind == kinds.RANDOM else tie,
            factors=ctypes.addressof(lowrank) if lowrank is not None else None,
            nfactors=len(lowrank) if lowrank is not None else 0,
        )
        return move, (bits, scratch, mask_out, rows, kept, alive)


def _kept(
    count: int, target: Offset | None, bits: Any, scratch: Any, mask_out: Any, *alive: Any
) -> tuple | None:
    """What is kept aside for moved rows at the target (None without a target), from
    zt_move_rows's count and the buffers it filled."""
    if target is None:
        return None
    return (
        bits if count else None,
        native.take(scratch, count + native.PAD) if count else None,
        mask_out,
    )
