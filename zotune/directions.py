"""Random directions z: drawn from a seed, block by block, in place; never stored.

Every trainable tensor has a stable integer key (its index in the optimizer's parameter list).
Its direction is cut into fixed blocks of `BLOCK` elements, and block j of tensor k at step seed s
is drawn from its own generator seeded with `derive_seed(s, k, j)`. So z depends only on
(s, k), never on the order tensors are visited, on other tensors, or on threads: the blocks can
be processed in any order, and only one block of z exists at a time.

`ParameterSpace.transition` is the hot loop. The weights are always either at θ0 (their true
value) or at θ0 + c·z for one (seed, c) (`Offset`). A transition moves from one such point to
another, optionally changing θ0 on the way (the update), in a single pass over the weights.
Moves are exactly invertible in any precision (fp32, fp16, bf16): undoing θ0 + c·z computes
(θ0 + c·z) - c·z, which gives θ0 back bit for bit except where rounding lost low bits (typically
elements much smaller than c·z). Those elements' θ0 are kept aside while the weights are
perturbed (one bit per element marks them, 1/32 of fp32 weights, plus their values: a few
percent of elements at ε = 1e-3), and put back on the way home. A mask, when there is one, is
kept as bits for the same span. Everything kept is freed when the weights return to θ0. All
arithmetic is plain IEEE mul/add in float32 (no fused multiply-add), so results do not depend on
vector widths or thread counts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

BLOCK = 1 << 18  # elements per independently seeded block; part of what a trajectory replays

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one well-spread 63-bit seed (order matters, values may be any ints)."""
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (p & _M64))
    return h >> 1


class Direction:
    """How z is drawn: i.i.d. entries with mean 0 and variance 1, so E[z zᵀ] = I."""

    name = "direction"

    def sample_(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(Direction):
    """z ~ N(0, I), as in MeZO."""

    name = "gaussian"

    def sample_(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return out.normal_(generator=generator)


class Rademacher(Direction):
    """z uniform on {-1, +1}: cheaper to draw, and ε·z is exact in any precision."""

    name = "rademacher"

    def sample_(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out.uniform_(generator=generator)
        return out.lt_(0.5).mul_(-2.0).add_(1.0)


DIRECTIONS: dict[str, type[Direction]] = {"gaussian": Gaussian, "rademacher": Rademacher}


def make_direction(name: str | Direction) -> Direction:
    if isinstance(name, Direction):
        return name
    if name not in DIRECTIONS:
        raise ValueError(f"unknown direction '{name}': choose one of {', '.join(DIRECTIONS)}")
    return DIRECTIONS[name]()


# A mask restricts z to some coordinates. It is called with (tensor key, block start, the
# block's unperturbed values θ0 as float32) and returns a bool tensor of the same size, or None
# for "all". Masks are computed from θ0 alone and recomputed at every use: none is stored.
Mask = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


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
            buf = torch.empty_like(self.theta)
            gen = self._space._generator(buf.device)
            gen.manual_seed(derive_seed(seed, self.key, self.start // BLOCK))
            self._space.direction.sample_(buf, gen)
            self.draws += 1
            self._raw[seed] = buf
        return self._raw[seed]

    def z(self, seed: int) -> torch.Tensor:
        """z at `seed`, masked by the space's mask evaluated at the current θ0."""
        m = self.mask()
        if m is None:
            return self.raw_z(seed)
        if seed not in self._z:
            self._z[seed] = self.raw_z(seed) * m
        return self._z[seed]

    def mask(self) -> torch.Tensor | None:
        if self._space.mask is None:
            return None
        if self._mask is None:
            self._mask = self._space.mask(self.key, self.start, self.theta)
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
            if not t.is_contiguous():
                raise ValueError("zotune perturbs tensors in place: they must be contiguous")
        self.direction = make_direction(direction)
        self.mask = mask
        self.threads = threads or min(2, os.cpu_count() or 1)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._aside: dict[tuple[int, int], tuple] = {}  # per block, while perturbed (module doc)
        self.regenerations = 0.0  # full passes of z drawn so far (the per-step cost docs state)

    def _generator(self, device: torch.device) -> torch.Generator:
        gens = self._local.__dict__.setdefault("gens", {})
        if device not in gens:
            gens[device] = torch.Generator(device)
        return gens[device]

    def blocks(self) -> list[tuple[int, int, int]]:
        return [
            (i, lo, min(lo + BLOCK, t.numel()))
            for i, t in enumerate(self.tensors)
            for lo in range(0, t.numel(), BLOCK)
        ]

    def transition(
        self, current: Offset | None, target: Offset | None, update: Update | None = None
    ) -> None:
        """Move the weights from θ0 + current to θ0' + target, where θ0' = update(θ0), in one pass."""
        if current is None and target is None and update is None:
            return
        work = self.blocks()
        if self.threads > 1 and len(work) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune")
            draws = self._pool.map(lambda w: self._move_block(*w, current, target, update), work)
        else:
            draws = [self._move_block(*w, current, target, update) for w in work]
        self.regenerations += sum(draws) / max(len(work), 1)

    @torch.no_grad()
    def _move_block(
        self,
        index: int,
        lo: int,
        hi: int,
        current: Offset | None,
        target: Offset | None,
        update: Update | None,
    ) -> int:
        flat = self.tensors[index].detach().view(-1)[lo:hi]
        theta = flat.to(torch.float32, copy=True)
        block = Block(self, index, lo, theta)
        if current is not None:
            inexact, aside, mask = self._aside.pop((index, lo))
            z = block.raw_z(current.seed)
            if mask is not None:
                z = z * _unpack(mask, theta.numel())
            _round_(theta.sub_(z * current.scale), flat.dtype)
            if aside is not None:
                theta[_unpack(inexact, theta.numel())] = aside
        if update is not None:
            update(block)
            _round_(theta, flat.dtype)
            block.theta_changed()
        if target is None:
            flat.copy_(theta)
            return block.draws
        step = block.z(target.seed) * target.scale
        moved = _round_(theta + step, flat.dtype)
        inexact = _round_(moved - step, flat.dtype) != theta
        aside = theta[inexact] if bool(inexact.any()) else None
        mask = block.mask()
        self._aside[(index, lo)] = (
            _pack(inexact) if aside is not None else None,
            aside,
            _pack(mask) if mask is not None else None,
        )
        flat.copy_(moved)
        return block.draws


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
