"""What distributing a zeroth-order run costs and gains: measured on this machine, modelled for N.

    python benchmarks/distributed.py                         # MiniLM-L6 on SST-2, 12 steps each
    python benchmarks/distributed.py --model tiny --steps 30 # the 2-layer test model, seconds

Measured: the same MeZO run (full parameters, --grad-accum 2 micro-batches of --batch-size, so
the global batch is the same everywhere) as 1 process with 1 thread, as 2 processes with 1 thread
each (data parallel over gloo: each rank one micro-batch), and as 1 process with 2 threads (the
other way to use 2 cores). Printed: the median step time (the first 2 steps left out), the
speed-up over 1 process x 1 thread and its efficiency (speed-up / 2 cores), the bytes each rank
hands to the step's collectives (counted at `torch.distributed.all_gather`), and the time of
the gradient all-reduce data-parallel backprop would make between the same 2 processes over
the same gloo link (the model's trainable float32 numbers, the median of 3).

Modelled: N nodes on a network of latency --latency-us per message and --gbits bandwidth, for
SmolLM2-135M and MiniLM-L6: the bytes each rank sends per step (zotune: its losses in 3
all-gathers a MeZO step; data-parallel backprop: a ring all-reduce of the float32 gradient,
2(N-1)/N x 4P), the communication time, and the scaling efficiency with the per-rank batch
fixed (weak scaling: zotune's step compute per rank stays that of one rank, backprop's is about
3 forward passes with no overlap of communication) and, for zotune, with the global batch fixed
(strong scaling: the forward passes split N ways, the passes over the weights, which every rank
makes, do not). Forward times and pass shares are docs/PERFORMANCE.md's CPU numbers
(--compute-speedup divides the times, e.g. for GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Each rank: count the bytes handed to all_gather (zotune's step collectives), run the CLI, then
# time a gradient-sized all_reduce over a fresh group on the same link.
WORKER = """
import json, os, statistics, sys, time
import torch, torch.distributed as dist
sent, gather = [0], dist.all_gather
def counted(out, tensor, *args, **kwargs):
    sent[0] += tensor.numel() * tensor.element_size()
    return gather(out, tensor, *args, **kwargs)
dist.all_gather = counted
from zotune.cli import main
argv, params, port, result = json.loads(sys.argv[1])
assert main(argv) == 0
out = {"bytes": sent[0]}
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo")
    grads, times = torch.zeros(params), []
    for _ in range(3):
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    out["allreduce"] = statistics.median(times)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump(out, open(result, "w"))
"""

MODELS = {  # trainable numbers, forward seconds (batch 16 x 64, this CPU), passes' share
    "SmolLM2-135M": (134_515_008, 2.97, 0.045),
    "MiniLM-L6": (22_713_216, 0.226, 0.08),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(argv: list[str], ranks: int, threads: int, params: int, work: Path) -> dict:
    """One configuration: rank 0's run directory read back, plus the worker's counts."""
    out, result = work / f"r{ranks}t{threads}", work / f"r{ranks}t{threads}.json"
    argv = [*argv, "--out", str(out), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(sys.path))
    env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    job = json.dumps([argv, params, free_port(), str(result)])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, job],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
        )
        for r in range(ranks)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit(f"the run with {ranks} process(es) x {threads} thread(s) failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = json.loads(result.read_text())
    return {
        "step": statistics.median(r["seconds"] for r in rows[2:]),
        "bytes": counts["bytes"] / len(rows),  # (evaluation gathers objects: not counted)
        "allreduce": counts.get("allreduce"),
    }


def trainable(model: str) -> int:
    from zotune.models import load_model

    loaded = load_model(model, num_labels=2)
    return sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)


def measured(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            from zotune.testing import make_tiny_model

            model = make_tiny_model(Path(tmp) / "tiny")
        params = trainable(model)
        argv = [
            "train", "--model", model, "--task", "sst2", "--method", "mezo", "--peft", "full",
            "--recipe", "paper", "--steps", str(args.steps), "--eval-every", str(args.steps),
            "--batch-size", str(args.batch_size), "--grad-accum", "2", "--lr", "1e-6",
            "--num-train", "256", "--num-dev", "16", "--num-test", "16", "--quiet",
        ]  # fmt: skip
        runs = {
            "1 process x 1 thread": measure(argv, 1, 1, params, Path(tmp)),
            "2 processes x 1 thread": measure(argv, 2, 1, params, Path(tmp)),
            "1 process x 2 threads": measure(argv, 1, 2, params, Path(tmp)),
        }
    base = runs["1 process x 1 thread"]["step"]
    print(
        f"\n{args.model}: {params:,} trainable numbers, MeZO, 2 micro-batches of {args.batch_size}"
    )
    print("| configuration | step (s) | speed-up | efficiency | bytes per rank per step |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        speedup = base / r["step"]
        eff = speedup / (1 if name.startswith("1 process x 1") else 2)
        print(f"| {name} | {r['step']:.3f} | {speedup:.2f} | {eff:.2f} | {r['bytes']:.0f} |")
    ar = runs["2 processes x 1 thread"]["allreduce"]
    print(
        f"data-parallel backprop's gradient all-reduce between the same 2 processes: "
        f"{4 * params / 2**20:.1f} MB a rank, {ar:.3f} s (gloo, loopback)"
    )


def modelled(args: argparse.Namespace) -> None:
    alpha, bandwidth = args.latency_us * 1e-6, args.gbits * 1e9 / 8
    print(
        f"\nModel: {args.latency_us:g} us a message, {args.gbits:g} Gbit/s, batch 16 a rank, "
        f"forward passes {args.compute_speedup:g}x as fast as this CPU's"
    )
    print(
        "| model | N | zotune bytes/rank/step | backprop bytes/rank/step | zotune comm (ms) "
        "| backprop comm (ms) | zotune weak eff. | backprop weak eff. | zotune strong eff. |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (params, forward, passes) in MODELS.items():
        forward /= args.compute_speedup
        zo_step = 2 * forward * (1 + passes)  # two forwards and the passes over the weights
        fo_step = 3 * forward  # forward + backward
        for n in (1, 2, 4, 8, 16, 64):
            # zotune: 3 ring all-gathers (2 losses, the step's end) of 8-16 bytes a rank
            zo_bytes = (n - 1) * (8 + 8 + 16)
            zo_comm = 3 * (n - 1) * alpha + zo_bytes / bandwidth
            fo_bytes = 2 * (n - 1) / n * 4 * params
            fo_comm = 2 * (n - 1) * alpha + fo_bytes / bandwidth
            strong = zo_step / (n * (2 * forward / n + 2 * forward * passes + zo_comm))
            print(
                f"| {name} | {n} | {zo_bytes:,.0f} | {fo_bytes:,.0f} | {1e3 * zo_comm:.2f} "
                f"| {1e3 * fo_comm:.0f} | {zo_step / (zo_step + zo_comm):.4f} "
                f"| {fo_step / (fo_step + fo_comm):.3f} | {strong:.2f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6", help="minilm-l6, smollm2-135m, tiny or a path")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    ap.add_argument("--latency-us", type=float, default=25.0)
    ap.add_argument("--gbits", type=float, default=25.0)
    ap.add_argument(
        "--compute-speedup",
        type=float,
        default=1.0,
        help="divide the modelled forward times by this (e.g. 50 for GPUs)",
    )
    ap.add_argument("--model-only", action="store_true", help="print the model alone")
    args = ap.parse_args()
    if not args.model_only:
        measured(args)
    modelled(args)


if __name__ == "__main__":
    main()
