"""A step's batch padded to its longest example, against the same examples as length-sorted
micro-batches (`--grad-accum K --sort-micro-batches`): seconds per MeZO step, one run each.

    python benchmarks/length_sorting.py                      # MiniLM-L6 on RTE, 16 = 4 x 4
    python benchmarks/length_sorting.py --task sst2 --steps 60

Each run is `zotune train` in its own process (one thread); the step time is the median over
the steps after the first five. The first step's loss is printed for both: the same examples,
so the same loss up to float rounding. Needs ZOTUNE_DATA (../shared/data) for RTE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, args: argparse.Namespace, extra: list[str]) -> tuple[float, float]:
    cmd = [
        sys.executable, "-m", "zotune.cli", "train", "--model", args.model, "--task", args.task,
        "--method", "mezo", "--peft", "full", "--lr", "1e-7", "--eps", "1e-3",
        "--steps", str(args.steps), "--eval-every", str(10 * args.steps), "--num-dev", "16",
        "--num-test", "16", "--max-length", "256", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "seconds" in r and "loss" in r]
    return statistics.median(r["seconds"] for r in steps[5:]), steps[0]["loss"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="rte")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=4, help="micro-batches of the sorted run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        padded = run(Path(tmp) / "padded", args, ["--batch-size", str(args.batch)])
        sort = ["--batch-size", str(args.batch // args.k), "--grad-accum", str(args.k)]
        ordered = run(Path(tmp) / "sorted", args, [*sort, "--sort-micro-batches"])
    print(f"{args.model} on {args.task}, batch {args.batch}, MeZO, one thread")
    print(f"  padded to the longest:      {padded[0]:.3f} s/step  (first loss {padded[1]:.8f})")
    print(
        f"  {args.k} sorted micro-batches:  {ordered[0]:.3f} s/step  (first loss {ordered[1]:.8f})"
    )
    print(f"  speed-up: {padded[0] / ordered[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
