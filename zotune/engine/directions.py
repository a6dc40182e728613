"""Random directions z: which law, which elements (masks), drawn from a seed; never stored.

Every trainable tensor has a stable integer key (its index in the optimizer's parameter list).
Element i of tensor k's direction at step seed s is a pure function of (s, k, i): a keyed 32-bit
hash of i (lowbias32 of k1·i + k0 mod 2^32, where the odd k1 and k0 come from derive_seed(s, k):
a different Weyl sequence per key, scrambled by one mixer round), turned into a number by the
direction law. Nothing depends on the order tensors are visited, on other tensors, on threads,
or on the device, so blocks are processed in any order, only one block of z exists at a time,
and a CPU run and a GPU run draw the same z. Laws, each with mean 0 and variance exactly 1 (so
E[z zᵀ] = I):

- `gaussian`: N(0, 1) through a 4096-cell equiprobable inverse-CDF table with linear
  interpolation inside each cell (tails cut at ±3.991; rescaled to unit variance; 4th moment
  2.9994);
- `rademacher`: ±1 from the hash's top bit.

A mask restricts z to some elements: `MagnitudeMask` (Sparse MeZO: small |θ0|) or `RandomMask`
(R-MeZO: a fresh hash per step). Moving the weights along z is `space.ParameterSpace`'s job.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence

import torch

from . import native as _native

MASK_SALT = 0x4D41534B  # random masks hash under derive_seed(step seed, key, MASK_SALT)
GENERATOR = "weyl-lowbias32-icdf4096/2"  # the law's version, saved with trajectories

_M64 = (1 << 64) - 1


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
        table, delta = self.on(out.device)
        u = hash32(key, start, out.numel(), out.device)
        cell = u >> 20
        frac = (u & 0xFFFFF).to(torch.float32).mul_(2.0**-20)
        return out.copy_(frac.mul_(delta[cell]).add_(table[cell]))

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's nodes and slopes on `device` (copied there once)."""
        if device not in self._on:
            self._on[device] = (self.table.to(device), self.delta.to(device))
        return self._on[device]


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
