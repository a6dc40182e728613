"""Peak memory of inference vs ZO vs FO training steps, each measured in its own process.

    python -m zotune.bench.memory MODEL METHOD BATCH SEQ STEPS    # one measurement, prints JSON
        [--device auto] [--dtype auto] [--peft full] [--quantize none|8bit|4bit]

CPU: peak resident memory of the process while it runs the steps (the peak is reset after the
model is loaded), with the resident size right after loading noted as the baseline. CUDA: `max_memory_allocated`, reset before the first step.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..memory_usage import peak_rss_mb, reset_peak, rss_mb

# The memory suite's methods: one per kind of extra state (momentum's is ZO-Adam's first half;
# zo-sgd-cons, zo-blockwise and r-mezo keep what MeZO or Sparse MeZO keep, at 5-60x the time).
STATEFUL = ("zo-sgd-mmt", "zo-adam", "mezo-svrg", "fo-sgd", "fo-adam")
METHODS = [
    "forward",
    "mezo",
    "zo-sgd-sign",
    "zo-adam",
    "mezo-svrg",
    "sparse-mezo",
    "fo-sgd",
    "fo-adam",
]


def random_batch_loss(loaded, batch: int, seq: int, seed: int = 0):
    """Next-token CE (decoders) or head CE (encoders) on random tokens of a fixed shape."""
    g = torch.Generator().manual_seed(seed)
    model = loaded.model
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    if loaded.kind == "causal":
        fn = lambda: model(input_ids=ids, labels=ids).loss.float()  # noqa: E731
    else:
        labels = torch.randint(0, model.config.num_labels, (batch,), generator=g).to(device)
        fn = lambda: torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)  # noqa: E731
    fn.ids = ids  # type: ignore[attr-defined]  (benchmarks read the batch's tokens)
    return fn


def make_optimizer(method: str, model: torch.nn.Module, loss_fn, threads: int | None = None):
    """`method` over a model's trainable parameters with tiny steps, for measuring cost:
    built as `zotune train` builds it (`build_for`); MeZO-SVRG's full-batch loss is the
    minibatch's, and after its first (full-batch) step every step is a minibatch step."""
    from .. import optim

    hp: dict[str, Any] = {"lr": 1e-7}
    if issubclass(optim.OPTIMIZERS[method], optim.ZOOptimizer):
        hp.update(eps=1e-3, threads=threads)
    if "refresh" in optim.hyperparameters(method):
        hp["refresh"] = 10**9
    return optim.build_for(model, method, full_loss=loss_fn, **hp)


def measure(
    model: str,
    method: str,
    batch: int,
    seq: int,
    steps: int,
    *,
    device: str = "auto",
    dtype: str = "auto",
    peft: str = "full",
    quantize: str = "none",
) -> dict[str, Any]:
    """Load (on `device`, in `dtype`, the base quantized or not, wrapped in `peft`), then run
    `steps` training steps (or 2·steps forward passes for "forward")."""
    from ..memory_usage import cuda_peak_mb, reset_cuda_peak
    from ..models import apply_peft, load_model

    loaded = load_model(model, dtype=dtype, device=device, quantize=quantize)
    if peft != "full":
        loaded = apply_peft(loaded, peft)
    loss_fn = random_batch_loss(loaded, batch, seq)
    cuda = next(loaded.model.parameters()).device.type == "cuda"
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    reset_cuda_peak()
    reset_peak()
    t = time.perf_counter()
    if method == "forward":
        with torch.no_grad():
            for _ in range(2 * steps):
                loss_fn()
    else:
        opt = make_optimizer(method, loaded.model, loss_fn)
        for _ in range(steps):
            opt.step(loss_fn)  # every optimizer: a closure that returns the loss
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / steps
    peak = cuda_peak_mb() if cuda else peak_rss_mb()
    return dict(
        model=model,
        method=method,
        batch=batch,
        seq=seq,
        peak_mb=round(peak, 1),
        loaded_mb=round(loaded_mb, 1),
        seconds_per_step=round(seconds, 3),
        device=str(next(loaded.model.parameters()).device),
        dtype=loaded.dtype,
        peft=peft,
        quantize=quantize,
    )


def measure_in_process(
    model: str, method: str, batch: int, seq: int, steps: int = 2, **placement: str
) -> dict[str, Any]:
    """`measure` in a fresh interpreter, so one measurement's peak never leaks into another;
    `placement`: measure's device, dtype, peft and quantize."""
    cmd = [sys.executable, "-m", "zotune.bench.memory", model, method]
    cmd += [str(batch), str(seq), str(steps)]
    cmd += [f"--{k}={v}" for k, v in placement.items()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        err = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return dict(model=model, method=method, batch=batch, seq=seq, error=err, **placement)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_suite(
    out: str | Path,
    model: str = "smollm2-135m",
    batches=(1, 8, 32),
    seqs=(64, 256),
    methods=METHODS,
    device: str = "auto",
    bases: tuple[tuple[str, str], ...] = (),
) -> list[dict]:
    """Inference vs every listed method at each batch size and sequence length (the shape of
    MeZO's and MeZO-SVRG's memory tables), then, with `bases` ((dtype, quantize) pairs, e.g.
    BASES), a frozen base's precisions under LoRA (`frozen_base`); finished cells are not
    redone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["batch"], r["seq"])] = r
    rows = []
    for seq in seqs:
        for batch in batches:
            for method in methods:
                key = (method, batch, seq)
                if key not in done:
                    print(f"memory: {method} batch {batch} seq {seq}", flush=True)
                    # stateful methods allocate their state (moments, gradients, anchor) in
                    # the first step: the second step's forward passes run beside it
                    steps = 2 if method in STATEFUL else 1
                    done[key] = measure_in_process(model, method, batch, seq, steps, device=device)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(done[key]) + "\n")
                rows.append(done[key])
    where = f"{rows[0].get('dtype', 'float32')} ({rows[0].get('device', 'cpu')})" if rows else ""
    lines = [f"# Peak memory, {model}, {where}", "",
             "| seq | batch | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]  # fmt: skip
    for seq in seqs:
        for batch in batches:
            fwd = done[("forward", batch, seq)].get("peak_mb")
            cells = []
            for m in methods:
                r = done[(m, batch, seq)]
                if "error" in r or not fwd:
                    cells.append("failed")
                else:
                    cells.append(f"{r['peak_mb']:.0f} MB (×{r['peak_mb'] / fwd:.2f})")
            lines.append(f"| {seq} | {batch} | " + " | ".join(cells) + " |")
    if bases:
        lines += ["", *frozen_base(out, model, bases=bases, device=device)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _table_and_plot(rows, out, model, methods)
    return rows


# A frozen base's precisions (docs/hardware.md): what LoRA, prefix and prompt tuning pay for it.
BASES = (("float32", "none"), ("bfloat16", "none"), ("float32", "8bit"), ("float32", "4bit"))


def frozen_base(
    out: Path,
    model: str,
    peft: str = "lora",
    batch: int = 8,
    seq: int = 64,
    device: str = "auto",
    bases: tuple[tuple[str, str], ...] = BASES,
) -> list[str]:
    """Peak memory of inference and of a MeZO step with `peft` on a base loaded in each of
    `bases` (bitsandbytes for 8/4 bit: cells fail where it is not installed); returns the
    report's lines. Finished cells (in frozen_base.jsonl) are not redone."""
    path = out / "frozen_base.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["dtype"], r["quantize"])] = r
    lines = [f"## Frozen base under {peft}, batch {batch} x seq {seq}", "",
             "| base | loaded | forward peak | mezo peak | mezo / forward |", "|---|---|---|---|---|"]  # fmt: skip
    for dtype, quantize in bases:
        cells = []
        for method in ("forward", "mezo"):
            key = (method, dtype, quantize)
            if key not in done:
                print(f"memory: {peft} on a {dtype}/{quantize} base, {method}", flush=True)
                r = measure_in_process(model, method, batch, seq, 1, device=device, dtype=dtype, peft=peft, quantize=quantize)  # fmt: skip
                done[key] = {**r, "dtype": dtype, "quantize": quantize}
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(done[key]) + "\n")
            cells.append(done[key])
        name = dtype if quantize == "none" else f"{quantize} (bitsandbytes)"
        if any("error" in c for c in cells):
            lines.append(
                f"| {name} | failed: {next(c['error'] for c in cells if 'error' in c)} | | | |"
            )
            continue
        fwd, step = cells
        lines.append(
            f"| {name} | {fwd['loaded_mb']:.0f} MB | {fwd['peak_mb']:.0f} MB | "
            f"{step['peak_mb']:.0f} MB | {step['peak_mb'] / fwd['peak_mb']:.2f} |"
        )
    return lines


def _table_and_plot(rows: list[dict], out: Path, model: str, methods) -> None:
    """results.csv (one row per cell) and peak_memory.png (peak MB per method, per shape)."""
    cols = ["model", "method", "batch", "seq", "peak_mb", "loaded_mb", "seconds_per_step", "error"]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({(r["seq"], r["batch"]) for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        cell = {(r["seq"], r["batch"]): r.get("peak_mb") for r in rows if r["method"] == m}
        heights = [cell.get(sh) or 0 for sh in shapes]
        ax.bar([i + k * width for i in range(len(shapes))], heights, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels([f"batch {b} x seq {s}" for s, b in shapes], fontsize=7)
    ax.set_ylabel("peak resident memory (MB)")
    ax.set_title(f"{model}, fp32: inference vs ZO vs FO", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "peak_memory.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m zotune.bench.memory")
    for name in ("model", "method"):
        p.add_argument(name)
    for name in ("batch", "seq", "steps"):
        p.add_argument(name, type=int)
    for name, default in (("device", "auto"), ("dtype", "auto"), ("peft", "full")):
        p.add_argument(f"--{name}", default=default)
    p.add_argument("--quantize", default="none")
    a = vars(p.parse_args())
    print(json.dumps(measure(**a)))
