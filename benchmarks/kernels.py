"""Per-element cost of the engine's kernels on one 65,536-element block (single thread).

    python benchmarks/kernels.py

Prints nanoseconds per element for drawing z, perturb + exactness check, undo, and the float32
copy of θ0: the pieces of one pass of a ZO step (docs/PERFORMANCE.md, "Where the remaining time goes").
"""

from __future__ import annotations

import time

import torch

from zotune.engine import native as _native
from zotune.engine.directions import Gaussian, Rademacher
from zotune.engine.torch_path import BLOCK


def per_element_ns(fn, n: int, reps: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps / n * 1e9


def main() -> None:
    torch.set_num_threads(1)
    lib = _native.lib()
    n = BLOCK
    z, theta, out, scratch = torch.empty(n), torch.randn(n) * 0.02, torch.empty(n), torch.empty(n)
    bits = torch.empty(n // 8, dtype=torch.uint8)
    g, r = Gaussian(), Rademacher()
    print(f"C kernel: {'yes' if lib else 'no (torch code)'}; block {n} elements; ns per element:")
    print(f"  draw z, gaussian     {per_element_ns(lambda: g.fill_(z, 12345, 0), n):.2f}")
    print(f"  draw z, rademacher   {per_element_ns(lambda: r.fill_(z, 12345, 0), n):.2f}")
    print(
        f"  copy θ0 to float32   {per_element_ns(lambda: theta.to(torch.float32, copy=True), n):.2f}"
    )
    if lib:
        p = _native.ptr

        def encode():
            lib.zt_encode(p(theta), p(z), 1e-3, p(out), _native.bptr(bits), p(scratch), n)

        def decode():
            lib.zt_decode(p(out), p(z), 1e-3, p(scratch), None, None, n)

        encode()  # (out, bits, scratch as aside: the records an undo reads)
        aside, theta2 = scratch.clone(), torch.empty(n)

        def decode_kept():
            lib.zt_decode(p(out), p(z), 1e-3, p(theta2), _native.bptr(bits), p(aside), n)

        print(f"  perturb + check      {per_element_ns(encode, n):.2f}")
        print(f"  undo                 {per_element_ns(decode, n):.2f}")
        print(f"  undo + kept-aside    {per_element_ns(decode_kept, n):.2f}")
        assert torch.equal(theta2, theta), "the undo did not give θ back"


if __name__ == "__main__":
    main()
