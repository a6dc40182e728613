"""The fused torch path: a block's draw of z and its move as one compiled kernel each.

The plain torch path (`torch_path`) draws z into a buffer with a dozen elementwise torch ops
(hash, table lookup, interpolation) and then moves the block with a few more: on a GPU each op
is a kernel launch and a pass over memory. Here `torch.compile` fuses the draw and the move into
one kernel per block and direction (Inductor emits Triton on CUDA and C++ on the CPU): `restore`
(θ0 = round(p − c·z)), `perturb` (p = round(θ0 + c·z), and the flags of the elements whose move
will not invert), each drawing z in registers, never storing it. Putting the kept-aside values
back, an update rule and masks stay plain torch ops between the kernels.

Same bits as the C kernel and the plain path (tests compare them): the arithmetic is the same
separate IEEE multiplies and adds. Two Inductor settings keep it so, both passed to
`torch.compile` here: `emulate_precision_casts` (keeps the round trips to bf16/fp16 that
rounding needs, which Inductor would otherwise elide inside a fused kernel, and turns off
Triton's FMA contraction, `enable_fp_fusion`), and the CPU compiler's `-ffp-contract=off`
(Inductor's default, checked here).

When: `ZOTUNE_FUSED=auto` (the default) fuses on CUDA only; `on` also on the CPU for tensors
the C kernel does not move (bf16, fp16); `off` never. Compiling costs seconds per dtype on first
use (a minute on a slow CPU); z does not depend on it.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .directions import Direction, Gaussian, Rademacher


def enabled(device: torch.device) -> bool:
    """Whether blocks on `device` take the fused path ($ZOTUNE_FUSED: auto, on, off)."""
    mode = os.environ.get("ZOTUNE_FUSED", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"ZOTUNE_FUSED={mode!r}: use auto, on or off")
    if mode == "off" or device.type not in ("cuda", "cpu"):
        return False
    return mode == "on" or device.type == "cuda"


def supports(direction: Direction) -> bool:
    """The fused kernels know the built-in laws only (a custom one runs the plain path)."""
    return type(direction) in (Gaussian, Rademacher)


def _z(i: torch.Tensor, k1: torch.Tensor, k0: torch.Tensor, law: str, table, delta):
    """z at counters i (int64) under key halves k1 (odd), k0: `directions.hash32` and the law,
    as tensor ops to be fused (k1·i mod 2^32 from k1's 16-bit halves: no overflow)."""
    high = ((i * (k1 >> 16)) & 0xFFFF) << 16
    x = (i * (k1 & 0xFFFF) + high + k0) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    u = x ^ (x >> 16)
    if law == "rademacher":
        return (u >> 31).to(torch.float32) * 2.0 - 1.0
    cell = u >> 20
    frac = (u & 0xFFFFF).to(torch.float32) * 2.0**-20
    return frac * delta[cell] + table[cell]


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)


def _restore(flat, start, k1, k0, scale, law: str, table, delta):
    """θ0 = round(p − c·z) in float32, z drawn in the kernel."""
    i = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) + start
    z = _z(i, k1, k0, law, table, delta)
    return _round(flat.to(torch.float32) - z * scale, flat.dtype)


def _perturb(theta, start, k1, k0, scale, law: str, table, delta, dtype: torch.dtype):
    """p = round(θ0 + c·z) (in `dtype`) and where round(p − c·z) != θ0 (kept aside)."""
    i = torch.arange(theta.numel(), device=theta.device, dtype=torch.int64) + start
    step = _z(i, k1, k0, law, table, delta) * scale
    moved = _round(theta + step, dtype)
    flags = _round(moved - step, dtype) != theta
    return moved.to(dtype), flags


# Inductor settings that keep the bits (module doc); dynamic shapes: a unit's last block is
# shorter, and every key and offset is a tensor argument, so nothing recompiles per step.
_OPTIONS = {"emulate_precision_casts": True}
# One compiled variant per law, dtype and kind of input (a view or not): up to 24 (Dynamo's
# default limit of 8 recompiles per function would fall back to eager, or fail with fullgraph).
_VARIANTS = 64


_EAGER = {"restore": _restore, "perturb": _perturb}
_failed: list[str] = []  # why compiling failed, once: the eager functions run from then on


@functools.cache
def _compiled(name: str):
    from torch._inductor import config

    if config.cpp.enable_floating_point_contract_flag != "off":
        raise RuntimeError(
            "zotune's fused path needs Inductor's -ffp-contract=off (unset "
            "TORCHINDUCTOR_CPP_ENABLE_FLOATING_POINT_CONTRACT_FLAG) or ZOTUNE_FUSED=off"
        )
    return torch.compile(_EAGER[name], dynamic=True, fullgraph=True, options=_OPTIONS)


def _call(name: str, *args):
    """The compiled kernel; if compiling fails (no Triton, no C++ compiler), a warning and the
    same function uncompiled: the same ops, so the same bits, only slower."""
    if not _failed:
        try:
            with torch._dynamo.config.patch(recompile_limit=_VARIANTS):
                return _compiled(name)(*args)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:
            if "ffp-contract" in str(err):
                raise
            _failed.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
            warnings.warn(
                f"zotune: the fused path could not compile ({_failed[0]}); running its "
                "kernels uncompiled (same bits). ZOTUNE_FUSED=off silences this.",
                stacklevel=3,
            )
    return _EAGER[name](*args)


class Draw:
    """What the fused kernels need to draw z for one (tensor key, direction) on a device."""

    __slots__ = ("law", "k1", "k0", "table", "delta")

    def __init__(self, key: int, direction: Direction, device: torch.device):
        self.law = direction.name
        self.k1 = torch.tensor((key & 0xFFFFFFFF) | 1, dtype=torch.int64, device=device)
        self.k0 = torch.tensor((key >> 32) & 0xFFFFFFFF, dtype=torch.int64, device=device)
        if isinstance(direction, Gaussian):
            self.table, self.delta = direction.on(device)
        else:  # unused by the rademacher law; any tensor keeps the signature one
            self.table = self.delta = self.k1


def restore(flat: torch.Tensor, start: int, draw: Draw, scale: float) -> torch.Tensor:
    """θ0 (float32) of a block at θ0 + scale·z, before its kept-aside values are put back."""
    return _call(
        "restore", flat, _scalar(start, flat), draw.k1, draw.k0, _scale(scale, flat),
        draw.law, draw.table, draw.delta,
    )  # fmt: skip


def perturb(
    theta: torch.Tensor, start: int, draw: Draw, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ0 + scale·z rounded to `dtype`, the bool flags of the elements it cannot undo)."""
    return _call(
        "perturb", theta, _scalar(start, theta), draw.k1, draw.k0, _scale(scale, theta),
        draw.law, draw.table, draw.delta, dtype,
    )  # fmt: skip


def _scalar(value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=like.device)


def _scale(value: float, like: torch.Tensor) -> torch.Tensor:
    # float32 like the plain path's z * scale (a Python float multiplies a float32 tensor
    # in float32 after rounding the scalar to float32)
    return torch.tensor(value, dtype=torch.float32, device=like.device)
