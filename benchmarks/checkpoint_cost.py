"""What a checkpoint costs, against the step time it interrupts, measured in one run.

    python benchmarks/checkpoint_cost.py                      # SmolLM2-135M and MiniLM-L6
    python benchmarks/checkpoint_cost.py --models minilm-l6

For each model and method (full-parameter fp32 MeZO and ZO-Adam, and MeZO with LoRA), a few
training steps on a random batch (16 x 64 tokens) are timed, then `zotune.checkpoint.save`
(trained tensors, optimizer state, loop state, fsync'ed and swapped in) into a temporary run
folder. Printed: the median step and save times, the checkpoint's size, and the share of
training time checkpoints take at the default interval (every max(300 s, 99 x save): at most
1%) and at one every 100 steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zotune import checkpoint, optim
from zotune.bench.memory import random_batch_loss
from zotune.models import apply_peft, load_model
from zotune.train import SAVE_SECONDS


def measure(model_name: str, method: str, peft: str, reps: int) -> dict:
    torch.manual_seed(0)
    loaded = load_model(model_name, num_labels=2)
    if peft != "full":
        loaded = apply_peft(loaded, peft, seed=0)
    loss = random_batch_loss(loaded, 16, 64)
    opt = optim.build_for(loaded.model, method, lr=1e-7, eps=1e-3)
    steps, saves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step(loss)
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.save(Path(tmp), loaded.model, opt, None, checkpoint.LoopState())
            saves.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in (Path(tmp) / checkpoint.CHECKPOINT).iterdir())
    step, save = statistics.median(steps), statistics.median(saves)
    return {"step": step, "save": save, "mb": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(
        "| model | method | step (s) | save (s) | checkpoint (MB) | share, default interval"
        " | share, every 100 steps |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for method, peft in (("mezo", "full"), ("zo-adam", "full"), ("mezo", "lora")):
            r = measure(model, method, peft, args.reps)
            timed = r["save"] / (max(SAVE_SECONDS, 99 * r["save"]) + r["save"])
            stepped = r["save"] / (100 * r["step"] + r["save"])
            print(
                f"| {model} | {method} ({peft}) | {r['step']:.3f} | {r['save']:.3f} | "
                f"{r['mb']:.1f} | {100 * timed:.2f}% | {100 * stepped:.2f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
