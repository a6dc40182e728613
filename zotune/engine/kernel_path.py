"""The kernel path: move a space's float32 CPU units through the C kernel (`native`).

A pass hands the kernel what all units share (a `native.Pass`: seeds and scales) and a table of
the units built once per space (`KernelTable`); threads take units from one counter, largest
first, and the kernel reads, replaces and frees each unit's record as it goes, with no Python
per unit. A pass that updates also writes each unit's update terms: an `Update`'s
`kernel(key)` gives them by name (`moves.KernelUpdate`), and units whose tensors agree share one
`native.Terms`.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import wait
from typing import TYPE_CHECKING

import torch

from . import native
from .directions import (
    Direction,
    Gaussian,
    LowRank,
    MagnitudeMask,
    Rademacher,
    RandomMask,
    derive_seed,
    seed_state,
)
from .native import UpdateMode

if TYPE_CHECKING:
    from .moves import KernelUpdate, Offset, Space, Update

_M64 = (1 << 64) - 1
_ZEROS = (0.0,) * 7  # unused rule constants of a zt_terms


class KernelPath:
    """The C kernel's side of a space: its records (what keeps each perturbed unit
    invertible, in kernel memory) and its table of units."""

    def __init__(self, space: Space, lib: ctypes.CDLL):
        self.space, self.lib = space, lib
        self.records = native.Records(len(space.units))
        self._table: KernelTable | None = None

    def moves(self) -> bool:
        """Whether the kernel moves the space's float32 CPU units: the direction is a law it
        draws, or a low-rank one over such a law (without a mask or a scale of z: the kernel
        forms a matrix's z from its factors, `LowRank.parts`), and the mask, if any, is one it
        computes (and not with a per-element scale of z, HiZOO's preconditioner, which takes
        no mask)."""
        mask, direction = self.space.mask, self.space.direction
        if isinstance(direction, LowRank):
            return mask is None and self.space.z_scale is None and law_of(direction) is not None
        if law_of(direction) is None:
            return False
        if mask is not None and self.space.z_scale is not None:
            return False
        return mask is None or isinstance(mask, (MagnitudeMask, RandomMask))

    def empty(self) -> bool:
        return self.records.empty()

    def invalidate(self) -> None:
        """Rebuild the table before the next pass (a tensor became row-lazy)."""
        self._table = None

    def set_aside(self) -> tuple:
        # (the table too: the tensors may be given other storage meanwhile)
        kept = (self.records, self._table)
        self.records, self._table = native.Records(len(self.space.units)), None
        return kept

    def take_back(self, kept: tuple) -> None:
        self.records, self._table = kept

    def table(self, at_rest: bool = False) -> KernelTable:
        """The kernel's table, built again if a tensor (or its H) was given new storage
        (`p.data = ...`, a state dict loaded), which is checked when the weights are at θ0: the
        only time user code may do that (MeZO-SVRG's anchor swaps storage while the
        perturbation is set aside)."""
        space, table = self.space, self._table
        if (
            table is None
            or table.mask is not space.mask  # (the table holds its thresholds)
            or table.mask_version != getattr(space.mask, "version", 0)
            or table.z_scale is not space.z_scale  # (it holds H's addresses)
            or (at_rest and (_ptrs(space.tensors) != table.ptrs or _hess(space) != table.hess))
        ):
            table = self._table = KernelTable(space)
        return table

    def jobs(
        self, current: Offset | None, target: Offset | None, update: Update | None
    ) -> tuple[list[int], float, list[tuple]]:
        """Split a pass's units into those the kernel moves (returned as unit numbers, largest
        first, with the elements of z they draw) and the rest, work items for the torch path:
        units not float32 on the CPU, or whose update has no kernel form. A pass without an
        update costs no Python per unit; one with an update writes each unit's terms into the
        table."""
        space = self.space
        table = self.table(at_rest=current is None)
        offsets = {o.seed for o in (current, target) if o is not None}
        work = space.torch_path.work
        table.seeds = set()
        if update is None:
            return (
                table.moving,
                len(offsets) * table.moving_n,
                work(table.other, current, target, update),
            )
        order, drawn, skipped = [], 0.0, []
        per_tensor: dict[int, tuple | None] = {}  # (terms, m, v, z draws with / without offsets)
        shared: dict[tuple, tuple] = {}  # per distinct set of arguments: its zt_terms, draws
        for k in table.every:
            index, lo, _ = space.units[k]
            if index not in per_tensor:
                found = update.kernel(space.keys[index])
                if found and space.z_scale is not None and found.terms.mode != UpdateMode.HESSIAN:
                    found = None  # (an estimate of z/√H: the kernel's terms are of z)
                per_tensor[index] = found and _terms(found, shared, offsets)
                if found:  # (the seeds a low-rank direction's factors are needed for)
                    table.seeds.update(seed for seed, _ in found.coeffs)
            found = per_tensor[index]
            if found is None:
                skipped.append(k)
                continue
            terms, m, v, draws, draws_lazy = found
            unit = table.table[k]
            unit.terms, unit.m, unit.v = terms, m and m + 4 * lo, v and v + 4 * lo
            drawn += (draws if unit.offsets else draws_lazy) * unit.n
            order.append(k)
        table.terms = list(shared.values())  # (their C structs: alive until the next update)
        return order, drawn, work(sorted(table.other + skipped), current, target, update)

    def run(
        self, order: list[int], current: Offset | None, target: Offset | None, update: bool
    ) -> None:
        """Run the kernel over units `order` on the space's threads (this one included), each
        taking the next unit as it finishes one, largest first. The kernel reads each unit's
        record, replaces it and frees the old one as it goes: a pass holds the old and new
        records of one unit per thread at a time."""
        space = self.space
        law, mask = law_of(space.direction), space.mask
        gaussian = isinstance(law, Gaussian)
        shared = native.Pass(
            law=native.Law.GAUSSIAN if gaussian else native.Law.RADEMACHER,
            cells=law.cells.data_ptr() if gaussian else None,
            has_cur=current is not None,
            cur_s=seed_state(current.seed) if current else 0,
            cur_scale=current.scale if current else 0.0,
            update=update,
            has_tgt=target is not None,
            tgt_s=seed_state(target.seed) if target else 0,
            tgt_scale=target.scale if target else 0.0,
            mask_kind=_mask_kind(mask),
            mask_s=seed_state(space.mask_seed),
            mask_limit=mask.limit if isinstance(mask, RandomMask) else 0,
        )
        table, lib, factors = self._table, self.lib, None
        if isinstance(space.direction, LowRank):
            offsets = {o.seed for o in (current, target) if o is not None}
            factors = table.set_factors(space, order, offsets | (table.seeds if update else set()))
        # the ctypes objects (and factors) travel with each call: alive while any thread may
        # use them
        counter, failed = ctypes.c_int64(0), ctypes.c_int64(0)
        args = (
            ctypes.byref(shared), table.table, self.records.table, table.array(order),
            len(order), ctypes.byref(counter), ctypes.byref(failed),
        )  # fmt: skip
        helpers = min(space.threads, len(order)) - 1
        team = native.team() if helpers else None
        if team:  # torch's OpenMP team: its idle workers are the helpers (native.team)
            lib.zt_run_team(team, helpers + 1, *args)
        else:
            futures = [space.pool().submit(lib.zt_run, *args) for _ in range(helpers)]
            try:
                lib.zt_run(*args)
            finally:
                wait(futures)  # no caller moves the weights again while a thread still does
            for f in futures:
                f.result()
        del factors  # (kept until here: the kernel reads them)
        if failed.value:
            raise MemoryError("out of memory while moving the weights: they are left perturbed")


def factors(direction: LowRank, key: int, seeds: set[int], alive: list) -> ctypes.Array:
    """Matrix `key`'s factors at each of `seeds` as a zt_factors array (the C kernel's low-rank
    law); the array and the tensors it points to are appended to `alive`, which the caller
    keeps until the kernel is done with them."""
    width, rank = direction.shapes[key][1], direction.rank_of(key)
    entries = []
    for seed in seeds:
        left, right_t = direction.parts(seed, key)
        alive += [left, right_t]
        entries.append(
            (derive_seed(seed, key) & _M64, left.data_ptr(), right_t.data_ptr(), width, rank)
        )
    found = (native.Factors * len(entries))(*entries)
    alive.append(found)
    return found


def law_of(direction: Direction) -> Gaussian | Rademacher | None:
    """The element-wise law the kernel draws for `direction` (a low-rank one's for its tensors
    that are not matrices), or None for one it does not draw."""
    law = direction.law if isinstance(direction, LowRank) else direction
    return law if isinstance(law, (Gaussian, Rademacher)) else None


def _mask_kind(mask: object) -> native.MaskKind:
    if mask is None:
        return native.MaskKind.NONE
    return native.MaskKind.MAGNITUDE if isinstance(mask, MagnitudeMask) else native.MaskKind.RANDOM


def _terms(found: KernelUpdate, shared: dict, offsets: set) -> tuple:
    """A tensor's kernel update as the address of a zt_terms (shared by the tensors whose
    arguments agree), its state buffers' addresses, and the passes of z its units draw: one per
    distinct seed among the offsets and update terms (without the offsets for a row-lazy
    table)."""
    terms = found.terms
    key = (found.coeffs, found.lr, found.weight_decay, terms.mode, terms.constants)
    if key not in shared:
        consts = terms.constants
        coeffs = (native.Coeff * len(found.coeffs))(
            *((seed_state(seed), c) for seed, c in found.coeffs)
        )
        c_terms = native.Terms(
            mode=terms.mode,
            upd_lr=found.lr,
            has_decay=bool(found.weight_decay),
            upd_decay=found.lr * found.weight_decay,
            h=(ctypes.c_double * 7)(*consts, *_ZEROS[len(consts) :]),
            coeffs=ctypes.addressof(coeffs),
            ncoeffs=len(found.coeffs),
        )
        seeds = {seed for seed, _ in found.coeffs}
        shared[key] = (c_terms, coeffs, len(seeds | offsets), len(seeds))
    c_terms, _, draws, draws_lazy = shared[key]
    m, v = terms.m, terms.v
    return (
        ctypes.addressof(c_terms),
        None if m is None else m.data_ptr(),
        None if v is None else v.data_ptr(),
        draws,
        draws_lazy,
    )


def _ptrs(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _hess(space: Space) -> list[int] | None:
    """The addresses of the space's H (its `z_scale`), one per tensor, or None."""
    if space.z_scale is None:
        return None
    return _ptrs([space.z_scale(i) for i in range(len(space.tensors))])


class KernelTable:
    """A space's units as the C kernel sees them (`native.Unit`), built once, with the orders
    a pass runs them in (largest first: the threads end close together)."""

    def __init__(self, space: Space):
        self.ptrs, self.hess = _ptrs(space.tensors), _hess(space)
        self.mask, self.z_scale = space.mask, space.z_scale
        self.mask_version = getattr(space.mask, "version", 0)
        units, mask = space.units, space.mask
        self.table = (native.Unit * len(units))()
        self.native = []  # per unit: float32 on the CPU
        for k, (index, lo, hi) in enumerate(units):
            t, key, unit = space.tensors[index], space.keys[index], self.table[k]
            unit.flat, unit.n, unit.start, unit.key = t.data_ptr() + 4 * lo, hi - lo, lo, key & _M64
            unit.offsets = index not in space.rows.lazy
            magnitude = isinstance(mask, MagnitudeMask)
            unit.mask_h = mask.thresholds[key] if magnitude else 0.0
            unit.mask_tie = mask.tie_limit(key) if magnitude else 0
            native_unit = t.dtype == torch.float32 and t.is_cpu
            if space.z_scale is not None:  # (z/√H: H must be float32 on the CPU too)
                h = space.z_scale(index)
                native_unit &= h.dtype == torch.float32 and h.is_cpu and h.is_contiguous()
                unit.hess = h.data_ptr() + 4 * lo
            self.native.append(native_unit)
        by_size = sorted(range(len(units)), key=lambda k: units[k][1] - units[k][2])
        self.every = [k for k in by_size if self.native[k]]  # a pass that updates
        self.moving = [k for k in self.every if self.table[k].offsets]  # one that does not
        self.moving_n = sum(self.table[k].n for k in self.moving)
        self.other = [k for k in range(len(units)) if not self.native[k]]  # the torch path's
        self._arrays: dict[tuple[int, ...], ctypes.Array] = {}
        self.terms: list[tuple] = []  # what the units' terms point to (zt_terms, zt_coeff[])
        self.seeds: set[int] = set()  # the seeds of the pass's update terms (`jobs`)
        self.units = units

    def set_factors(self, space: Space, order: list[int], seeds: set[int]) -> list:
        """Point each matrix unit of `order` at its tensor's factors for `seeds` (a low-rank
        direction's pass); the other units draw the law. Returns what the units point to (the
        zt_factors arrays and the factors' tensors), to be kept alive through the pass."""
        direction: LowRank = space.direction
        per_tensor: dict[int, ctypes.Array | None] = {}
        alive: list = []
        for k in order:
            index, unit = self.units[k][0], self.table[k]
            if index not in per_tensor:
                key = space.keys[index]
                per_tensor[index] = None
                if key in direction.shapes:
                    per_tensor[index] = factors(direction, key, seeds, alive)
            found = per_tensor[index]
            unit.factors = ctypes.addressof(found) if found is not None else None
            unit.nfactors = len(found) if found is not None else 0
        return alive

    def array(self, order: list[int]) -> ctypes.Array:
        """`order` as a C array (a space's passes use a few orders: each is made once)."""
        key = tuple(order)
        if key not in self._arrays:
            self._arrays[key] = (ctypes.c_int64 * len(order))(*order)
        return self._arrays[key]
