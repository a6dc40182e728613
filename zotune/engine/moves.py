"""The seam of a move of the weights: where they sit (`Offset`), what an update sees (`Block`)
and must offer (`Update`, with its kernel form `KernelUpdate`/`KernelTerms`), and what the
paths may read of their space (`Space`).

Everything here is shared by the parameter space, its three paths (`kernel_path`,
`torch_path`, `rows`) and the update rules (`rules`), which all import it and nothing of each
other's: the paths sit below `space.py`, which builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .directions import Direction, Mask
from .native import UpdateMode

# A per-element preconditioner of z (HiZOO's diagonal Hessian estimate H): called with a tensor's
# index in the space, it returns that tensor's H (float32, as many elements, positive), and the
# offsets move by z/√H element-wise (`inverse_sqrt`). Read at every use, like a mask: H may
# change in an update (HiZOO's does), and the C kernel reads it in place (`zt_unit.hess`).
ZScale = Callable[[int], torch.Tensor]


def inverse_sqrt(h: torch.Tensor) -> torch.Tensor:
    """1/√h in float32, the square root correctly rounded (through float64: torch's float32
    CPU sqrt is not, in the last bit) as the C kernel's, then the reciprocal."""
    return h.double().sqrt_().float().reciprocal_()


@dataclass(frozen=True)
class Offset:
    """The weights sit at θ0 + scale·z(seed)."""

    seed: int
    scale: float


class Block:
    """One block of one tensor during a transition: θ0 as float32, and z for any seed on demand."""

    __slots__ = ("index", "key", "start", "theta", "draws", "_space", "_raw", "_z", "_mask")

    def __init__(self, space: Space, index: int, start: int, theta: torch.Tensor):
        self.index, self.key, self.start, self.theta = index, space.keys[index], start, theta
        self._space, self._raw, self._z, self._mask, self.draws = space, {}, {}, None, 0

    def raw_z(self, seed: int) -> torch.Tensor:
        """z for this block at `seed`, before any mask; cached within the block."""
        if seed not in self._raw:
            buf = self.buffer(f"z{len(self._raw)}")
            self._space.direction.draw_(buf, seed, self.key, self.start)
            self.draws += 1
            self._raw[seed] = buf
        return self._raw[seed]

    def z(self, seed: int) -> torch.Tensor:
        """z at `seed`, masked by the space's mask evaluated at the current θ0 and scaled by
        1/√H of the space's `z_scale` (both optional)."""
        m, scale = self.mask(), self._space.z_scale
        if m is None and scale is None:
            return self.raw_z(seed)
        if seed not in self._z:
            out = self.buffer(f"m{len(self._z)}").copy_(self.raw_z(seed))
            if m is not None:
                out.masked_fill_(m.logical_not(), 0.0)  # no float temporary
            if scale is not None:
                h = scale(self.index).view(-1)[self.start : self.start + out.numel()]
                out.mul_(inverse_sqrt(h))
            self._z[seed] = out
        return self._z[seed]

    def buffer(self, name: str) -> torch.Tensor:
        """A float32 scratch buffer of this block's size, reused by the thread's next blocks
        (allocating fresh ones per block made glibc hold on to hundreds of MB)."""
        return self._space.torch_path.buffer(name, self.theta.numel(), self.theta.device)

    def mask(self) -> torch.Tensor | None:
        if self._space.mask is None:
            return None
        if self._mask is None:
            self._mask = self._space.mask(self.key, self.start, self.theta, self._space.mask_seed)
        return self._mask

    def theta_changed(self) -> None:
        """θ0 was updated: masks and scales (and so the z they shape) follow it."""
        self._mask = None
        self._z.clear()


@dataclass(frozen=True)
class KernelTerms:
    """A rule's step for ĝ = c·z in the C kernel's terms: the kernel repeats the rule's torch
    arithmetic operation for operation in `mode` (tests check they agree bit for bit), reading
    the state buffers m, v and the mode's constants; `c` is the coefficient as the rule takes
    it (the official sign rule's is sign c)."""

    mode: UpdateMode
    c: float
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    constants: tuple[float, ...] = ()


@dataclass(frozen=True)
class KernelUpdate:
    """One tensor's update in the kernel's terms: ĝ = Σ_k c_k·z(seed_k) over `coeffs` (as the
    rule maps them), summed in order, and the rule's `terms` (mode, state, constants)."""

    coeffs: tuple[tuple[int, float], ...]
    lr: float
    weight_decay: float
    terms: KernelTerms


class Update(Protocol):
    """What a transition does to θ0 on its way (`rules.Update` is the optimizers' one)."""

    def apply(self, block: Block) -> None:
        """Rewrite block.theta (θ0, float32) in place; may read z for any seed (block.z)."""

    def kernel(self, key: int) -> KernelUpdate | None:
        """The same update of tensor `key` in the C kernel's terms, or None (torch ops only)."""


class Space(Protocol):
    """The parts of a `space.ParameterSpace` that its paths read."""

    tensors: list[torch.Tensor]
    keys: list[int]
    direction: Direction
    mask_seed: int
    z_scale: ZScale | None
    threads: int
    at: Offset | None
    kernel: Any  # kernel_path.KernelPath, or None without the C kernel
    torch_path: Any  # torch_path.TorchPath
    rows: Any  # rows.EmbeddingRows

    @property
    def mask(self) -> Mask | None: ...

    @property
    def units(self) -> list[tuple[int, int, int]]: ...

    @property
    def unit_at(self) -> dict[tuple[int, int], int]: ...

    def pool(self) -> ThreadPoolExecutor: ...

    def count_draws(self, elements: float) -> None: ...
