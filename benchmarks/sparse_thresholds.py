"""Sparse MeZO's per-step thresholds of tied tensors: a band around the last threshold against a
selection over the whole tensor, on the built-in models, one thread.

    python benchmarks/sparse_thresholds.py                   # MiniLM-L6 and SmolLM2-135M
    python benchmarks/sparse_thresholds.py --models minilm-l6 --sparsity 0.8

For each model: which tensors follow their weights at this sparsity (tied at their threshold:
zeros, ones, quantized levels, or by chance), then, after every weight moved by 1e-6·z (about a
ZO step), the time of `MagnitudeMask.refresh` (the band) and of the same thresholds selected
over each whole tensor, the median of a few repetitions each, their ratio, and whether the
two agree exactly (they must).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zotune

from zotune.engine.directions import MagnitudeMask, kth_magnitude  # noqa: E402
from zotune.models import load_model  # noqa: E402


def measure(name: str, sparsity: float, reps: int) -> None:
    model = load_model(name).model
    tensors = [p for p in model.parameters()]
    keys = range(len(tensors))
    mask = MagnitudeMask(tensors, keys, sparsity)
    follow = sorted(mask.follow)
    entries = sum(tensors[k].numel() for k in follow)
    print(
        f"{name}: {len(follow)} of {len(tensors)} tensors follow at sparsity {sparsity} "
        f"({entries / 1e6:.1f}M of {sum(t.numel() for t in tensors) / 1e6:.1f}M entries)"
    )
    if not follow:
        return
    torch.manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn_like(t) * 1e-6)
    band, full = [], []
    whole: dict[int, tuple[float, int, int]] = {}
    for _ in range(reps):
        start = time.perf_counter()
        mask.refresh(tensors, keys)
        band.append(time.perf_counter() - start)
        start = time.perf_counter()
        for k in follow:
            keep = round((1 - sparsity) * tensors[k].numel())
            whole[k] = kth_magnitude(tensors[k].detach().reshape(-1), keep)
        full.append(time.perf_counter() - start)
    same = all(mask.thresholds[k] == whole[k][0] for k in follow)
    b, f = statistics.median(band), statistics.median(full)
    print(f"  refresh, band around the last threshold: {b * 1e3:8.1f} ms")
    print(f"  the same, selected over whole tensors:   {f * 1e3:8.1f} ms")
    print(f"  ratio: {f / b:.0f}x; thresholds identical: {same}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.models:
        measure(name, args.sparsity, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
