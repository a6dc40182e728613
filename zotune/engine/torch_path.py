"""The torch path: move units of a space with torch ops, block by block.

It covers what the C kernel does not: tensors that are not float32 on the CPU (bf16, fp16, a
GPU), custom masks, and updates without a kernel form (a rule without one). The
arithmetic is the kernel's, op for op, so the two agree bit for bit (tests check this). Each
unit is moved BLOCK elements at a time through per-thread float32 buffers: only one block of
z exists per thread (a whole unit per block on a GPU: `block_size`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable
from concurrent.futures import wait
from typing import TYPE_CHECKING

import torch

from . import fused, native
from .directions import MASK_SALT, RandomMask, derive_seed
from .moves import Block, inverse_sqrt

if TYPE_CHECKING:
    from .moves import Offset, Space, Update

# elements a torch-path update sees at once on the CPU: 1 MB per float32 buffer (a thread
# uses up to ~8), in L3; 4x fewer torch ops than L2-sized blocks of 2^16, which cost LOZO's and
# SubZero's passes about 30% more CPU time in Python and dispatch. z does not depend on it.
BLOCK = 1 << 18
UNIT = 1 << 20  # elements a worker takes per task: one C call, or BLOCK-sized torch steps
_CPU = torch.device("cpu")


def serial_ops() -> None:
    """Make the calling thread's torch ops run on it alone (no OpenMP team of its own): the
    space's worker threads each move their own units, and a torch op of a block's size started
    a team of as many threads as cores in every worker, which then contended for the cores
    (measured on LOZO's passes, MiniLM-L6, 2 cores: 1.55 s a step instead of 0.54). Sets only
    this thread's OpenMP thread count (torch's own setting is process-wide)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
        for path in paths:
            ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_set_num_threads(1)
    except (OSError, AttributeError):
        pass  # another OpenMP runtime, or none: torch's ops decide for themselves


def block_size(device: torch.device) -> int:
    """Elements per torch-path block: BLOCK on the CPU (caches); a whole unit on a GPU, where
    each block costs kernel launches and a host sync (counting its kept-aside values)."""
    return BLOCK if device.type == "cpu" else UNIT


class TorchPath:
    """Moves a space's units with torch ops; keeps the records of the units it perturbed
    unless the kernel will move them next (then they go to the kernel's records)."""

    def __init__(self, space: Space):
        self.space = space
        # per unit moved here, while perturbed: what keeps it invertible (space module doc)
        self.records: dict[tuple[int, int], tuple] = {}
        self._local = threading.local()

    def empty(self) -> bool:
        return not self.records

    def set_aside(self) -> dict:
        kept, self.records = self.records, {}
        return kept

    def take_back(self, kept: dict) -> None:
        self.records = kept

    def work(
        self, units: Iterable[int], current: Offset | None, target: Offset | None, update: object
    ) -> list[tuple]:
        """Units as work items (index, lo, hi, current, target); a row-lazy table's units are
        at θ0 through every pass, so they appear only for an update, with no offsets."""
        lazy, all_units = self.space.rows.lazy, self.space.units
        return [
            (i, lo, hi, current, target) if i not in lazy else (i, lo, hi, None, None)
            for i, lo, hi in (all_units[k] for k in units)
            if i not in lazy or update is not None
        ]

    def run(self, work: list[tuple], update: Update | None) -> float:
        """Move units, one task per thread, each a list of units of about equal total size (a
        task per unit cost more in pool overhead than a small tensor's move). Returns the
        elements of z drawn."""

        def run(lane: list[tuple]) -> float:
            return sum(self.move_unit(*w, update) * (w[2] - w[1]) for w in lane)

        threads = self.space.threads
        if threads == 1 or len(work) == 1:
            return run(work)
        lanes: list[list[tuple]] = [[] for _ in range(threads)]
        load = [0] * threads
        for w in sorted(work, key=lambda w: w[1] - w[2]):  # largest first
            k = load.index(min(load))
            lanes[k].append(w)
            load[k] += w[2] - w[1]
        futures = [self.space.pool().submit(run, lane) for lane in lanes]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            wait(futures)  # no caller moves the weights again while a lane still does
            raise

    @torch.no_grad()
    def move_unit(
        self,
        index: int,
        lo: int,
        hi: int,
        current: Offset | None,
        target: Offset | None,
        update: Update | None,
    ) -> float:
        """Move one unit block by block in torch ops (any dtype, device, mask or rule: what the
        C kernel does not cover). Returns the passes of z drawn, as a fraction of its elements."""
        tensor = self.space.tensors[index]
        kernel = self.space.kernel
        lib = (
            kernel.lib
            if kernel is not None and tensor.dtype == torch.float32 and tensor.is_cpu
            else None
        )
        kept = self._take_record(index, lo, hi) if current is not None else (None, None, None)
        flat = tensor.detach().view(-1)[lo:hi]
        inexact, aside, mask = kept
        used, out, draws = 0, [], 0.0
        size = block_size(tensor.device)
        # each block's share of the kept-aside values: the C decoder reads them in order and
        # says how many it read; torch ops need the count first (a popcount of the bits)
        ones = (
            None if inexact is None or lib is not None else _ones_per_block(inexact, hi - lo, size)
        )
        for j, start in enumerate(range(lo, hi, size)):
            n = min(size, hi - start)
            a, b = (start - lo) // 8, (start - lo + n + 7) // 8
            sub = (inexact[a:b] if inexact is not None else None, None, None)
            if sub[0] is not None and ones is None:
                sub = (sub[0], aside[used:], None)
            elif sub[0] is not None:
                k = ones[j]
                sub = (sub[0] if k else None, aside[used : used + k] if k else None, None)
                used += k
            if mask is not None:
                sub = (*sub[:2], mask[a:b])
            d, moved, read = self._move_block(
                flat[start - lo : start - lo + n], index, start, sub, current, target, update, lib
            )
            used += read
            draws += d * n
            out.append((moved, n))
        if target is not None:
            self._keep_record(index, lo, hi, _pad(_join(out)))
        return draws / max(hi - lo, 1)

    def _take_record(self, index: int, lo: int, hi: int) -> tuple:
        """A perturbed unit's record as tensors (inexact bits, kept-aside values, mask bits),
        from wherever it is kept; it is kept there no longer."""
        kernel, k = self.space.kernel, self.space.unit_at[(index, lo)]
        if kernel is not None and not kernel.records.empty_at(k):
            return kernel.records.take(k, hi - lo)
        return self.records.pop((index, lo), (None, None, None))

    def _keep_record(self, index: int, lo: int, hi: int, kept: tuple) -> None:
        """Keep a record where the next pass will look for it: in kernel memory when the
        kernel will move the unit."""
        space = self.space
        kernel, k = space.kernel, space.unit_at[(index, lo)]
        if kernel is not None and kernel.moves() and kernel.table().native[k]:
            random = isinstance(space.mask, RandomMask) and kept[2] is not None
            mask_key = derive_seed(space.mask_seed, space.keys[index], MASK_SALT) if random else 0
            kernel.records.store(k, hi - lo, kept, mask_key)
        else:
            self.records[(index, lo)] = kept

    def _move_block(
        self,
        flat: torch.Tensor,
        index: int,
        lo: int,
        kept: tuple,
        current: Offset | None,
        target: Offset | None,
        update: Update | None,
        lib: object,
    ) -> tuple[int, tuple | None, int]:
        """One block through the torch path (any dtype, device, mask or rule); returns the z
        passes drawn, what is kept aside for the block (None without a target) and how many
        kept-aside values the C decoder read (0 without it)."""
        n, read = flat.numel(), 0  # (aside values the C decoder read)
        # float32 on the CPU with nothing to keep: θ0 is decoded and updated in the weights
        # themselves (the C decoder may write where it reads), saving two copies of the block
        direct = lib is not None and target is None
        theta = flat if direct else self.buffer("theta", n, flat.device)
        block = Block(self.space, index, lo, theta)
        space = self.space
        fuse = (
            lib is None
            and space.mask is None
            and space.z_scale is None  # (the fused kernels draw plain z)
            and fused.enabled(flat.device)
            and fused.supports(space.direction)
        )
        if current is None:
            if not direct:
                theta.copy_(flat)
        elif fuse:  # z drawn inside one compiled kernel (fused.py)
            inexact, aside, _ = kept
            draw = fused.Draw(derive_seed(current.seed, block.key), space.direction, flat.device)
            theta = block.theta = fused.restore(flat, lo, draw, current.scale)
            block.draws += 1
            if aside is not None:
                theta[_unpack(inexact, n)] = aside
        else:
            inexact, aside, mask = kept
            z = block.raw_z(current.seed)
            if mask is not None:
                z = (
                    block.buffer("unmasked")
                    .copy_(z)
                    .masked_fill_(_unpack(mask, n).logical_not(), 0.0)
                )
            if self.space.z_scale is not None:  # (the H the perturbation was made with: same)
                h = self.space.z_scale(index).view(-1)[lo : lo + n]
                z = torch.mul(z, inverse_sqrt(h), out=block.buffer("scaled"))
            if lib is not None:
                read = lib.zt_decode(
                    native.ptr(flat), native.ptr(z), current.scale, native.ptr(block.theta),
                    native.bptr(inexact), None if aside is None else native.ptr(aside), n,
                )  # fmt: skip
            else:
                _round_(torch.sub(flat.float(), z * current.scale, out=block.theta), flat.dtype)
                if aside is not None:
                    block.theta[_unpack(inexact, n)] = aside
            theta = block.theta
        if update is not None:
            update.apply(block)
            _round_(theta, flat.dtype)
            block.theta_changed()
        if target is None:
            if not direct:
                flat.copy_(theta)
            return block.draws, None, read
        if fuse:
            draw = fused.Draw(derive_seed(target.seed, block.key), space.direction, flat.device)
            moved, flags = fused.perturb(theta, lo, draw, target.scale, flat.dtype)
            block.draws += 1
            aside = theta[flags] if bool(flags.any()) else None
            flat.copy_(moved)
            return block.draws, (_pack(flags) if aside is not None else None, aside, None), read
        z = block.z(target.seed)
        mask = block.mask()
        if lib is not None:
            scratch = self.scratch()
            bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
            count = lib.zt_encode(
                native.ptr(theta), native.ptr(z), target.scale, native.ptr(flat),
                native.bptr(bits), native.ptr(scratch), n,
            )  # fmt: skip
            aside = native.take(scratch, count) if count else None
            inexact = bits if count else None
        else:
            step = z * target.scale
            moved = _round_(theta + step, flat.dtype)
            flags = _round_(moved - step, flat.dtype) != theta
            aside = theta[flags] if bool(flags.any()) else None
            inexact = _pack(flags) if aside is not None else None
            flat.copy_(moved)
        return block.draws, (inexact, aside, _pack(mask) if mask is not None else None), read

    def scratch(self) -> torch.Tensor:
        return self.buffer("scratch", BLOCK, _CPU, BLOCK + native.PAD)

    def buffer(
        self, name: str, n: int, device: torch.device, size: int | None = None
    ) -> torch.Tensor:
        """Per-thread float32 buffers (of a block's elements by default), reused block after
        block (allocating fresh ones per block made glibc hold on to hundreds of MB)."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        key = (name, device)
        if key not in bufs:
            bufs[key] = torch.empty(size or block_size(device), dtype=torch.float32, device=device)
        return bufs[key][:n]


def _pad(kept: tuple) -> tuple:
    """The C kernel reads kept-aside values 8 at a time: give the array 8 floats of slack."""
    inexact, aside, mask = kept
    if aside is not None:
        aside = torch.cat([aside, aside.new_zeros(native.PAD)])
    return inexact, aside, mask


def _join(parts: list[tuple[tuple, int]]) -> tuple:
    """One unit's (inexact bits, aside values, mask bits) from its blocks' (in order)."""
    if len(parts) == 1:
        return parts[0][0]
    joined = []
    for j in range(3):
        if all(kept[j] is None for kept, _ in parts):
            joined.append(None)
            continue
        pieces = []
        device = next(kept[j].device for kept, _ in parts if kept[j] is not None)
        for kept, n in parts:
            if kept[j] is not None:
                pieces.append(kept[j])
            elif j != 1:  # bits: a block with nothing kept aside has all of them clear
                pieces.append(torch.zeros((n + 7) // 8, dtype=torch.uint8, device=device))
        joined.append(torch.cat(pieces))
    return tuple(joined)


def _round_(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 tensor to `dtype` and back, in place (identity for float32)."""
    if dtype != torch.float32:
        x.copy_(x.to(dtype))
    return x


_BITS = [1 << i for i in range(8)]
_ON: dict[tuple[str, torch.device], torch.Tensor] = {}  # small constant tables per device


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The bit values (uint8) or the popcount of each byte value (int64) on `device`."""
    found = _ON.get((name, device))
    if found is None:
        if name == "bits":
            found = torch.tensor(_BITS, dtype=torch.uint8)
        else:
            found = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64)
        found = _ON[(name, device)] = found.to(device)
    return found


def _pack(flags: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 vector of 1/8 the length."""
    pad = (-flags.numel()) % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    bits = _table("bits", flags.device)
    return (flags.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = _table("bits", packed.device)
    return (packed.unsqueeze(1) & bits).ne(0).view(-1)[:n]


def _ones_per_block(packed: torch.Tensor, n: int, size: int) -> list[int]:
    """The set bits among each `size` elements' bits of the first n (a unit's kept-aside
    values per block), in a few ops for the whole unit rather than an unpack per block."""
    ones = _table("popcount", packed.device)[packed.to(torch.int64)]
    if n % 8:  # (bits past n in the last byte are not the unit's)
        ones[-1] = bin(int(packed[-1]) & ((1 << n % 8) - 1)).count("1")
    ends = torch.arange(size // 8, (n + 7) // 8 + size // 8, size // 8, device=packed.device)
    total = ones.cumsum(0)[ends.clamp_(max=(n + 7) // 8) - 1].tolist()
    return [b - a for a, b in zip([0, *total[:-1]], total)]
