"""Random directions z: drawn from a seed, in place, block by block; never stored.

Every trainable tensor has a stable integer key (its index in the optimizer's parameter list).
Element i of tensor k's direction at step seed s is a pure function of (s, k, i): a keyed 32-bit
hash of i (lowbias32 of k1·i + k0 mod 2^32, where the odd k1 and k0 come from derive_seed(s, k):
a different Weyl sequence per key, scrambled by one mixer round), turned into a
number by the direction law. Nothing depends on the
order tensors are visited, on other tensors, on threads, or on the device, so blocks are
processed in any order, only one block of z exists at a time, and a CPU run and a GPU run draw
the same z. Laws, each with mean 0 and variance exactly 1 (so E[z zᵀ] = I):

- `gaussian`: N(0, 1) through a 4096-cell equiprobable inverse-CDF table with linear
  interpolation inside each cell (tails cut at ±3.9; rescaled to unit variance);
- `rademacher`: ±1 from the hash's top bit.

`ParameterSpace.transition` is the hot loop. The weights are always either at θ0 (their true
value) or at θ0 + c·z for one (seed, c) (`Offset`). A transition moves from one such point to
another, optionally changing θ0 on the way (the update), in a single pass over the weights.
Moves are exactly invertible in any precision (fp32, fp16, bf16): undoing θ0 + c·z computes
(θ0 + c·z) - c·z, which gives θ0 back bit for bit except where rounding lost low bits (typically
elements much smaller than c·z). Those elements' θ0 (in the C kernel also those whose move by
-c·z would not invert, so that one record serves a step's θ0 + c·z and θ0 - c·z) are kept
aside while the weights are perturbed (one bit per element marks them, 1/32 of fp32 weights,
plus their values: a few percent of elements at ε = 1e-3), and put back on the way home. A
mask, when there is one, is kept as bits for the same span. Everything kept is freed when the weights return to θ0. All
arithmetic is plain IEEE mul/add in float32 (no fused multiply-add), so results do not depend on
vector widths, thread counts or whether the C kernel (`_native.py`) or torch computes them.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import statistics
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from . import native as _native

BLOCK = 1 << 16  # elements a torch-path update sees at once (fits in L2); z does not depend on it
UNIT = 1 << 20  # elements a worker takes per task: one C call, or BLOCK-sized torch steps
PAD = _native.PAD  # slack after kept-aside values: the C kernel moves them 8 at a time
_ZEROS = (0.0,) * 7  # unused rule constants of a zt_terms
MASK_SALT = 0x4D41534B  # random masks hash under derive_seed(step seed, key, MASK_SALT)
GENERATOR = "weyl-lowbias32-icdf4096/2"  # the law's version, saved with trajectories

_M64 = (1 << 64) - 1
_CPU = torch.device("cpu")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=1 << 14)  # a step asks for the same (seed, key) in each pass
def derive_seed(*parts: int) -> int:
    """Mix integers into one well-spread 63-bit seed (order matters, values may be any ints)."""
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (p & _M64))
    return h >> 1


def seed_state(seed: int) -> int:
    """derive_seed's state after its first part: derive_seed(seed, k) is
    splitmix64(seed_state(seed) ^ k) >> 1, which the C kernel finishes per tensor key."""
    return _splitmix64(0x5EED ^ (seed & _M64))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (low 32 bits kept after each multiply)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hash32(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit hash of elements start .. start+n-1 under `key`, as int64 values in [0, 2^32):
    lowbias32(k1·i + k0 mod 2^32), k1 = the key's low half made odd, k0 its high half (torch
    code; the C kernel, `csrc/zotune.c`, computes the same)."""
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    k1, k0 = (key & 0xFFFFFFFF) | 1, (key >> 32) & 0xFFFFFFFF
    # k1·i mod 2^32 from k1's two 16-bit halves: no product reaches 2^63
    high = ((i * (k1 >> 16)) & 0xFFFF) << 16
    return _mix32((i * (k1 & 0xFFFF) + high + k0) & 0xFFFFFFFF)


def _normal_table(cells: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes of a piecewise-linear inverse CDF of N(0, 1) over equiprobable cells, symmetric,
    with the tail cells' means matching the normal's, rescaled to variance exactly 1."""
    nd = statistics.NormalDist()
    half = [nd.inv_cdf(j / cells) for j in range(1, cells // 2)]
    a = -half[0]
    tail_mean = math.exp(-a * a / 2) / math.sqrt(2 * math.pi) / (1 - nd.cdf(a))
    lower = [-(2 * tail_mean - a)] + half
    nodes = lower + [0.0] + [-v for v in reversed(lower)]
    var = sum(u * u + u * v + v * v for u, v in zip(nodes, nodes[1:])) / (3 * cells)
    table = torch.tensor(nodes, dtype=torch.float64).div_(math.sqrt(var)).float()
    return table, table[1:] - table[:-1]


class Direction:
    """How z is drawn: i.i.d. entries with mean 0 and variance 1, so E[z zᵀ] = I."""

    name = "direction"

    def fill_(self, out: torch.Tensor, key: int, start: int) -> torch.Tensor:
        """Write z[start : start + len(out)] of the direction whose hash key is `key`."""
        raise NotImplementedError


class Gaussian(Direction):
    """z ~ N(0, I) (MeZO), through the inverse-CDF table (module doc)."""

    name = "gaussian"

    def __init__(self) -> None:
        self.table, self.delta = _normal_table()
        # the C kernel reads a cell's node and slope with one load: interleave them
        self.cells = torch.stack([self.table[:-1], self.delta], 1).contiguous().view(-1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def fill_(self, out: torch.Tensor, key: int, start: int) -> torch.Tensor:
        lib = _native.lib()
        if lib is not None and out.device.type == "cpu":
            lib.zt_fill_normal(
                _native.ptr(out),
                out.numel(),
                key,
                start,
                _native.ptr(self.cells),
            )
            return out
        if out.device not in self._on:
            self._on[out.device] = (self.table.to(out.device), self.delta.to(out.device))
        table, delta = self._on[out.device]
        u = hash32(key, start, out.numel(), out.device)
        cell = u >> 20
        frac = (u & 0xFFFFF).to(torch.float32).mul_(2.0**-20)
        return out.copy_(frac.mul_(delta[cell]).add_(table[cell]))


class Rademacher(Direction):
    """z uniform on {-1, +1}: cheaper, and ε·z is exact in any precision."""

    name = "rademacher"

    def fill_(self, out: torch.Tensor, key: int, start: int) -> torch.Tensor:
        lib = _native.lib()
        if lib is not None and out.device.type == "cpu":
            lib.zt_fill_sign(_native.ptr(out), out.numel(), key, start)
            return out
        bit = hash32(key, start, out.numel(), out.device) >> 31
        return out.copy_(bit.to(torch.float32).mul_(2.0).sub_(1.0))


DIRECTIONS: dict[str, type[Direction]] = {"gaussian": Gaussian, "rademacher": Rademacher}


def make_direction(name: str | Direction) -> Direction:
    if isinstance(name, Direction):
        return name
    if name not in DIRECTIONS:
        raise ValueError(f"unknown direction '{name}': choose one of {', '.join(DIRECTIONS)}")
    return DIRECTIONS[name]()


# A mask restricts z to some coordinates. It is called with (tensor key, block start, the
# block's unperturbed values θ0 as float32, the space's mask seed) and returns a bool tensor of
# the same size, or None for "all". It is recomputed from θ0 at every use: none is stored.
Mask = Callable[[int, int, torch.Tensor, int], "torch.Tensor | None"]


@dataclass(frozen=True)
class Offset:
    """The weights sit at θ0 + scale·z(seed)."""

    seed: int
    scale: float


class Block:
    """One block of one tensor during a transition: θ0 as float32, and z for any seed on demand."""

    __slots__ = ("index", "key", "start", "theta", "draws", "_space", "_raw", "_z", "_mask")

    def __init__(self, space: ParameterSpace, index: int, start: int, theta: torch.Tensor):
        self.index, self.key, self.start, self.theta = index, space.keys[index], start, theta
        self._space, self._raw, self._z, self._mask, self.draws = space, {}, {}, None, 0

    def raw_z(self, seed: int) -> torch.Tensor:
        """z for this block at `seed`, before any mask; cached within the block."""
        if seed not in self._raw:
            buf = self.buffer(f"z{len(self._raw)}")
            self._space.direction.fill_(buf, derive_seed(seed, self.key), self.start)
            self.draws += 1
            self._raw[seed] = buf
        return self._raw[seed]

    def z(self, seed: int) -> torch.Tensor:
        """z at `seed`, masked by the space's mask evaluated at the current θ0."""
        m = self.mask()
        if m is None:
            return self.raw_z(seed)
        if seed not in self._z:
            masked = self.buffer(f"m{len(self._z)}").copy_(self.raw_z(seed))
            self._z[seed] = masked.masked_fill_(m.logical_not(), 0.0)  # no float temporary
        return self._z[seed]

    def buffer(self, name: str) -> torch.Tensor:
        """A float32 scratch buffer of this block's size, reused by the thread's next blocks
        (allocating fresh ones per block made glibc hold on to hundreds of MB)."""
        return self._space._buffer(name, self.theta.numel(), self.theta.device)

    def mask(self) -> torch.Tensor | None:
        if self._space.mask is None:
            return None
        if self._mask is None:
            self._mask = self._space.mask(self.key, self.start, self.theta, self._space.mask_seed)
        return self._mask

    def theta_changed(self) -> None:
        """θ0 was updated: masks (and so masked z) follow it."""
        self._mask = None
        self._z.clear()


# An update rewrites block.theta (θ0) in place; it may read z for any seeds via block.z(seed).
Update = Callable[[Block], None]


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
        self.threads = threads or min(2, os.cpu_count() or 1)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        # per unit the torch path moves, while perturbed: what keeps it invertible (module doc)
        self._aside: dict[tuple[int, int], tuple] = {}
        self.regenerations = 0.0  # full passes of z drawn so far (the per-step cost docs state)
        self._numel = max(sum(t.numel() for t in self.tensors), 1)  # (shapes never change)
        self.at: Offset | None = None  # where the weights sit now (set by every transition)
        self._lazy: dict[int, int] = {}  # row-lazy tensors: index -> row width (`lazy_rows`)
        self._rows: dict[int, list[tuple[torch.Tensor, tuple]]] = {}  # their rows off θ0
        # per row-lazy tensor: the ids (and their version) whose rows are all at the offset, so
        # that a step's second forward, reading the same batch, costs no lookup of its rows
        self._covers: dict[int, tuple[torch.Tensor, int]] = {}
        self._lib = _native.lib()  # the C kernel, or None: resolved once per space
        # while perturbed, a unit the kernel moves keeps its record in kernel memory, here
        # (the torch path's units keep theirs in _aside)
        self._records = _native.Records(len(self.units)) if self._lib else None
        self._kernel: _KernelTable | None = None  # the units as the kernel sees them

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

    def transition(
        self, current: Offset | None, target: Offset | None, update: Update | None = None
    ) -> None:
        """Move the weights from θ0 + current to θ0' + target, where θ0' = update(θ0), in one pass."""
        if current is None and target is None and update is None:
            return
        for index in self._lazy:  # rows a forward pass read: to the target, or back to θ0
            # (straight to the next offset when nothing updates θ0 meanwhile: the next forward
            # reads the same batch; the update pass assumes every row at θ0)
            segments = self._rows.pop(index, [])
            to = target if update is None else None
            moved = self._move_row_segments(index, segments, current, to)
            if to is not None:
                self._rows[index] = moved
            else:
                self._covers.pop(index, None)
        self.at = target
        try:
            order, drawn, rest = self._native_jobs(current, target, update)
        except BaseException:
            self.at = current  # nothing has moved
            raise
        if order:
            self._run_jobs(order, current, target, update is not None)
        if rest:
            drawn += self._run_torch(rest, update)
        self._count_draws(drawn)

    def _run_torch(self, work: list[tuple], update: Update | None) -> float:
        """Move units through the torch path, one task per thread, each a list of units of
        about equal total size (a task per unit cost more in pool overhead than a small
        tensor's move). Returns the elements of z drawn."""

        def run(lane: list[tuple]) -> float:
            return sum(self._move_torch(*w, update) * (w[2] - w[1]) for w in lane)

        if self.threads == 1 or len(work) == 1:
            return run(work)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune")
        lanes: list[list[tuple]] = [[] for _ in range(self.threads)]
        load = [0] * self.threads
        for w in sorted(work, key=lambda w: w[1] - w[2]):  # largest first
            k = load.index(min(load))
            lanes[k].append(w)
            load[k] += w[2] - w[1]
        futures = [self._pool.submit(run, lane) for lane in lanes]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            wait(futures)  # no caller moves the weights again while a lane still does
            raise

    def _count_draws(self, elements: float) -> None:
        """`regenerations` counts full passes of z over the space: draws weighted by size."""
        self.regenerations += elements / self._numel

    def set_aside(self) -> tuple:
        """Take what keeps the current perturbation invertible, leaving the space as if at θ0,
        so that the same tensors can hold other values meanwhile (MeZO-SVRG's anchor);
        `take_back` returns it before the perturbation is moved again."""
        # (the kernel's table too: the tensors may be given other storage meanwhile)
        kept = (self.at, self._aside, self._rows, self._records, self._kernel)
        self.at, self._aside, self._rows, self._kernel, self._covers = None, {}, {}, None, {}
        if self._records is not None:
            self._records = _native.Records(len(self.units))
        return kept

    def take_back(self, kept: tuple) -> None:
        if not self.at_rest():
            raise RuntimeError("take_back needs the space at rest")
        self.at, self._aside, self._rows, self._records, self._kernel = kept
        self._covers = {}

    def at_rest(self) -> bool:
        """Whether the weights are at θ0 with nothing kept aside."""
        native = self._records is None or self._records.empty()
        return self.at is None and not self._aside and not self._rows and native

    def lazy_rows(self, index: int) -> bool:
        """Let tensor `index`, a [rows × width] table that the model reads only by row lookups
        (an embedding), be perturbed row by row: a transition leaves it at θ0 except for the
        update, and `read_rows` perturbs the rows a forward pass is about to read. Rows never
        read are never seen perturbed, so no loss and no weight changes, bit for bit; a step
        then draws z for the whole table once (the update) instead of three times. Returns
        False where this does not apply (no C kernel, not 2-D float32 on the CPU, a width that
        is not a multiple of 8, a custom mask)."""
        t = self.tensors[index]
        ok = (
            self._lib is not None
            and t.dim() == 2
            and t.dtype == torch.float32
            and t.is_cpu
            and t.shape[1] % 8 == 0
            and (self.mask is None or isinstance(self.mask, (MagnitudeMask, RandomMask)))
            and self.at is None
        )
        if ok:
            self._lazy[index] = t.shape[1]
            self._kernel = None  # its units now stay at θ0 through the passes
        return ok

    def read_rows(self, index: int, ids: torch.Tensor) -> None:
        """Bring rows `ids` of row-lazy tensor `index` to the current offset, before a lookup."""
        if self.at is None or index not in self._lazy:
            return
        covered = self._covers.get(index)
        if covered is not None and covered[0] is ids and covered[1] == ids._version:
            return  # (the estimator's second forward: the same batch, its rows already moved)
        rows = torch.unique(ids.detach().reshape(-1).cpu()).to(torch.int64)
        if rows.numel() == 0 or rows[0] < 0 or rows[-1] >= self.tensors[index].shape[0]:
            return  # the lookup itself will reject out-of-range ids
        segments = self._rows.setdefault(index, [])
        for done, _ in segments:
            rows = rows[~torch.isin(rows, done)]
        if rows.numel():
            parts = rows.tensor_split(min(self.threads, max(1, rows.numel() // 64)))
            segments += self._move_row_segments(index, [(r, None) for r in parts], None, self.at)
        self._covers[index] = (ids, ids._version)

    def _move_row_segments(
        self, index: int, segments: list[tuple], current: Offset | None, target: Offset | None
    ) -> list[tuple]:
        """Move row segments (rows, kept) of a row-lazy tensor, one per thread at a time;
        returns the segments at the target (rows, what is kept aside for them)."""

        def move(segment: tuple) -> tuple:
            rows, kept = segment
            return rows, self._move_rows(index, rows, current, target, kept)

        # one z per row: the current offset's and the target's share a seed or one is None
        self._count_draws(sum(rows.numel() for rows, _ in segments) * self._lazy[index])
        if self.threads == 1 or len(segments) < 2:
            return [move(sg) for sg in segments]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune")
        futures = [self._pool.submit(move, sg) for sg in segments[1:]]
        try:
            first = move(segments[0])
        finally:
            wait(futures)
        return [first, *(f.result() for f in futures)]

    def _move_rows(
        self,
        index: int,
        rows: torch.Tensor,
        current: Offset | None,
        target: Offset | None,
        kept: tuple | None = None,
    ) -> tuple | None:
        """Move some rows of a row-lazy tensor (no update): one C call. Returns what is kept
        aside for them at the target (None without a target)."""
        lib, t, width, key = self._lib, self.tensors[index], self._lazy[index], self.keys[index]
        n = rows.numel() * width
        bits = scratch = mask_out = None
        masked = self.mask is not None
        if target is not None:
            bits = torch.empty(n // 8, dtype=torch.uint8)
            scratch = torch.empty(n + PAD, dtype=torch.float32)
            mask_out = torch.empty(n // 8, dtype=torch.uint8) if masked else None
        bits_in, aside_in, mask_in = kept or (None, None, None)
        # a row's mask: from |θ0| (magnitude), its hash (random) or, on the way back, kept bits
        magnitude, kinds = isinstance(self.mask, MagnitudeMask), _native.MaskKind
        kind = (
            kinds.NONE
            if not masked
            else kinds.KEPT
            if mask_in is not None
            else kinds.MAGNITUDE
            if magnitude
            else kinds.RANDOM
        )
        gaussian = isinstance(self.direction, Gaussian)
        move = _native.RowMove(
            flat=t.data_ptr(),
            width=width,
            rows=rows.data_ptr(),
            nrows=rows.numel(),
            law=_native.Law.GAUSSIAN if gaussian else _native.Law.RADEMACHER,
            cells=_native.ptr(self.direction.cells) if gaussian else None,
            has_cur=current is not None,
            key_cur=derive_seed(current.seed, key) if current else 0,
            cur_scale=current.scale if current else 0.0,
            bits_in=_native.bptr(bits_in),
            aside_in=_native.bptr(aside_in),
            has_tgt=target is not None,
            key_tgt=derive_seed(target.seed, key) if target else 0,
            tgt_scale=target.scale if target else 0.0,
            bits_out=_native.bptr(bits),
            aside_out=_native.bptr(scratch),
            mask_kind=kind,
            mask_h=self.mask.thresholds[key] if kind == kinds.MAGNITUDE else 0.0,
            mask_in=_native.bptr(mask_in),
            mask_out=_native.bptr(mask_out),
            mask_key=derive_seed(self.mask_seed, key, MASK_SALT) if kind == kinds.RANDOM else 0,
            mask_limit=self.mask.limit if kind == kinds.RANDOM else 0,
        )
        count = lib.zt_move_rows(ctypes.byref(move))
        if target is None:
            return None
        return (
            bits if count else None,
            _native.take(scratch, count + PAD) if count else None,
            mask_out,
        )

    @torch.no_grad()
    def _move_torch(
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
        tensor = self.tensors[index]
        lib = self._lib if tensor.dtype == torch.float32 and tensor.is_cpu else None
        kept = self._take_record(index, lo, hi) if current is not None else (None, None, None)
        flat = tensor.detach().view(-1)[lo:hi]
        inexact, aside, mask = kept
        used, out, draws = 0, [], 0.0
        for start in range(lo, hi, BLOCK):
            n = min(BLOCK, hi - start)
            a, b = (start - lo) // 8, (start - lo + n + 7) // 8
            sub = (inexact[a:b] if inexact is not None else None, None, None)
            if sub[0] is not None:
                k = int(_unpack(sub[0], n).sum())
                sub = (sub[0] if k else None, aside[used : used + k] if k else None, None)
                used += k
            if mask is not None:
                sub = (*sub[:2], mask[a:b])
            d, moved = self._move_block(
                flat[start - lo : start - lo + n], index, start, sub, current, target, update, lib
            )
            draws += d * n
            out.append((moved, n))
        if target is not None:
            self._keep_record(index, lo, hi, _pad(_join(out)))
        return draws / max(hi - lo, 1)

    def _take_record(self, index: int, lo: int, hi: int) -> tuple:
        """A perturbed unit's record as tensors (inexact bits, kept-aside values, mask bits),
        from wherever it is kept; it is kept there no longer."""
        k = self._unit_at[(index, lo)]
        if self._records is not None and not self._records.empty_at(k):
            return self._records.take(k, hi - lo)
        return self._aside.pop((index, lo), (None, None, None))

    def _keep_record(self, index: int, lo: int, hi: int, kept: tuple) -> None:
        """Keep a torch-path record where the next pass will look for it: in kernel memory
        when the kernel will move the unit."""
        k = self._unit_at[(index, lo)]
        if self._kernel_moves() and self._kernel_table().native[k]:
            random = isinstance(self.mask, RandomMask) and kept[2] is not None
            mask_key = derive_seed(self.mask_seed, self.keys[index], MASK_SALT) if random else 0
            self._records.store(k, hi - lo, kept, mask_key)
        else:
            self._aside[(index, lo)] = kept

    @functools.cached_property
    def _unit_at(self) -> dict[tuple[int, int], int]:
        return {(i, lo): k for k, (i, lo, _) in enumerate(self.units)}

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
    ) -> tuple[int, tuple | None]:
        """One block through the torch path (any dtype, device, mask or rule); returns the z
        passes drawn and what is kept aside for the block (None without a target)."""
        n = flat.numel()
        theta = self._buffer("theta", n, flat.device)
        block = Block(self, index, lo, theta)
        if current is None:
            theta.copy_(flat)
        else:
            inexact, aside, mask = kept
            z = block.raw_z(current.seed)
            if mask is not None:
                z = (
                    block.buffer("unmasked")
                    .copy_(z)
                    .masked_fill_(_unpack(mask, n).logical_not(), 0.0)
                )
            if lib is not None:
                lib.zt_decode(
                    _native.ptr(flat), _native.ptr(z), current.scale, _native.ptr(block.theta),
                    _native.bptr(inexact), None if aside is None else _native.ptr(aside), n,
                )  # fmt: skip
            else:
                _round_(torch.sub(flat.float(), z * current.scale, out=block.theta), flat.dtype)
                if aside is not None:
                    block.theta[_unpack(inexact, n)] = aside
            theta = block.theta
        if update is not None:
            update(block)
            _round_(theta, flat.dtype)
            block.theta_changed()
        if target is None:
            flat.copy_(theta)
            return block.draws, None
        z = block.z(target.seed)
        mask = block.mask()
        if lib is not None:
            scratch = self._scratch()
            bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
            count = lib.zt_encode(
                _native.ptr(theta), _native.ptr(z), target.scale, _native.ptr(flat),
                _native.bptr(bits), _native.ptr(scratch), n,
            )  # fmt: skip
            aside = _native.take(scratch, count) if count else None
            inexact = bits if count else None
        else:
            step = z * target.scale
            moved = _round_(theta + step, flat.dtype)
            flags = _round_(moved - step, flat.dtype) != theta
            aside = theta[flags] if bool(flags.any()) else None
            inexact = _pack(flags) if aside is not None else None
            flat.copy_(moved)
        return block.draws, (inexact, aside, _pack(mask) if mask is not None else None)

    def _kernel_moves(self) -> bool:
        """Whether the C kernel moves this space's float32 CPU units (the kernel is loaded and
        the mask, if any, is one it computes)."""
        mask = self.mask
        return self._lib is not None and (
            mask is None or isinstance(mask, (MagnitudeMask, RandomMask))
        )

    def _kernel_table(self, at_rest: bool = False) -> _KernelTable:
        """The kernel's table, built again if a tensor was given new storage (`p.data = ...`),
        which is checked when the weights are at θ0: the only time user code may do that
        (MeZO-SVRG's anchor swaps storage while the perturbation is set aside: `set_aside`)."""
        kernel = self._kernel
        if (
            kernel is None
            or kernel.mask is not self.mask  # (the table holds its thresholds)
            or (at_rest and [t.data_ptr() for t in self.tensors] != kernel.ptrs)
        ):
            kernel = self._kernel = _KernelTable(self)
        return kernel

    def _native_jobs(
        self, current: Offset | None, target: Offset | None, update: Update | None
    ) -> tuple[list[int], float, list[tuple]]:
        """Split a pass's units into those the C kernel moves (returned as unit numbers,
        largest first, with the elements of z they draw) and the rest, work items for the torch
        path: units not float32 on the CPU, a custom mask, an update of three or more terms or
        without a kernel form. The kernel's arithmetic is the torch path's, op for op. A pass
        without an update costs no Python per unit; one with an update writes each unit's
        update terms into the kernel's table."""
        lazy = self._lazy

        def work(ks: Sequence[int]) -> list[tuple]:
            return [
                (i, lo, hi, current, target) if i not in lazy else (i, lo, hi, None, None)
                for i, lo, hi in (self.units[k] for k in ks)
                if i not in lazy or update is not None  # the rest of a lazy table: update only
            ]

        if not self._kernel_moves():
            return [], 0.0, work(range(len(self.units)))
        kernel = self._kernel_table(at_rest=current is None)
        offsets = {o.seed for o in (current, target) if o is not None}
        if update is None:
            return kernel.moving, len(offsets) * kernel.moving_n, work(kernel.other)
        fused = getattr(update, "fused", None)
        order, drawn, skipped = [], 0.0, []
        per_tensor: dict[int, tuple | None] = {}  # (terms, m, v, z draws with / without offsets)
        shared: dict[tuple, tuple] = {}  # per distinct set of arguments: its zt_terms, draws
        for k in kernel.every:
            index, lo, _ = self.units[k]
            if index not in per_tensor:
                args = fused(self.keys[index]) if fused is not None else None
                per_tensor[index] = args and self._terms(args, shared, offsets)
            found = per_tensor[index]
            if found is None:
                skipped.append(k)
                continue
            terms, m, v, draws, draws_lazy = found
            unit = kernel.table[k]
            unit.terms, unit.m, unit.v = terms, m and m + 4 * lo, v and v + 4 * lo
            drawn += (draws if unit.offsets else draws_lazy) * unit.n
            order.append(k)
        kernel.terms = [terms for terms, _, _ in shared.values()]  # alive until the next update
        return order, drawn, work(sorted(kernel.other + skipped))

    @staticmethod
    def _terms(args: tuple, shared: dict, offsets: set) -> tuple:
        """A tensor's update arguments (`update.fused(key)`) as the address of a zt_terms
        (shared by the tensors whose arguments agree), its state buffers' addresses, and the
        passes of z its units draw: one per distinct seed among the offsets and update terms
        (without the offsets for a row-lazy table)."""
        seed, lr, wd, mode, c, m, v, consts, seed2, c2 = args
        key = (seed, lr, wd, mode, c, consts, seed2, c2)
        if key not in shared:
            terms = _native.Terms(
                mode=mode,
                upd_s=seed_state(seed),
                upd_c=c,
                upd_lr=lr,
                has_decay=bool(wd),
                upd_decay=lr * wd,
                h=(ctypes.c_double * 7)(*consts, *_ZEROS[len(consts) :]),
                has_upd2=seed2 is not None,
                upd2_s=seed_state(seed2) if seed2 is not None else 0,
                upd_c2=c2,
            )
            seeds = {seed} | ({seed2} - {None})
            shared[key] = (terms, len(seeds | offsets), len(seeds))
        terms, draws, draws_lazy = shared[key]
        return (
            ctypes.addressof(terms),
            None if m is None else m.data_ptr(),
            None if v is None else v.data_ptr(),
            draws,
            draws_lazy,
        )

    def _run_jobs(
        self, order: list[int], current: Offset | None, target: Offset | None, update: bool
    ) -> None:
        """Run the kernel over units `order` on `threads` threads (this one included), each
        taking the next unit as it finishes one, largest first. The kernel reads each unit's
        record, replaces it and frees the old one as it goes: no Python per unit, and a pass
        holds the old and new records of one unit per thread at a time."""
        gaussian, mask = isinstance(self.direction, Gaussian), self.mask
        shared = _native.Pass(
            law=_native.Law.GAUSSIAN if gaussian else _native.Law.RADEMACHER,
            cells=self.direction.cells.data_ptr() if gaussian else None,
            has_cur=current is not None,
            cur_s=seed_state(current.seed) if current else 0,
            cur_scale=current.scale if current else 0.0,
            update=update,
            has_tgt=target is not None,
            tgt_s=seed_state(target.seed) if target else 0,
            tgt_scale=target.scale if target else 0.0,
            mask_kind=_native.MaskKind.NONE
            if mask is None
            else _native.MaskKind.MAGNITUDE
            if isinstance(mask, MagnitudeMask)
            else _native.MaskKind.RANDOM,
            mask_s=seed_state(self.mask_seed),
            mask_limit=mask.limit if isinstance(mask, RandomMask) else 0,
        )
        kernel, lib = self._kernel, self._lib
        # the ctypes objects travel with each call: alive while any thread may use them
        counter, failed = ctypes.c_int64(0), ctypes.c_int64(0)
        args = (
            ctypes.byref(shared), kernel.table, self._records.table, kernel.array(order),
            len(order), ctypes.byref(counter), ctypes.byref(failed),
        )  # fmt: skip
        helpers = min(self.threads, len(order)) - 1
        if helpers and self._pool is None:  # (as many as threads: the torch path uses them all)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune")
        futures = [self._pool.submit(lib.zt_run, *args) for _ in range(helpers)]
        try:
            lib.zt_run(*args)
        finally:
            wait(futures)  # no caller moves the weights again while a thread still does
        for f in futures:
            f.result()
        if failed.value:
            raise MemoryError("out of memory while moving the weights: they are left perturbed")

    def _scratch(self) -> torch.Tensor:
        return self._buffer("scratch", BLOCK, _CPU, BLOCK + PAD)

    def _buffer(self, name: str, n: int, device: torch.device, size: int = BLOCK) -> torch.Tensor:
        """Per-thread float32 buffers (of BLOCK elements by default), reused block after block."""
        bufs = self._local.__dict__.setdefault("buffers", {})
        key = (name, device)
        if key not in bufs:
            bufs[key] = torch.empty(size, dtype=torch.float32, device=device)
        return bufs[key][:n]


class _KernelTable:
    """A space's units as the C kernel sees them (`_native.Unit`), built once, with the orders
    a pass runs them in (largest first: the threads end close together)."""

    def __init__(self, space: ParameterSpace):
        self.ptrs = [t.data_ptr() for t in space.tensors]
        self.mask = space.mask
        units, mask = space.units, space.mask
        self.table = (_native.Unit * len(units))()
        self.native = []  # per unit: float32 on the CPU
        for k, (index, lo, hi) in enumerate(units):
            t, key, unit = space.tensors[index], space.keys[index], self.table[k]
            unit.flat, unit.n, unit.start, unit.key = t.data_ptr() + 4 * lo, hi - lo, lo, key & _M64
            unit.offsets = index not in space._lazy
            unit.mask_h = mask.thresholds[key] if isinstance(mask, MagnitudeMask) else 0.0
            self.native.append(t.dtype == torch.float32 and t.is_cpu)
        by_size = sorted(range(len(units)), key=lambda k: units[k][1] - units[k][2])
        self.every = [k for k in by_size if self.native[k]]  # a pass that updates
        self.moving = [k for k in self.every if self.table[k].offsets]  # one that does not
        self.moving_n = sum(self.table[k].n for k in self.moving)
        self.other = [k for k in range(len(units)) if not self.native[k]]  # the torch path's
        self._arrays: dict[tuple[int, ...], ctypes.Array] = {}
        self.terms: list[_native.Terms] = []  # what the units' terms point to

    def array(self, order: list[int]) -> ctypes.Array:
        """`order` as a C array (a space's passes use a few orders: each is made once)."""
        key = tuple(order)
        if key not in self._arrays:
            self._arrays[key] = (ctypes.c_int64 * len(order))(*order)
        return self._arrays[key]


def _pad(kept: tuple) -> tuple:
    """The C kernel reads kept-aside values 8 at a time: give the array 8 floats of slack."""
    inexact, aside, mask = kept
    if aside is not None:
        aside = torch.cat([aside, aside.new_zeros(PAD)])
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
        fill = torch.zeros if j != 1 else torch.empty
        pieces = []
        for kept, n in parts:
            if kept[j] is not None:
                pieces.append(kept[j])
            elif j != 1:
                pieces.append(fill((n + 7) // 8, dtype=torch.uint8))
        joined.append(torch.cat(pieces))
    return tuple(joined)


def _round_(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 tensor to `dtype` and back, in place (identity for float32)."""
    if dtype != torch.float32:
        x.copy_(x.to(dtype))
    return x


_BITS = [1 << i for i in range(8)]


def _pack(flags: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 vector of 1/8 the length."""
    pad = (-flags.numel()) % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=flags.device)
    return (flags.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(1) & bits).ne(0).view(-1)[:n]


class MagnitudeMask:
    """Sparse MeZO's mask: perturb only the (1 - sparsity) fraction of smallest-|θ| entries of
    each tensor. Per-tensor thresholds h_k are fixed once (at construction); the mask |θ0| <= h_k
    is recomputed from the current unperturbed θ0 at every use, so none is stored."""

    def __init__(self, tensors: Sequence[torch.Tensor], keys: Sequence[int], sparsity: float):
        self.thresholds: dict[int, float] = {}
        for t, k in zip(tensors, keys):
            keep = round((1 - sparsity) * t.numel())
            if keep <= 0:
                self.thresholds[k] = -1.0  # nothing kept
            elif keep >= t.numel():
                self.thresholds[k] = math.inf
            else:
                mags = t.detach().reshape(-1).abs().float()
                self.thresholds[k] = float(mags.kthvalue(keep).values)

    def __call__(self, key: int, start: int, theta: torch.Tensor, seed: int) -> torch.Tensor:
        h = self.thresholds[key]
        return (theta <= h) & (theta >= -h)  # |θ| <= h without a float temporary


class RandomMask:
    """A random mask drawn afresh from each step's seed (R-MeZO; ZO-Bench's random sparse
    perturbation): entry i of tensor k is kept when hash(derive_seed(s, k, MASK), i) <
    round((1 - sparsity) · 2^32), so each entry independently with probability 1 - sparsity
    (ZO-Bench's code masks Φ(s) of them instead of s). Per element, like z: any block, row or
    order of visiting gives the same mask."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity
        # kept: hashes below this (at most 2^32 - 1: the kernel compares in 32 bits)
        self.limit = min(round((1 - sparsity) * 2**32), 2**32 - 1)

    def __call__(self, key: int, start: int, theta: torch.Tensor, seed: int) -> torch.Tensor:
        return hash32(derive_seed(seed, key, MASK_SALT), start, theta.numel(), theta.device) < (
            self.limit
        )
