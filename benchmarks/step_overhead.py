"""Step overhead and memory of zeroth-order steps, as ratios measured in one run.

    python benchmarks/step_overhead.py                 # both built-in models, time + memory
    python benchmarks/step_overhead.py --models smollm2-135m --skip-memory

Time: for each model (full-parameter, fp32, batch 16 x 64 tokens), a training step's time
divided by the time of the forward passes it makes, each step paired with a forward pass run
alone just before it; the median of these ratios over the repetitions is printed. The official
MeZO step (torch.normal per tensor, out-of-place updates, z drawn 4 times) is timed the same way
in the same run, for reference. Pairing makes the machine's drift hit both sides alike. Then
each method's passes over the weights are timed alone (its closure only looks up the batch's
embedding rows and returns a number) and printed as a share of the forward passes its step
makes: the ratio minus one, without the forward pass's noise.

Memory: each configuration runs in its own process (a fresh interpreter, so peaks do not bleed
between them) and reports its peak resident memory: forward passes only, then training steps
with each method. The ratio to forward-only is printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

# plain use: torch first, then zotune (its OMP_WAIT_POLICY default then comes too late; the
# kernel's threads run on torch's own OpenMP team instead: native.team)
import torch

from zotune.bench.memory import make_optimizer, measure_in_process, random_batch_loss
from zotune.engine import native
from zotune.models import load_model

BATCH, SEQ = 16, 64


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


def time_model(name: str, methods: list[str], reps: int, threads: int | None) -> dict:
    loaded = load_model(name, dtype="float32")
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters()]
    loss_fn = random_batch_loss(loaded, BATCH, SEQ)
    times: dict[str, list[float]] = {"forward": [], "official": [], **{m: [] for m in methods}}
    ratios: dict[str, list[float]] = {m: [] for m in ["official", *methods]}
    forwards: dict[str, int] = {"official": 2}
    opts = {}
    for m in methods:
        opts[m] = make_optimizer(m, model, loss_fn, threads)
        opts[m].step(loss_fn)  # warm up (and MeZO-SVRG's full-batch step)
    with torch.no_grad():
        loss_fn()  # warm up
        for r in range(reps):
            # the order rotates each repetition: the official step reallocates every weight,
            # which would otherwise always slow down whichever method follows it
            order = ["official", *methods]
            for m in order[r % len(order) :] + order[: r % len(order)]:
                # each step is paired with a forward pass timed just before it: the machine's
                # speed drifts over seconds, and the pair shares the drift
                t = time.perf_counter()
                loss_fn()
                fwd = time.perf_counter() - t
                times["forward"].append(fwd)
                t = time.perf_counter()
                if m == "official":
                    official_step(params, loss_fn, seed=r, lr=1e-7, eps=1e-3)
                else:
                    before = opts[m].forward_passes
                    opts[m].step(loss_fn)
                    forwards[m] = opts[m].forward_passes - before
                times[m].append(time.perf_counter() - t)
                ratios[m].append(times[m][-1] / (forwards[m] * fwd))
    passes = passes_alone(loaded, opts, loss_fn, reps)
    fwd = statistics.median(times["forward"])
    row = {"model": name, "params": sum(p.numel() for p in params), "forward_s": fwd}
    row["official_ratio"] = statistics.median(ratios["official"])
    for m in methods:
        row[f"{m}_s"] = statistics.median(times[m])
        row[f"{m}_forwards"] = forwards[m]
        row[f"{m}_ratio"] = statistics.median(ratios[m])
        row[f"{m}_passes_s"] = passes[m]
        row[f"{m}_passes_share"] = passes[m] / (forwards[m] * fwd)
    return row


@torch.no_grad()
def passes_alone(loaded, opts: dict, loss_fn, reps: int) -> dict[str, float]:
    """Median time of each method's step when its closure only looks up the batch's embedding
    rows (so attached tables move as in a real step) and returns a fresh number: the cost of
    the passes over the weights alone, free of the forward pass's noise."""
    embed, ids = loaded.model.get_input_embeddings(), loss_fn.ids
    rng = random.Random(0)

    def closure() -> float:
        embed(ids)
        return rng.random()

    times: dict[str, list[float]] = {m: [] for m in opts}
    for _ in range(3 * reps):
        for m, opt in opts.items():
            t = time.perf_counter()
            opt.step(closure)
            times[m].append(time.perf_counter() - t)
    return {m: statistics.median(ts) for m, ts in times.items()}


def memory(name: str, methods: list[str], steps: int) -> list[dict]:
    rows = [measure_in_process(name, m, BATCH, SEQ, steps) for m in ["forward", *methods]]
    fwd = rows[0]["peak_mb"]
    for r in rows:
        r["ratio_to_forward"] = r["peak_mb"] / fwd if "peak_mb" in r else float("nan")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    zo = [
        "mezo",
        "zo-sgd-mmt",
        "zo-sgd-sign",
        "zo-sgd-cons",
        "zo-adam",
        "mezo-svrg",
        "sparse-mezo",
        "r-mezo",
        "lozo",  # low-rank directions (issue 21): the C kernel's low-rank law on a CPU
        "lozo-m",
        "subzero",
        "fzoo",
        "hizoo",
        "adamezo",
    ]
    ap.add_argument("--methods", nargs="+", default=zo, help="ZO methods to time")
    ap.add_argument(
        "--memory-methods", nargs="+", default=["mezo", "mezo-svrg", "fo-sgd", "fo-adam"]
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="perturbation threads (default 2)")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH} x {SEQ} tokens, fp32, "
        f"torch imported before zotune; kernel threads on "
        f"{'torch OpenMP team' if native.team() else 'a thread pool'}"
    )
    for name in [] if args.skip_time else args.models:
        row = time_model(name, args.methods, args.reps, args.threads)
        print(f"\n{name} ({row['params'] / 1e6:.1f}M params): forward {row['forward_s']:.3f} s")
        print(f"  official MeZO step / its 2 forwards: {row['official_ratio']:.2f}")
        for m in args.methods:
            print(
                f"  zotune {m} step / its forwards:    {row[f'{m}_ratio']:.2f}  ({row[f'{m}_s']:.3f} s)"
            )
        print(
            "  the passes over the weights alone (closure without a forward), share of its forwards:"
        )
        for m in args.methods:
            print(
                f"    {m}: {1e3 * row[f'{m}_passes_s']:.1f} ms = {100 * row[f'{m}_passes_share']:.1f}%"
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
