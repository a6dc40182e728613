"""The GPU check: zotune on one CUDA machine in one call, under 8 minutes, one table at the end.

    python benchmarks/gpu_check.py              # on a CUDA machine (the whole check)
    python benchmarks/gpu_check.py --smoke      # the smallest form: a tiny model, seconds (CPU)

It runs, in order (each part skipped with a printed reason where it cannot run, and every part
after the time budget is spent):
1. the device-dependent tests (tests/test_devices.py: CUDA z against the CPU kernel's, bf16
   restores, the fused path's bit-for-bit checks, a CUDA training run);
2. for both built-in models (SmolLM2-135M, MiniLM-L6), on the device in its default dtype
   (bf16 where supported), batch 16 x 64 tokens, full parameters: every zeroth-order method's
   step time over the time of the forward passes it makes (each step paired with a forward
   timed just before it; the median over repetitions), MeZO's also with the fused path off,
   and each method's peak memory (CUDA: max_memory_allocated during its steps) over the peak of
   inference (forward passes alone);
3. LoRA on an 8-bit and a 4-bit base (bitsandbytes): a MeZO step's peak over that base's
   inference peak (CUDA only);
4. a 50-step `zotune train` run (SmolLM2-135M, SST-2, MeZO, full parameters) with its time,
   its peak memory and its dev accuracy.
On a CPU the timing and memory parts run in a reduced form (the tiny model, 2 methods) so the
script cannot rot; tests/test_gpu_check.py runs `--smoke` in the suite. Goals (issue 18): MeZO
step <= 1.05 x its two forwards on SmolLM2 in bf16, peak <= 1.05 x inference; a quantized
base's LoRA step <= 1.1 x its inference peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: this tree's zotune, not an installed one

from zotune import optim  # noqa: E402
from zotune.bench.memory import make_optimizer, random_batch_loss  # noqa: E402
from zotune.devices import resolve_device  # noqa: E402
from zotune.memory_usage import cuda_peak_mb, reset_cuda_peak  # noqa: E402
from zotune.models import apply_peft, load_model  # noqa: E402

BATCH, SEQ = 16, 64
ZO_METHODS = [m for m in optim.available() if issubclass(optim.OPTIMIZERS[m], optim.ZOOptimizer)]


class Table:
    """The rows of the final table: part, model, what, value, goal, verdict."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, part: str, model: str, what: str, value: str, goal: str = "", ok: str = ""):
        self.rows.append((part, model, what, value, goal, ok))
        print(f"  {part} | {model} | {what} | {value} {goal} {ok}".rstrip(), flush=True)

    def skip(self, part: str, reason: str) -> None:
        self.add(part, "-", "skipped", reason)

    def render(self) -> str:
        head = ("part", "model", "what", "value", "goal", "ok")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(6)]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        return "\n".join(
            [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
            + [line(r) for r in self.rows]
        )


def verdict(value: float, goal: float) -> str:
    return "yes" if value <= goal else "NO"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tests(table: Table, budget: float) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py"]
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(budget, 30)
        )
    except subprocess.TimeoutExpired:
        table.add("tests", "-", "tests/test_devices.py", f"timed out after {budget:.0f} s", ok="NO")
        return
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    table.add(
        "tests", "-", "tests/test_devices.py", last, ok="yes" if done.returncode == 0 else "NO"
    )
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")


def step_overhead(
    table: Table, name: str, device: torch.device, methods: list[str], reps: int
) -> None:
    """Every method's step time over its forwards' and its peak memory over inference's."""
    loaded = load_model(name, device=str(device), dtype="auto")
    model = loaded.model
    loss_fn = random_batch_loss(loaded, BATCH, SEQ)
    label = f"{Path(name).name} {loaded.dtype}"
    cuda = device.type == "cuda"
    with torch.no_grad():
        loss_fn()  # warm up
        sync(device)
        reset_cuda_peak()
        fwd_times = []
        for _ in range(reps):
            t = time.perf_counter()
            loss_fn()
            sync(device)
            fwd_times.append(time.perf_counter() - t)
    inference_peak = cuda_peak_mb() if cuda else None
    table.add("step", label, "forward pass", f"{1e3 * statistics.median(fwd_times):.1f} ms")
    if cuda:
        table.add("memory", label, "inference peak", f"{inference_peak:.0f} MB")
    runs = [(m, "auto") for m in methods] + ([("mezo", "off")] if cuda else [])
    for method, fused_mode in runs:
        os.environ["ZOTUNE_FUSED"] = fused_mode
        what = method + (" (fused path off)" if fused_mode == "off" else "")
        try:
            opt = make_optimizer(method, model, loss_fn)
            opt.step(loss_fn)  # warm up (compiles the fused kernels, SVRG's full step)
            sync(device)
            reset_cuda_peak()
            ratios = []
            for _ in range(reps):
                t = time.perf_counter()
                with torch.no_grad():
                    loss_fn()
                sync(device)
                fwd = time.perf_counter() - t
                before = opt.forward_passes
                t = time.perf_counter()
                opt.step(loss_fn)  # ZO steps run without autograd; hybrid-zo-fo's FO part uses it
                sync(device)
                ratios.append((time.perf_counter() - t) / ((opt.forward_passes - before) * fwd))
        except Exception as err:  # one method failing must not hide the others' numbers
            table.add("step", label, what, f"failed: {type(err).__name__}: {err}"[:120], ok="NO")
            continue
        finally:
            os.environ.pop("ZOTUNE_FUSED", None)
        ratio = statistics.median(ratios)
        goal = 1.05 if cuda and loaded.dtype == "bfloat16" else 1.10
        graded = method == "mezo" and fused_mode == "auto" and "smollm2" in name
        table.add(
            "step", label, f"{what}: step / its forwards", f"{ratio:.2f}",
            f"<= {goal}" if graded else "", verdict(ratio, goal) if graded else "",
        )  # fmt: skip
        if cuda:
            peak = cuda_peak_mb()
            share = peak / inference_peak
            graded = method == "mezo" and fused_mode == "auto"
            table.add(
                "memory", label, f"{what}: peak / inference", f"{share:.3f} ({peak:.0f} MB)",
                "<= 1.05" if graded else "", verdict(share, 1.05) if graded else "",
            )  # fmt: skip
        del opt
        if cuda:
            torch.cuda.empty_cache()
    del model, loaded


def quantized(table: Table, name: str, device: torch.device) -> None:
    """LoRA on a base loaded in 8 and 4 bits: a MeZO step's peak over that base's inference."""
    for bits in ("8bit", "4bit"):
        loaded = apply_peft(load_model(name, device=str(device), quantize=bits), "lora")
        loss_fn = random_batch_loss(loaded, BATCH, SEQ)
        with torch.no_grad():
            loss_fn()
            reset_cuda_peak()
            loss_fn()
            loss_fn()
            inference = cuda_peak_mb()
            opt = make_optimizer("mezo", loaded.model, loss_fn)
            opt.step(loss_fn)
            reset_cuda_peak()
            opt.step(loss_fn)
            peak = cuda_peak_mb()
        table.add(
            "quantized", f"{name} {bits}+lora", "mezo peak / inference",
            f"{peak / inference:.3f} ({peak:.0f} / {inference:.0f} MB)", "<= 1.1",
            verdict(peak / inference, 1.1),
        )  # fmt: skip
        del opt, loaded
        torch.cuda.empty_cache()


def training_run(table: Table, name: str, device: torch.device, steps: int, smoke: bool) -> None:
    from zotune.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        sizes = (
            dict(batch_size=4, num_train=16, num_dev=8, num_test=8)
            if smoke
            else dict(batch_size=16, num_train=1000, num_dev=200, num_test=200)
        )
        cfg = TrainConfig(
            model=name, task="sst2", method="mezo", steps=steps, eval_every=steps,
            lr=1e-6, eps=1e-3, device=str(device), out=f"{tmp}/run", **sizes,
        )  # fmt: skip
        t = time.perf_counter()
        summary = train(cfg, quiet=True)
        seconds = time.perf_counter() - t
    dev = summary.get("final_dev") or {}
    table.add(
        "train", f"{Path(name).name} {cfg.dtype}", f"{steps} MeZO steps (sst2, full)",
        f"{seconds:.0f} s, {summary.get('seconds_per_step', 0):.3f} s/step "
        f"(x{summary.get('step_to_forward_ratio')} of forwards), "
        f"peak {summary.get('peak_memory_mb', 0):.0f} MB, final dev "
        + ", ".join(f"{k} {v:.3f}" for k, v in dev.items() if isinstance(v, float)),
        ok="yes" if summary.get("status") == "completed" else "NO",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="the smallest form: a tiny model")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--budget", type=float, default=450, help="seconds before parts are skipped")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per method")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"gpu_check on {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}"
        f"{', --smoke' if args.smoke else ''}",
        flush=True,
    )
    table = Table()
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        from zotune.testing import make_tiny_model

        models = [make_tiny_model(Path(tmp.name) / "tiny")]
        methods, reps = ["mezo", "zo-adam"], args.reps or 2
    else:
        models, methods, reps = ["smollm2-135m", "minilm-l6"], ZO_METHODS, args.reps or 5
    if args.smoke:
        table.skip("tests", "--smoke (the test suite runs tests/test_devices.py itself)")
    elif not cuda:
        table.skip("tests", "no CUDA device: the suite runs the CPU ones")
    else:
        run_tests(table, min(left() / 3, 150))
    for model in models:
        if left() < 60 and not args.smoke:
            table.skip("step", f"{model}: out of time")
            continue
        step_overhead(table, model, device, methods, reps)
    if not cuda:
        table.skip("memory", "CPU: the allocator's peak is CUDA's; `zotune bench memory` on CPU")
        table.skip("quantized", "needs CUDA (the CPU's is in the memory suite's frozen-base table)")
    elif args.smoke or left() < 60:
        table.skip("quantized", "--smoke" if args.smoke else "out of time")
    else:
        try:
            quantized(table, "smollm2-135m", device)
        except Exception as err:
            table.add("quantized", "smollm2-135m", "failed", f"{type(err).__name__}: {err}"[:120])
    if left() < 45 and not args.smoke:
        table.skip("train", "out of time")
    else:
        training_run(table, models[0], device, 4 if args.smoke else 50, args.smoke)
    tmp.cleanup()
    print(f"\n{table.render()}\n\ntotal {time.perf_counter() - start:.0f} s on {device} ({name})")
    return 1 if any(r[5] == "NO" for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
