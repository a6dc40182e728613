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
import threading
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

    def draw_(self, out: torch.Tensor, seed: int, tensor: int, start: int) -> torch.Tensor:
        """Write z[start : start + len(out)] of tensor key `tensor`'s direction at step seed
        `seed` (what a `moves.Block` asks for); element-wise laws hash derive_seed(seed, key)."""
        return self.fill_(out, derive_seed(seed, tensor), start)


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
    each tensor. Per-tensor thresholds h_k are fixed once (at construction); the mask is
    recomputed from the current unperturbed θ0 at every use, so none is stored.

    Ties: where more entries sit at |θ| = h_k than the fraction needs (a LoRA B or a bias that
    starts at zero, a norm at one), the entries below h_k are kept and, of those at h_k, each is
    kept when a hash of its index under the step's mask key is below `ties[k]` (that share of
    them, ≈, fresh each step). A tensor tied at the start has no meaningful fixed threshold
    (a zero tensor's is 0: every entry would move at the first step and none ever again), so
    its threshold follows its weights: computed again from its current θ0 at the start of every
    step (`refresh`), keeping the fraction at every step. A large tensor can be tied by chance
    (MiniLM-L6's word embeddings at sparsity 0.8: 3 entries share its threshold value); it follows
    too, which moves its threshold only as far as the weights move it. The refresh selects
    within a narrow band around the last threshold (`kth_magnitude`): one pass over the tensor.
    """

    ALL = 1 << 32  # a tie limit keeping every entry at |θ| = h (no hash)

    def __init__(self, tensors: Sequence[torch.Tensor], keys: Sequence[int], sparsity: float):
        self.sparsity = sparsity
        self.thresholds: dict[int, float] = {}
        self.ties: dict[int, int] = {}  # tied tensors' limits (kept at |θ| = h: hash < limit)
        self.version = 0  # bumped when a threshold changes (the kernel's table holds them)
        for t, k in zip(tensors, keys):
            self._threshold(t, k)
        self.follow = set(self.ties)  # tied at the start: thresholded again every step

    def _threshold(self, t: torch.Tensor, k: int, near: float | None = None) -> None:
        keep = round((1 - self.sparsity) * t.numel())
        self.ties.pop(k, None)
        if keep <= 0:
            self.thresholds[k] = -1.0  # nothing kept
            return
        if keep >= t.numel():
            self.thresholds[k] = math.inf
            return
        h, below, at = kth_magnitude(t.detach().reshape(-1), keep, near)
        self.thresholds[k] = h
        if below + at > keep:  # more entries at h than needed: keep a hashed share of them
            self.ties[k] = round((keep - below) / at * 2**32)

    def tie_limit(self, key: int) -> int:
        """Entries at |θ| = h are kept when their hash is below this (`ALL`: every one)."""
        return self.ties.get(key, self.ALL)

    def refresh(self, tensors: Sequence[torch.Tensor], keys: Sequence[int]) -> None:
        """At θ0, at the start of a step: compute tied tensors' thresholds again from their
        current weights (a pure function of them: a replay or a resume computes the same)."""
        if not self.follow:
            return
        for t, k in zip(tensors, keys):
            if k in self.follow:  # near the last threshold: the weights moved by one step
                self._threshold(t, k, near=self.thresholds[k])
        self.version += 1

    def __call__(self, key: int, start: int, theta: torch.Tensor, seed: int) -> torch.Tensor:
        h = self.thresholds[key]
        keep = (theta <= h) & (theta >= -h)  # |θ| <= h without a float temporary
        limit = self.ties.get(key)
        if limit is not None:  # of the entries at |θ| = h, drop those hashed above the limit
            at = (theta == h) | (theta == -h)
            hashed = hash32(derive_seed(seed, key, MASK_SALT), start, theta.numel(), theta.device)
            keep &= ~(at & (hashed >= limit))
        return keep


def kth_magnitude(x: torch.Tensor, keep: int, near: float | None = None) -> tuple[float, int, int]:
    """(h, #{|x| < h}, #{|x| = h}) for h the keep-th smallest |x| (1-based), exactly as
    `kthvalue` over all of |x| finds it.

    Given `near`, a value h is expected close to (the last step's threshold: a ZO step moves the
    weights by little), the selection runs over the entries in a narrow band around it: one pass
    over x (the C kernel's, for a float32 CPU tensor) instead of a selection over all of it:
    5 ms against 499 ms on MiniLM-L6's 11.7M-entry embedding table, one thread
    (docs/PERFORMANCE.md). The band widens 16x while it misses h; the whole tensor is the last
    resort."""
    if near is not None and 0.0 < near < math.inf:
        width = near / 256
        while 0.0 < width < near:  # (a denormal near: width 0, the whole tensor)
            found = _band(x, near - width, near + width)
            if found is None:
                break  # too many entries in the band: select over them all
            below, band = found
            if below < keep <= below + band.numel():
                h = float(band.kthvalue(keep - below).values)
                return (
                    h,
                    below + int(torch.count_nonzero(band < h)),
                    int(torch.count_nonzero(band == h)),
                )
            width *= 16
    mags = x.abs().float()
    h = float(mags.kthvalue(keep).values)
    return h, int(torch.count_nonzero(mags < h)), int(torch.count_nonzero(mags == h))


def _band(x: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor] | None:
    """(#{|x| < lo}, the |x| in [lo, hi]) in float32, or None when the band holds more than a
    sixteenth of x (a selection over all of it is as cheap)."""
    cap = max(x.numel() // 16, 1)
    lib = _native.lib()
    if lib is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        x = x.contiguous()
        band, counts = torch.empty(cap, dtype=torch.float32), torch.zeros(2, dtype=torch.int64)
        lib.zt_magnitude_band(
            _native.ptr(x), x.numel(), lo, hi, _native.ptr(band), cap, _native.ptr(counts)
        )
        below, inside = int(counts[0]), int(counts[1])
        return None if inside > cap else (below, band[:inside])
    mags = x.abs().float()
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    inside = (mags >= lo32.to(mags.device)) & (mags <= hi32.to(mags.device))
    if int(torch.count_nonzero(inside)) > cap:
        return None
    return int(torch.count_nonzero(mags < lo32.to(mags.device))), mags[inside]


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


# -- Low-rank directions (LOZO, SubZero) ------------------------------------------------------
# z of a matrix is a product of thin factors, z = L·Rᵀ, drawn from seeds like any z: the factors'
# entries come from the element-wise law's counter hash, so every device draws the same factors,
# and the product is summed in a fixed order of float32 multiplies and adds (no matmul, whose
# rounding depends on the BLAS library), so every device computes the same z, bit for bit.

LEFT_SALT, RIGHT_SALT, CORE_SALT = 0x4C454654, 0x52494748, 0x434F5245  # the factors' hash keys


def matrix_shape(
    t: torch.Tensor, squeeze: bool = False, square: bool = False
) -> tuple[int, int] | None:
    """The (m, n) a low-rank direction gives tensor `t` when it is a matrix (`squeeze`: once its
    sizes of 1 are dropped), else None; `square`: the most nearly square m·n = numel instead."""
    dims = [d for d in t.shape if d != 1] if squeeze else list(t.shape)
    if len(dims) != 2:
        return None
    if not square:
        return dims[0], dims[1]
    numel = t.numel()
    m = max(i for i in range(1, math.isqrt(numel) + 1) if numel % i == 0)
    return m, numel // m


def outer_(
    out: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor, offset: int, tmp: torch.Tensor
) -> torch.Tensor:
    """Elements offset .. offset+len(out) of left · right_t, row-major (left: the rows the span
    touches, from the span's first row; right_t: r × n), into `out`: each is Σ_j left[i, j] ·
    right_t[j, c] summed for j = 0, 1, ... as separate float32 multiplies and adds, so any
    device and any split into spans gives the same bits. A span of whole rows is written in
    place in 2r − 1 ops; one that starts or ends inside a row is computed as the whole rows it
    touches and copied out (one op more). `tmp`: scratch of `outer_scratch(len(out), offset, n)`
    elements (len(out) for whole rows). On the CPU in float32 the C kernel sums them
    (`zt_outer`, the same operations in one pass; no scratch)."""
    r, n = right_t.shape
    lib = _native.lib()
    if (
        lib is not None
        and out.device.type == "cpu"
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (out, left, right_t))
        and left.shape[1] == r
    ):
        lib.zt_outer(_native.ptr(out), out.numel(), offset, _native.ptr(left),
                     _native.ptr(right_t), n, r)  # fmt: skip
        return out
    end = offset + out.numel()
    rows = -(-end // n)
    whole = offset == 0 and end == rows * n
    o = (out if whole else tmp[: rows * n]).view(rows, n)
    t = (tmp[: rows * n] if whole else tmp[rows * n : 2 * rows * n]).view(rows, n)
    lhs = left[:rows]
    torch.mul(lhs[:, 0:1], right_t[0], out=o)
    for j in range(1, r):
        o.add_(torch.mul(lhs[:, j : j + 1], right_t[j], out=t))
    if not whole:
        out.copy_(o.view(-1)[offset:end])
    return out


def outer_scratch(numel: int, offset: int, n: int) -> int:
    """The scratch `outer_` needs for a span of numel elements from `offset` in rows of n."""
    rows = -(-(offset + numel) // n)
    return numel if offset == 0 and offset + numel == rows * n else 2 * rows * n


def _orthonormal(gaussian: torch.Tensor) -> torch.Tensor:
    """Q of the QR of an m × r matrix, with R's diagonal made positive (so Q is unique), in
    float64 on the CPU whatever the device (float32 out)."""
    q, r = torch.linalg.qr(gaussian.double().cpu())
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(torch.float64)
    return (q * sign).float()


class LowRank(Direction):
    """z = L·Rᵀ of rank r for each matrix (tensors whose `shapes` are given), the element-wise
    `law` for the other tensors (biases, norms).

    - `orthonormal=False` (LOZO): L = U (m × r) drawn from the step seed, R = V (n × r) from
      the seed of the step it was last resampled at; entries from `law`, E[z zᵀ] = r·I.
    - `orthonormal=True` (SubZero): L = U·Z0·√(mn)/r, R = V, with U, V orthonormal (QR of
      m × r and n × r draws from the refresh seed) and the r × r core Z0 from the step seed.

    r = min(rank, m, n) per matrix. The optimizer binds each step seed to its refresh seed
    (`bind`) before the seed is used. What is kept between passes is a cache of the refreshed
    factors (V; SubZero: U and V: the memory the papers state) and of the step's L (m × r per
    matrix), rebuilt from their seeds when missing (replay, resume). The C kernel forms a
    matrix's z (and an attached embedding's rows of it) from the factors `parts` gives it, in
    `outer_`'s order: the same bits.
    """

    name = "low-rank"
    LEFT_SEEDS = 4  # at most this many step seeds' L are kept (the optimizer keeps its step's)

    def __init__(
        self,
        shapes: dict[int, tuple[int, int]],
        rank: int,
        law: str | Direction = "gaussian",
        orthonormal: bool = False,
    ):
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank}")
        self.shapes, self.rank, self.orthonormal = dict(shapes), int(rank), orthonormal
        self.law = make_direction(law)
        self.refresh_of: dict[int, int] = {}  # step seed -> the seed of its refreshed factors
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # step seed -> {(tensor, device): its whole L}, for the last LEFT_SEEDS seeds drawn
        self._lefts: dict[int, dict[tuple, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def rank_of(self, key: int) -> int:
        m, n = self.shapes[key]
        return min(self.rank, m, n)

    def bind(self, seed: int, refresh: int) -> None:
        """Step seed `seed` draws with the factors refreshed at seed `refresh`; factors of
        other refresh seeds are dropped from the cache."""
        with self._lock:
            if any(k[0] != refresh for k in self._kept):
                self._kept = {k: v for k, v in self._kept.items() if k[0] == refresh}
            if self.refresh_of.pop(seed, refresh) != refresh:
                self._lefts.pop(seed, None)  # (SubZero's L is drawn in the refreshed basis)
            self.refresh_of[seed] = refresh
            while len(self.refresh_of) > 256:  # (a step binds q seeds: keep the recent ones)
                del self.refresh_of[next(iter(self.refresh_of))]

    def keep_lefts(self, seeds: Sequence[int]) -> None:
        """Keep the L of these step seeds only (a new step's: the last step's are done)."""
        with self._lock:
            self._lefts = {s: v for s, v in self._lefts.items() if s in seeds}

    def fill_(self, out: torch.Tensor, key: int, start: int) -> torch.Tensor:
        raise TypeError("a low-rank direction is drawn per tensor and step seed: use draw_")

    def draw_(self, out: torch.Tensor, seed: int, tensor: int, start: int) -> torch.Tensor:
        if tensor not in self.shapes:
            return self.law.fill_(out, derive_seed(seed, tensor), start)
        n = self.shapes[tensor][1]
        row0, row1 = start // n, (start + out.numel() - 1) // n + 1
        left = self._whole_left(seed, tensor, out.device)[row0:row1]
        offset = start - row0 * n
        tmp = self._tmp(outer_scratch(out.numel(), offset, n), out.device)
        return outer_(out, left, self._right(seed, tensor, out.device), offset, tmp)

    def times_right_(
        self, out: torch.Tensor, left: torch.Tensor, seed: int, tensor: int, start: int
    ) -> torch.Tensor:
        """Elements start .. start+len(out) of left · Rᵀ for a given left factor (m × r: LOZO-M's
        momentum factor) and the right factor of step seed `seed`, summed as in `draw_`."""
        n = self.shapes[tensor][1]
        right = self._right(seed, tensor, out.device)
        tmp = self._tmp(outer_scratch(out.numel(), start % n, n), out.device)
        return outer_(out, left[start // n :], right, start % n, tmp)

    def factors(
        self, seed: int, tensor: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole factors (L, R) of matrix `tensor` at step seed `seed`: z = L·Rᵀ (copies,
        which the caller may change)."""
        device = torch.device(device)
        left = self._whole_left(seed, tensor, device).clone()
        return left, self._right(seed, tensor, device).T.clone()

    def parts(self, seed: int, tensor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """L (m × r) and Rᵀ (r × n) of matrix `tensor` at step seed `seed`, contiguous float32
        on the CPU, as kept (not copies: what the C kernel reads while it moves the matrix)."""
        cpu = torch.device("cpu")
        return self._whole_left(seed, tensor, cpu), self._right(seed, tensor, cpu)

    def _whole_left(self, seed: int, tensor: int, device: torch.device) -> torch.Tensor:
        """L (m × r) of step seed `seed`, drawn once for every block of a pass (LOZO: m·r
        numbers; SubZero: U·Z0 summed in order) and kept until the optimizer's next step
        (`keep_lefts`) and while the seed is among the last LEFT_SEEDS drawn: q · Σ m·r floats
        over the matrices for a step of q seeds (the released codes hold U alike)."""
        found = self._lefts.get(seed, {}).get((tensor, device))
        if found is not None:
            return found
        found = self._left(seed, tensor, 0, self.shapes[tensor][0], device)
        with self._lock:
            if seed not in self._lefts:
                self._lefts[seed] = {}
                while len(self._lefts) > self.LEFT_SEEDS:
                    del self._lefts[next(iter(self._lefts))]  # the oldest seed's
            self._lefts[seed][(tensor, device)] = found
        return found

    def _draw(self, n: int, key: int, start: int, device: torch.device) -> torch.Tensor:
        return self.law.fill_(torch.empty(n, device=device), key, start)

    def _left(self, seed: int, tensor: int, row0: int, row1: int, device: torch.device):
        """Rows row0 .. row1 of L."""
        r = self.rank_of(tensor)
        if not self.orthonormal:  # U's entry (i, j) is element i·r + j of its hash
            key = derive_seed(seed, tensor, LEFT_SALT)
            return self._draw((row1 - row0) * r, key, row0 * r, device).view(-1, r)
        m, n = self.shapes[tensor]
        u = self._kept_factors(self._refresh(seed), tensor, device)[1][row0:row1]
        core = self._draw(r * r, derive_seed(seed, tensor, CORE_SALT), 0, device).view(r, r)
        core.mul_(math.sqrt(m * n) / r)
        out = torch.empty(u.numel(), device=device)
        return outer_(out, u, core, 0, self._tmp(u.numel(), device)).view(-1, r)

    def right(self, refresh: int, tensor: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """R (n × r) of matrix `tensor` refreshed at seed `refresh` (LOZO-M projects its
        momentum from the old R to the new)."""
        return self._kept_factors(refresh, tensor, torch.device(device))[0].T

    def _right(self, seed: int, tensor: int, device: torch.device) -> torch.Tensor:
        """Rᵀ (r × n, contiguous) of step seed `seed`."""
        return self._kept_factors(self._refresh(seed), tensor, device)[0]

    def _refresh(self, seed: int) -> int:
        if seed not in self.refresh_of:
            raise KeyError(f"step seed {seed} was not bound to a refresh seed (LowRank.bind)")
        return self.refresh_of[seed]

    def _kept_factors(self, refresh: int, tensor: int, device: torch.device) -> tuple:
        """(Rᵀ, U or None) refreshed at seed `refresh`, from the cache or drawn."""
        key = (refresh, tensor, device)
        found = self._kept.get(key)
        if found is not None:
            return found
        (m, n), r = self.shapes[tensor], self.rank_of(tensor)
        right = self._draw(n * r, derive_seed(refresh, tensor, RIGHT_SALT), 0, device).view(n, r)
        u = None
        if self.orthonormal:
            right = _orthonormal(right).to(device)
            u = self._draw(m * r, derive_seed(refresh, tensor, LEFT_SALT), 0, device)
            u = _orthonormal(u.view(m, r)).to(device).contiguous()  # (QR: column-major)
        found = (right.T.contiguous(), u)
        with self._lock:
            self._kept[key] = found
        return found

    def _tmp(self, n: int, device: torch.device) -> torch.Tensor:
        """A per-thread float32 scratch of at least n elements."""
        bufs = self._local.__dict__.setdefault("tmp", {})
        buf = bufs.get(device)
        if buf is None or buf.numel() < n:
            buf = bufs[device] = torch.empty(max(n, 1 << 16), device=device)
        return buf[:n]
