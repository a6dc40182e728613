"""Step overhead and memory of zeroth-order steps, as ratios measured in one run.

    python benchmarks/step_overhead.py                 # both built-in models, time + memory
    python benchmarks/step_overhead.py --models smollm2-135m --skip-memory

Time: for each model (full-parameter, fp32, batch 16 x 64 tokens), the median time of a
training step divided by the median time of the forward passes that step needs, run alone. The
official MeZO step (torch.normal per tensor, out-of-place updates, z drawn 4 times) is timed the
same way in the same run, for reference. Steps and forwards are interleaved, so machine noise
hits both alike.

Memory: each configuration runs in its own process (a fresh interpreter, so peaks do not bleed
between them) and reports its peak resident memory: forward passes only, then training steps
with each method. The ratio to forward-only is printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from zotune import optim
from zotune.models import load_model

BATCH, SEQ = 16, 64


def make_loss(loaded, seed: int = 0):
    """A real loss on random tokens: next-token CE (decoders) or head CE (encoders)."""
    g = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    model = loaded.model
    if loaded.kind == "causal":
        return lambda: model(input_ids=ids, labels=ids).loss.float()
    labels = torch.randint(0, model.config.num_labels, (BATCH,), generator=g)
    return lambda: torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)


@torch.no_grad()
def official_step(params, loss_fn, seed: int, lr: float, eps: float) -> float:
    """A faithful copy of the official MeZO step's arithmetic (large_models/trainer.py)."""

    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(
                mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype
            )
            p.data = p.data + scale * z * eps

    perturb(1)
    loss1 = loss_fn()
    perturb(-2)
    loss2 = loss_fn()
    g = ((loss1 - loss2) / (2 * eps)).item()
    perturb(1)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(
            mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype
        )
        p.data = p.data - lr * (g * z)
    return float(loss1)


def time_model(name: str, methods: list[str], reps: int) -> dict:
    loaded = load_model(name, dtype="float32")
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters()]
    loss_fn = make_loss(loaded)
    opts = {m: optim.build(m, params, lr=1e-7, eps=1e-3) for m in methods}
    forwards_per_step = {m: 2 for m in methods}
    times: dict[str, list[float]] = {"forward": [], "official": [], **{m: [] for m in methods}}
    with torch.no_grad():
        loss_fn()  # warm up
        for r in range(reps):
            t = time.perf_counter()
            loss_fn()
            times["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            official_step(params, loss_fn, seed=r, lr=1e-7, eps=1e-3)
            times["official"].append(time.perf_counter() - t)
            for m, opt in opts.items():
                t = time.perf_counter()
                opt.step(loss_fn)
                times[m].append(time.perf_counter() - t)
    fwd = statistics.median(times["forward"])
    row = {"model": name, "params": sum(p.numel() for p in params), "forward_s": fwd}
    row["official_ratio"] = statistics.median(times["official"]) / (2 * fwd)
    for m in methods:
        row[f"{m}_s"] = statistics.median(times[m])
        row[f"{m}_ratio"] = row[f"{m}_s"] / (forwards_per_step[m] * fwd)
    return row


def memory_child(name: str, method: str, steps: int) -> None:
    """Run in a fresh process: load, then forwards only or training steps; print peak RSS."""
    loaded = load_model(name, dtype="float32")
    loss_fn = make_loss(loaded)
    params = list(loaded.model.parameters())
    for p in params:
        p.requires_grad_(method != "forward")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "forward":
        with torch.no_grad():
            for _ in range(2 * steps):
                loss_fn()
    elif method.startswith("fo-"):
        opt = optim.build(method, params, lr=1e-7)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)
    else:
        opt = optim.build(method, params, lr=1e-7, eps=1e-3)
        for _ in range(steps):
            opt.step(loss_fn)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "peak_mb": peak, "loaded_mb": base}))


def memory(name: str, methods: list[str], steps: int) -> list[dict]:
    rows = []
    for method in ["forward", *methods]:
        cmd = [sys.executable, __file__, "--child", name, method, str(steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    fwd = rows[0]["peak_mb"]
    for r in rows:
        r["ratio_to_forward"] = r["peak_mb"] / fwd
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--methods", nargs="+", default=["mezo"])
    ap.add_argument("--memory-methods", nargs="+", default=["mezo"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--child", nargs=3, metavar=("MODEL", "METHOD", "STEPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        memory_child(args.child[0], args.child[1], int(args.child[2]))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH} x {SEQ} tokens, fp32"
    )
    for name in args.models:
        row = time_model(name, args.methods, args.reps)
        print(f"\n{name} ({row['params'] / 1e6:.1f}M params): forward {row['forward_s']:.3f} s")
        print(f"  official MeZO step / its 2 forwards: {row['official_ratio']:.2f}")
        for m in args.methods:
            print(
                f"  zotune {m} step / its forwards:    {row[f'{m}_ratio']:.2f}  ({row[f'{m}_s']:.3f} s)"
            )
    if not args.skip_memory:
        for name in [m for m in args.models if m == "smollm2-135m"] or args.models[:1]:
            print(f"\npeak resident memory, {name}, each in its own process:")
            for r in memory(name, args.memory_methods, args.memory_steps):
                print(
                    f"  {r['method']:>12}: {r['peak_mb']:8.0f} MB  x{r['ratio_to_forward']:.3f} of forward-only"
                )


if __name__ == "__main__":
    main()
