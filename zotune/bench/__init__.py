"""`zotune bench`: run a grid of fine-tuning jobs, one process each, and report.

A suite is a list of runs (each a `TrainConfig`). Every run executes `zotune train` in its own
process, so peak-memory figures do not bleed between runs, and writes `<out>/runs/<id>/`;
a finished run (`summary.json` says completed) is not redone when a grid is re-run, and an
interrupted one resumes from its last checkpoint (`zotune train --resume`). Several workers can
share one results folder (start the same `zotune bench` command once per core or machine): each
run is claimed with a lock under `<out>/locks/`, and a worker skips the runs others hold. Results land in
`results.jsonl` (each run's summary and dev curve), `results.csv`, `report.md` and PNG plots (dev
accuracy against forward passes, peak memory and seconds per step per method). A results folder
committed from another machine is taken back with `restore` (`zotune bench --restore DIR`), so a
suite moved to a new machine neither redoes nor loses the runs it had finished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so one worker per results folder
    fcntl = None  # type: ignore[assignment]

import yaml

from ..checkpoint import CHECKPOINT
from ..testing import make_tiny_model
from ..train import ConfigError, TrainConfig, _write_json

TRAIN_KEYS = set(TrainConfig.__dataclass_fields__)

# Forward passes a step costs, to give every method the same budget of forward passes.
FORWARDS = {
    "fzoo": 9,
    "hizoo": 3,
    "zo-sgd-cons": 5,
    "mezo-svrg": 4,
    "forward-grad": 1,
    "fo-sgd": 1,
    "fo-adam": 1,
    "hybrid-zo-fo": 3,
}
# Learning rates per (method family, scheme), in the ranges the papers' grids use, chosen on dev.
LRS = {
    ("zo", "full"): 1e-5, ("zo", "lora"): 1e-3, ("zo", "prefix"): 3e-2, ("zo", "prompt"): 1e-2,
    ("adaptive", "full"): 1e-5, ("adaptive", "lora"): 1e-3, ("adaptive", "prefix"): 1e-2,
    ("adaptive", "prompt"): 1e-2, ("fo", "full"): 1e-5, ("fo", "lora"): 1e-3, ("fo", "prefix"): 1e-2,
    ("fo", "prompt"): 1e-2,
}  # fmt: skip
EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1, "prompt": 1e-2}


def family(method: str) -> str:
    if method.startswith("fo-"):
        return "fo"
    return "adaptive" if method in ("zo-adam", "zo-sgd-sign", "adamezo", "fzoo") else "zo"


def equal_budget(method: str, peft: str, budget: int, evals: int = 5) -> dict[str, Any]:
    """A run of `method` given `budget` training forward passes, evaluated `evals` times."""
    fw = FORWARDS.get(method, 2)
    lr = LRS[(family(method), peft)] * (1e2 if method == "zo-sgd-sign" and peft == "full" else 1)
    run = dict(method=method, peft=peft, lr=lr, eps=EPS[peft], steps=max(budget // fw, 1))
    run["eval_every"] = max(run["steps"] // evals, 1)
    return run


ZO_BENCH = [
    "zo-sgd",
    "zo-sgd-mmt",
    "zo-sgd-sign",
    "zo-sgd-cons",
    "zo-adam",
    "forward-grad",
    "fo-sgd",
    "fo-adam",
]
# the newer methods (issue 21) on the same budget, after ZO-Bench's own
NEWER = ["fzoo", "hizoo", "adamezo", "lozo", "subzero"]
# Sized for a 2-core CPU: every suite finishes in well under an hour there (see docs/RESULTS.md).
BASE = dict(
    model="smollm2-135m", task="sst2", batch_size=8, num_train=1000, num_dev=100, num_test=200
)
# MeZO's list minus RTE (in the sparse-mezo suite), WSC and WiC (time), BoolQ (no train split
# in ../shared/data), MultiRC and ReCoRD (passages 4-10x longer) and SQuAD/DROP (generation):
# they did not fit this CPU's budget in one session; add them here or run `zotune train`.
SUPERGLUE = ("sst2", "copa", "cb")


# The convergence suite: MiniLM-L6, all weights, long enough for the methods to separate. Each
# method's learning rate is chosen on dev over a two-point grid with seed 0, then the chosen
# rate runs seeds 1 and 2 (the seed-0 run is reused): 3 seeds per method and task.
ZO_STEPS, FO_STEPS = 5000, 1000
# "5,000 steps or until dev plateaus": a run stops after 8 evaluations in a row with no new best
# on dev (2,000 ZO steps at eval_every 250; the starting model, the linear probe, counts as one)
PATIENCE = 8
CONVERGENCE = dict(
    model="minilm-l6", peft="full", eps=1e-3, batch_size=16, eval_batch_size=64,
    init_head="linear-probe", recipe="paper", max_length=256, patience=PATIENCE,
)  # fmt: skip
CONVERGENCE_TASKS = {
    # SST-2: the whole GLUE train set (less the 500 dev rows), GLUE dev as test
    "sst2": dict(num_train=67349, num_dev=500, num_test=872),
    # RTE: SuperGLUE train (less 250 dev rows), SuperGLUE val as test; its pairs run 14 to 289
    # tokens, so the batch of 16 goes as 4 length-sorted micro-batches of 4 (the same examples
    # and loss; 1.7-1.8x faster a step here: benchmarks/length_sorting.py)
    "rte": dict(
        num_train=2490,
        num_dev=250,
        num_test=277,
        batch_size=4,
        grad_accum=4,
        sort_micro_batches=True,
    ),
}
# The linear probe's head (fit on 66,849 rows, L2 1e-4 chosen on dev) has large weights: MeZO at
# lr 3e-6 diverged from it (dev 81.6% -> 53% by step 1,000, training loss up to 66; a first try
# of this suite, 2026-12-07) and at 3e-7 drifted down (80.0% at step 250 to 76.0% at 1,750),
# so the SGD-type grids sit at the low end of MeZO's paper range (1e-7 to 1e-6).
CONVERGENCE_METHODS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "mezo": ({}, (3e-7, 1e-7)),  # (3e-7 first: it was under way)
    # 1e-6 and 3e-6 both held the probe's score (81.0, 81.2 dev) with the top of the grid best:
    # one step up, still inside MeZO-Adam's grid (1e-6 to 1e-3)
    "zo-adam": ({}, (1e-6, 3e-6, 1e-5)),
    # a fifth of the weights perturbed: MeZO's rates up to about 5x
    "sparse-mezo": ({}, (3e-7, 1e-6)),
    # the anchor's full-batch estimates over a fixed 1,024-row subset, refreshed every 50 steps
    "mezo-svrg": (dict(full_batch_rows=1024, extra={"refresh": 50}), (1e-7, 3e-7)),
    # the ablation: the same MeZO from a fresh (random) head instead of the linear probe's
    "mezo/fresh-head": (dict(init_head="fresh"), (1e-5, 1e-4)),
}  # fmt: skip
# After those: the FO baselines as MeZO's fine-tuning baseline runs them (linear decay,
# clipping at norm 1; 1,000 steps), then the newer methods with the strongest claims, FZOO at
# MeZO's budget of forward passes (9 a step: 1,111 steps), LOZO and HiZOO at MeZO's steps;
# last, FO-Adam from a fresh head, the FO side of the fresh-head ablation.
CONVERGENCE_FO = dict(
    steps=FO_STEPS, eval_every=50, lr_scheduler="linear", extra={"max_grad_norm": 1.0}
)
CONVERGENCE_LATER: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "fo-adam": (CONVERGENCE_FO, (1e-5, 3e-5)),
    "fo-sgd": (CONVERGENCE_FO, (1e-3, 1e-2)),
    "fzoo": (dict(steps=2 * ZO_STEPS // 9, eval_every=50), (1e-6, 1e-5)),
    "lozo": ({}, (1e-7, 3e-7)),
    "hizoo": ({}, (1e-7, 3e-7)),
    # the fresh-head ablation's FO side: does the probe's start matter to FO as it does to ZO
    # (ZO-Bench's task alignment: a well-posed start matters more to ZO than to FO)?
    "fo-adam/fresh-head": (dict(CONVERGENCE_FO, init_head="fresh"), (1e-5, 3e-5)),
}  # fmt: skip
SEEDS = (0, 1, 2)
# SST-2's runs begun after its first grids (every seed 1 and 2, and CONVERGENCE_LATER) cut each
# batch of 16 into 2 length-sorted micro-batches of 8: the same examples and mean loss (up to
# float rounding), 1.47x faster a step here (benchmarks/length_sorting.py --task sst2). The
# seed-0 grids of CONVERGENCE_METHODS had finished padded to each batch's longest; their ids,
# and so their results, stay as they are.
LATER_BATCHING: dict[str, dict[str, Any]] = {
    "sst2": dict(batch_size=8, grad_accum=2, sort_micro_batches=True)
}


def _convergence(out: Path) -> list[dict[str, Any]]:
    """Per task: the linear probe, every method's grid, then the seeds of the grids that have
    finished (so a run that is interrupted and resumed fills the grids first); then the same
    for the FO baselines and the newer methods."""
    runs: list[dict[str, Any]] = []
    for task, sizes in CONVERGENCE_TASKS.items():
        base = dict(CONVERGENCE, task=task, **sizes)
        runs.append(dict(base, method="linear-probe"))
        later = LATER_BATCHING.get(task, {})
        for methods in (CONVERGENCE_METHODS, CONVERGENCE_LATER):
            grids = []
            for label, (settings, lrs) in methods.items():
                method = label.split("/")[0]
                grid = []
                for lr in lrs:
                    run = dict(base, method=method, lr=lr, steps=ZO_STEPS, eval_every=250, seed=0)
                    run.update(settings, **(later if methods is CONVERGENCE_LATER else {}))
                    if method == "mezo-svrg":  # the full-batch step: 10x the minibatch rate
                        run["extra"] = dict(run["extra"], lr_full=10 * lr)
                    grid.append(run)
                grids.append(grid)
            runs += [run for grid in grids for run in grid]
            runs += [run for grid in grids for run in _seeds_at_best(grid, out, **later)]
    return runs


def _seeds_at_best(grid: list[dict[str, Any]], out: Path, **settings: Any) -> list[dict[str, Any]]:
    """Seeds 1, 2 at the grid's learning rate with the best dev score (with `settings` on top);
    none until every grid run has completed (the choice is made on dev, never on test)."""
    done = [_summary(out / "runs" / run_id(r)) for r in grid]
    if not all(d and d.get("status") == "completed" for d in done):
        return []
    best = max(range(len(grid)), key=lambda i: next(iter(done[i]["dev"].values())))  # type: ignore[index]
    return [dict(grid[best], seed=s, **settings) for s in SEEDS[1:]]


# The decoder suite: SmolLM2-135M with MeZO's prompts at MeZO's sizes (1,000 train / 500 dev /
# 1,000 test where the data allows; CB, COPA and WSC keep 100 dev rows, as MeZO's scripts do for
# CB and COPA). Learning rates are chosen on SST-2's dev over a two-point grid per method and
# scheme (seed 0); SST-2 then runs seeds 1 and 2 at the chosen rate, and every other task one
# seed at it. FO baselines as MeZO's fine-tuning baseline: linear decay, clipping at norm 1.
DECODER = dict(
    model="smollm2-135m", batch_size=16, eval_batch_size=32, num_train=1000, num_dev=500,
    num_test=1000, recipe="paper",
)  # fmt: skip
DECODER_TASKS = ("sst2", "rte", "cb", "boolq", "wic", "wsc", "copa", "multirc")
DECODER_DEV = {"cb": 100, "copa": 100, "wsc": 100}
FO = dict(lr_scheduler="linear", extra={"max_grad_norm": 1.0})
DECODER_METHODS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "mezo/lora": (dict(method="mezo", peft="lora", eps=1e-2, steps=2000), (1e-4, 1e-3)),
    "mezo/prefix": (dict(method="mezo", peft="prefix", eps=1e-1, steps=2000), (1e-2, 3e-2)),
    "mezo/full": (dict(method="mezo", peft="full", eps=1e-3, steps=2000), (1e-6, 1e-5)),
    "fo-adam/lora": (dict(method="fo-adam", peft="lora", steps=500, **FO), (1e-4, 1e-3)),
    "fo-adam/full": (dict(method="fo-adam", peft="full", steps=500, **FO), (1e-5, 3e-5)),
}  # fmt: skip


def _decoder(out: Path) -> list[dict[str, Any]]:
    """SST-2's baselines and grids, SST-2's seeds, then each other task's baselines and runs at
    the rates chosen on SST-2 (those appear once SST-2's grids have finished)."""
    runs: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    for task in DECODER_TASKS:
        base = dict(DECODER, task=task, num_dev=DECODER_DEV.get(task, DECODER["num_dev"]))
        demos = {"boolq": 16, "multirc": 8}.get(task, 32)  # what fits 8,192 tokens
        runs.append(dict(base, method="linear-probe") if task != "copa" else None)
        runs.append(dict(base, method="icl", max_length=8192, eval_batch_size=8, extra={"demos": demos}))  # fmt: skip
        for label, (settings, lrs) in DECODER_METHODS.items():
            evals = dict(eval_every=max(settings["steps"] // 10, 1), seed=0)
            if task == "sst2":
                grid = [dict(base, **settings, **evals, lr=lr) for lr in lrs]
                runs += grid
                seeds = _seeds_at_best(grid, out)
                later += seeds
                if seeds:
                    chosen[label] = seeds[0]["lr"]
            elif label in chosen:
                runs.append(dict(base, **settings, **evals, lr=chosen[label]))
        if task == "sst2":
            runs += later
    return [r for r in runs if r is not None]


def suite(name: str, out: Path) -> list[dict[str, Any]]:
    """The runs of a named suite (see docs/RESULTS.md for what each reproduces)."""
    if name == "smoke":
        tiny = make_tiny_model(out / "tiny-model")
        common = dict(
            model=tiny,
            task="sst2",
            steps=4,
            eval_every=2,
            batch_size=4,
            num_train=16,
            num_dev=8,
            num_test=8,
        )
        runs = [dict(common, method=m, lr=1e-3, eps=1e-2) for m in ("mezo", "zo-adam", "fo-sgd")]
        return runs + [dict(common, method="icl", extra={"demos": 2})]
    if name == "zo-bench":
        runs = [
            dict(BASE, num_dev=50, num_test=50, **equal_budget(m, s, 20, evals=1))
            for s, m in product(["prefix", "lora", "prompt", "full"], ZO_BENCH)
        ]
        empty = dict(BASE, num_dev=50, num_test=50, template="empty")
        runs += [dict(empty, **equal_budget("zo-sgd", "prefix", 20, evals=1))]
        runs += [
            dict(BASE, num_dev=50, num_test=50, **equal_budget(m, s, 20, evals=1))
            for s, m in product(["prefix", "lora"], NEWER)
        ]
        return runs
    if name == "mezo-svrg":
        runs = []
        for model, task, peft, budget, lr in [
            ("minilm-l6", "sst2", "full", 600, 1e-4),  # a fresh head: no prompt, all weights
            ("minilm-l6", "rte", "full", 200, 1e-4),
            ("smollm2-135m", "sst2", "prefix", 200, 3e-2),
        ]:
            common = dict(model=model, task=task, batch_size=16, num_train=256, num_test=200)
            for method in ("mezo", "mezo-svrg"):
                run = {**common, **equal_budget(method, peft, budget), "lr": lr, "num_dev": 100}
                if method == "mezo-svrg":
                    # an anchor refresh costs num_train / batch_size = 16 forward passes
                    run["extra"] = {"lr_full": lr * 10, "refresh": 10}
                    run["steps"] = budget // (4 + 16 // 10)
                runs.append(run)
        return runs
    if name == "sparse-mezo":
        runs = []
        # SmolLM2 (the paper's setting, full parameters) at what a CPU allows: RTE's premises
        # make a step ~4x dearer than SST-2's. MiniLM-L6 (a fresh head) is where 600 forward
        # passes move dev accuracy (see mezo-svrg), so forward passes to a target mean something.
        # The paper: Sparse MeZO tolerates larger learning rates than MeZO, so where runs are
        # cheap (MiniLM) every method gets the same two rates and the report picks on dev.
        for model, task, budget, lrs, extra in [
            ("smollm2-135m", "sst2", 200, (1e-5,), {}),
            ("smollm2-135m", "rte", 80, (1e-5,), {}),
            (
                "minilm-l6",
                "sst2",
                600,
                (1e-4, 5e-4),
                dict(batch_size=16, num_train=256, num_test=200),
            ),
        ]:
            for lr, method in product(lrs, ("mezo", "sparse-mezo", "r-mezo")):
                run = {**BASE, "model": model, "task": task, "num_test": 100, **extra}
                runs.append({**run, **equal_budget(method, "full", budget), "lr": lr})
        return runs
    if name == "convergence":
        return _convergence(out)
    if name == "decoder":
        return _decoder(out)
    if name == "superglue":
        runs = []
        for task in SUPERGLUE:
            common = dict(BASE, task=task, num_test=100, num_train=500)
            for peft in ("full", "lora", "prefix"):
                runs.append(dict(common, **equal_budget("mezo", peft, 40)))
            runs.append(dict(common, **equal_budget("fo-adam", "lora", 40)))
            runs.append(dict(common, method="linear-probe") if task != "copa" else None)
            # MeZO's ICL baseline: 32 demonstrations (BoolQ's and MultiRC's passages would allow
            # 16 and 8 within SmolLM2's 8192-token context)
            demos = {"boolq": 16, "multirc": 8}.get(task, 32)
            icl = dict(method="icl", max_length=8192, eval_batch_size=8, extra={"demos": demos})
            runs.append(dict(common, **icl))
        # SmolLM2-135M answers every SST-2 example with one label after 32 demonstrations: how
        # many demonstrations a 135M model can use is part of the picture
        runs.append(
            {
                **BASE,
                "task": "sst2",
                "num_test": 100,
                "num_train": 500,
                **icl,
                "extra": {"demos": 16},
            }
        )
        return [r for r in runs if r is not None]
    raise ConfigError(f"unknown suite '{name}': choose {', '.join(SUITES)}")


SUITES = (
    "smoke", "memory", "zo-bench", "mezo-svrg", "sparse-mezo", "superglue", "convergence", "decoder",
)  # fmt: skip


def run_id(run: dict[str, Any]) -> str:
    """The run's folder name: what it runs (model, task, method, scheme) and a hash of its
    settings; where the data lives (`data_dir`), where it computes (`device`: a run begun on a
    CPU can go on on a GPU) and when a plateau stops it (`patience`: the steps it does run are
    the same) are not part of it."""
    text = json.dumps(
        {k: v for k, v in run.items() if k not in ("data_dir", "device", "patience")},
        sort_keys=True,
        default=str,
    )
    name = f"{Path(str(run['model'])).name}-{Path(str(run['task'])).stem}-{run['method']}-{run.get('peft', 'full')}"
    return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def execute(
    runs: list[dict[str, Any]],
    out: Path,
    *,
    data_dir: str | None = None,
    quiet: bool = True,
    report_only: bool = False,
    lock_fd: int = -1,
) -> list[dict]:
    """Run each job in its own process (skipping finished ones) and collect the summaries;
    with `report_only`, collect the finished runs and run nothing. `lock_fd` (from `claim`)
    is passed on to the job's process."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs, 1):
        run = dict(run)
        if data_dir and "data_dir" not in run:
            run["data_dir"] = data_dir
        TrainConfig.from_dict(run).validate()
        rid = run_id(run)
        target = out / "runs" / rid
        status = _status(target)
        if report_only and status != "completed":
            print(f"[{i}/{len(runs)}] {rid} (not run yet)", flush=True)
            continue
        if status == "completed":
            print(f"[{i}/{len(runs)}] {rid} (done before)", flush=True)
        else:
            resume = (target / CHECKPOINT).is_dir()
            print(f"[{i}/{len(runs)}] {rid}{' (resumed)' if resume else ''}", flush=True)
            if resume:  # an interrupted run continues from its last checkpoint
                cmd = ["train", "--resume", str(target)]
            else:
                cfg_path = out / "configs" / f"{rid}.yaml"
                cfg_path.parent.mkdir(parents=True, exist_ok=True)
                cfg_path.write_text(yaml.safe_dump(run, sort_keys=True))
                shutil.rmtree(target, ignore_errors=True)  # stopped before its first checkpoint
                cmd = ["train", "--config", str(cfg_path), "--out", str(target)]
            cmd = [sys.executable, "-m", "zotune.cli", *cmd, *(["--quiet"] if quiet else [])]
            done, stopped = _run_child(cmd, quiet=quiet, lock_fd=lock_fd)
            if done.returncode != 0:
                err = (done.stderr or "").strip().splitlines()[-1:] or ["failed"]
                print(f"  failed: {err[0]}", flush=True)
                results.append({"id": rid, **run, "error": err[0]})
                if stopped or done.returncode in (130, 143):  # Ctrl-C / kill: stop, resumable
                    raise KeyboardInterrupt
                continue
            if stopped:  # the run ended as the signal came: stop before the next
                raise KeyboardInterrupt
        summary = json.loads((target / "summary.json").read_text())
        # the summary's `steps` are the steps run (a plateau may stop a run early); `max_steps`
        # keeps the steps asked for, which the run's setting is made of
        results.append({"id": rid, **run, **summary, "max_steps": run.get("steps")})
    return results


WAIT_SECONDS = 30.0  # a worker whose every run left is held by others looks again after this


@contextlib.contextmanager
def claim(out: Path, name: str, *, wait: bool = False) -> Iterator[int | None]:
    """Hold `<out>/locks/<name>` while the block runs. Yields the lock's file descriptor, to be
    passed on to the process doing the work (`execute(..., lock_fd=)`): the lock is then held
    until both have let go, so a killed worker's run stays taken while its `zotune train`
    still runs, and is free once both are gone. Yields None (without waiting, unless `wait`)
    when another worker holds it, and -1 where there are no locks (Windows)."""
    if fcntl is None:
        yield -1
        return
    (out / "locks").mkdir(parents=True, exist_ok=True)
    with open(out / "locks" / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        try:
            yield f.fileno()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_child(
    cmd: list[str], *, quiet: bool, lock_fd: int
) -> tuple[subprocess.CompletedProcess, bool]:
    """Run `zotune train` in its own session, so that a signal to this worker's process group
    (Ctrl-C, `timeout`) reaches it once, forwarded: it then checkpoints, and the worker waits
    for it before it stops (nothing is still writing the run when the worker's caller goes on).
    Returns the finished process and whether the worker was asked to stop meanwhile."""
    pipe = subprocess.PIPE if quiet else None
    keep = (lock_fd,) if lock_fd >= 0 else ()
    proc = subprocess.Popen(
        cmd, stdout=pipe, stderr=pipe, text=True, start_new_session=True, pass_fds=keep
    )

    got: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        got.append(signum)
        proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()  # where handlers can be set
    sigs = (signal.SIGINT, signal.SIGTERM) if main else ()
    handlers = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        out, err = proc.communicate()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    code = proc.returncode
    if got and code < 0:  # the signal came before the run could take it: its last checkpoint stands
        code, err = 128 + got[0], "zotune: stopped before its next checkpoint (the last one stands)"
    return subprocess.CompletedProcess(cmd, code, out, err), bool(got)


def _summary(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _status(target: Path) -> str | None:
    """A run directory's status ("running", "interrupted", "completed"), None if absent."""
    summary = _summary(target)
    return None if summary is None else summary.get("status", "completed")


def _curve(out: Path, r: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A run's dev evaluations (its metrics.jsonl rows with a dev score), None where the run's
    log was not kept (a run restored from a results.csv)."""
    try:
        log = (out / "runs" / r["id"] / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    return [x for x in map(json.loads, log) if "dev" in x]


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    """A results.csv row back as the nested record it was flattened from: empty cells dropped,
    booleans and numbers parsed (provenance's strings, a commit hash among them, kept), and each
    score's `metric` first again (the CSV's columns are sorted; the first score is the one
    reported and chosen on)."""
    record: dict[str, Any] = {}
    for key, text in row.items():
        if text == "":
            continue
        value: Any = text
        if text in ("True", "False"):
            value = text == "True"
        elif not key.startswith("provenance.") and key != "id":
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        *parents, leaf = key.split(".")
        node = record
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    metric = record.get("metric")
    for key, value in record.items():
        if isinstance(value, dict) and metric in value:
            record[key] = {metric: value[metric], **value}
    return record


# Where a run computed and read its data: the suite's own run says that on the new machine.
_NOT_RESTORED = {"id", "curve", "device", "data_dir"}


def restore(archive: str | os.PathLike, out: str | os.PathLike, *, dry_run: bool = False) -> int:
    """Take into `out` every finished run that `archive` (a suite's results folder, as committed
    from an earlier machine) records and `out` lacks; returns how many (with `dry_run`, how many
    it would take, writing nothing). A restored run is skipped by the workers, chosen from by
    the seeds' learning-rate choice and reported like any other. Its dev curve comes back from
    results.jsonl; from a results.csv (where only that was kept) its summary alone does, and the
    plots and the forward passes to a target leave it out. A run another worker holds is left
    to it, and a summary lands whole (renamed into place) or not at all."""
    archive, out = Path(archive), Path(out)
    if (archive / "results.jsonl").is_file():
        lines = (archive / "results.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines if x.strip()]
    elif (archive / "results.csv").is_file():
        with open(archive / "results.csv", newline="", encoding="utf-8") as f:
            records = [_from_csv(row) for row in csv.DictReader(f)]
    else:
        raise ConfigError(f"{archive}: no results.jsonl or results.csv to restore runs from")
    taken = 0
    for record in records:
        rid = str(record.get("id", ""))
        if not rid or rid != Path(rid).name or rid.startswith("."):
            raise ConfigError(
                f"{archive}: a record without a run id ({rid!r}): not a suite of runs"
            )
        done = "error" not in record and record.get("status", "completed") == "completed"
        target = out / "runs" / rid
        if not done or _status(target) == "completed":
            continue
        if dry_run:
            taken += 1
            continue
        with claim(out, rid) as fd:
            if fd is None:  # another worker is running it here: its own run stands
                continue
            shutil.rmtree(target, ignore_errors=True)  # an unfinished try: the archive's is done
            target.mkdir(parents=True)
            if record.get("curve") is not None:
                lines = [json.dumps(x) + "\n" for x in record["curve"]]
                (target / "metrics.jsonl").write_text("".join(lines))
            summary = {k: v for k, v in record.items() if k not in _NOT_RESTORED}
            summary.update(status="completed", restored_from=str(archive))
            _write_json(target / "summary.json", summary)  # last: the run is finished once it lands
            taken += 1
    return taken


def write_results(results: list[dict], out: Path, title: str) -> None:
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            curve = None if "error" in r or not r.get("steps") else _curve(out, r)
            f.write(json.dumps(r if curve is None else {**r, "curve": curve}, default=str) + "\n")
    flat = [_flatten(r) for r in results]
    keys = sorted({k for r in flat for k in r})
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    _report(results, out, title)
    _plots(results, out)
    groups = _seed_groups(results)
    if groups:
        with open(out / "report.md", "a", encoding="utf-8") as f:
            f.write("\n".join(_seed_table(groups)) + "\n")
        _band_plots(results, groups, out)


def _setting(r: dict[str, Any]) -> str:
    """A run's configuration without its seed or where it ran (as its id), with its whole batch
    in place of how that is cut into micro-batches (the same examples and loss), and with the
    steps asked for, not those a plateau (`patience`) let it run: the runs that differ only by
    seed share it."""
    skip = {"seed", "data_dir", "device", "grad_accum", "sort_micro_batches", "patience"}
    setting = {k: v for k, v in r.items() if k in TRAIN_KEYS and k not in skip}
    if "batch_size" in setting:
        setting["batch_size"] *= int(r.get("grad_accum") or 1)
    if r.get("max_steps") is not None:  # not the steps a plateau let it run
        setting["steps"] = r["max_steps"]
    return json.dumps(setting, sort_keys=True, default=str)


def _seed_groups(results: list[dict]) -> list[list[dict]]:
    """Finished trained runs that differ only by seed, two seeds or more per group."""
    by: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r and r.get("steps"):
            by.setdefault(_setting(r), []).append(r)
    return [g for g in by.values() if len(g) > 1]


def _mean_std(xs: list[float]) -> str:
    import statistics

    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * sd:.1f}"


def _passes(r: dict[str, Any], x: dict[str, Any]) -> float:
    """Forward passes over the step's whole batch (batch size x grad_accum rows), the papers'
    unit, at `x` (a metrics row, or the run's summary `r`): the rows the training passes read
    over the rows of a batch, so runs of one task compare whatever their micro-batching and
    however MeZO-SVRG chunks its anchor's full batch. Runs logged before rows were counted
    give model calls / grad_accum (a MeZO-SVRG run's anchor steps worked out from its calls)."""
    k = int(r.get("grad_accum") or 1)
    batch = int(r.get("batch_size") or TrainConfig.batch_size) * k
    if "rows" in x:
        n = x["rows"] / batch
    elif r.get("method") == "mezo-svrg":
        n = _svrg_passes(r, x, k, batch)
    else:
        n = x["forward_passes"] / k
    return int(n) if n == int(n) else round(n, 1)


def _anchor_rows(r: dict[str, Any]) -> int:
    """The rows of a MeZO-SVRG run's full-batch anchor: `full_batch_rows` of the training rows,
    or all of them."""
    n_train = int(r.get("num_train") or TrainConfig.num_train)
    picked = int(r.get("full_batch_rows") or 0)
    return min(picked, n_train) if picked else n_train


def _svrg_passes(r: dict[str, Any], x: dict[str, Any], k: int, batch: int) -> float:
    """A MeZO-SVRG run logged as calls: every `refresh`-th step from the first is an anchor step
    (2 passes over the anchor's rows, in chunks of the eval batch size), the others 4 passes over
    the batch (2 at θ, 2 at the anchor), each K calls. The log's calls must fit that schedule."""
    refresh = int((r.get("extra") or {}).get("refresh") or 2)
    step = int(x["step"] if "step" in x else x["steps"])  # a metrics row, or the summary
    rows, chunk = _anchor_rows(r), int(r.get("eval_batch_size") or TrainConfig.eval_batch_size)
    anchors = (step + refresh - 1) // refresh
    if x["forward_passes"] != 4 * k * (step - anchors) + anchors * 2 * -(-rows // chunk):
        raise ValueError(
            f"{r['id']}: {x['forward_passes']} calls by step {step} do not fit MeZO-SVRG's schedule"
        )
    return 4 * (step - anchors) + anchors * 2 * rows / batch


def _seed_table(groups: list[list[dict]]) -> list[str]:
    lines = [
        "",
        "Mean ± standard deviation over seeds (each method at the learning rate chosen on dev; "
        "forward passes and wall time: the mean over seeds, each run to its plateau stop):",
        "",
        "| model | task | method | head | lr | seeds | zero-shot dev | dev (best) | test (at best dev) | final dev | forward passes | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = lambda d: next(iter(d.values())) if d else float("nan")  # noqa: E731
    for g in groups:
        r = g[0]
        lines.append(
            f"| {Path(str(r['model'])).name} | {Path(str(r['task'])).stem} | {r['method']} | "
            f"{r.get('init_head', 'fresh')} | {r.get('lr', '')} | {len(g)} | "
            f"{_mean_std([first(x['zero_shot']) for x in g])} | {_mean_std([first(x['dev']) for x in g])} | "
            f"{_mean_std([first(x['test']) for x in g])} | {_mean_std([first(x['final_dev']) for x in g])} | "
            f"{sum(_passes(x, x) for x in g) / len(g):.0f} | {sum(x['wall_seconds'] for x in g) / len(g):.0f} |"
        )
    return lines


def _band_plots(results: list[dict], groups: list[list[dict]], out: Path) -> None:
    """Dev score against forward passes and against wall time, mean ± std over seeds as a band,
    one column per task; one-step baselines (linear probe) as levels. The second row zooms to
    ±5 points around where the runs start, where methods that hold their start are told apart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    # a group is drawn from the seeds whose curves were kept (runs restored from a results.csv
    # lost theirs), and its label says how many of its seeds that is
    drawn = [
        (kept, len(g)) for g in groups if (kept := [r for r in g if _curve(out, r) is not None])
    ]
    if not drawn:
        return
    tasks = sorted({str(g[0]["task"]) for g, _ in drawn})
    for x_key, fname, xlabel in [
        ("forward_passes", "dev_vs_forward_passes_seeds.png", "training forward passes"),
        ("elapsed", "dev_vs_wall_time_seeds.png", "wall time (s)"),
    ]:
        fig, axes = plt.subplots(
            2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False, height_ratios=[3, 2]
        )
        for col, task in enumerate(tasks):
            starts = []
            for g, total in ((g, n) for g, n in drawn if str(g[0]["task"]) == task):
                curves = []
                for r in g:
                    curve = [
                        (
                            _passes(r, x) if x_key == "forward_passes" else x[x_key],
                            next(iter(x["dev"].values())),
                        )
                        for x in _curve(out, r) or []
                    ]
                    if r.get("zero_shot"):  # where each seed starts (its own probe's head)
                        curve.insert(0, (0, next(iter(r["zero_shot"].values()))))
                    curves.append(curve)
                n = min(len(c) for c in curves)
                xs = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
                ys = 100 * np.array([[p[1] for p in c[:n]] for c in curves])
                starts.append(ys[:, 0].mean())
                head = (
                    ""
                    if g[0].get("init_head") == "linear-probe"
                    else f" ({g[0].get('init_head', 'fresh')} head)"
                )
                seeds = (
                    f"{len(g)} seeds"
                    if len(g) == total
                    else (f"{len(g)} of {total} seeds; the rest restored without their curves")
                )
                label = f"{g[0]['method']}{head} lr {g[0].get('lr')} ({seeds})"
                for ax in axes[:, col]:
                    line = ax.plot(xs, ys.mean(0), label=label)
                    ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2, color=line[0].get_color())  # fmt: skip
            for r in results:
                if "error" not in r and not r.get("steps") and str(r["task"]) == task:
                    # one seed's probe; the curves start at each seed's own
                    label = f"{r['method']} (seed {r.get('seed') or 0}'s split)"
                    for ax in axes[:, col]:
                        ax.axhline(100 * next(iter(r["dev"].values())), ls="--", lw=1, color="black", label=label)  # fmt: skip
            centre = float(np.median(starts))
            axes[0, col].set_title(Path(task).stem)
            axes[1, col].set_title(f"{Path(task).stem}, within 5 points of the runs' start")
            axes[1, col].set_ylim(centre - 5, centre + 5)
            for ax in axes[:, col]:
                ax.set_xlabel(xlabel)
                ax.set_ylabel("dev accuracy / F1 (%)")
        axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def _flatten(r: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in r.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            flat[f"{prefix}{k}"] = v
    return flat


def _metric(d: dict | None) -> str:
    if not d:
        return "-"
    k = next(iter(d))
    return f"{100 * d[k]:.1f}"


def _report(results: list[dict], out: Path, title: str) -> None:
    lines = [f"# {title}", ""]
    if any(int(r.get("grad_accum") or 1) > 1 or r["method"] == "mezo-svrg" for r in results):
        lines += [
            "Forward passes are passes over a step's whole batch (batch size x grad_accum rows): "
            "the rows the training passes read, over a batch's rows. A run that cuts its batch "
            "into K micro-batches makes K model calls a pass; a MeZO-SVRG anchor step reads its "
            "full batch twice, in chunks, and counts as many passes as it has batches' rows.",
            "",
        ]
    lines += [
        "| model | task | method | scheme | lr | steps | forward passes | zero-shot dev | dev | test | peak MB | s/step | step/forward time | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {Path(str(r['model'])).name} | {r['task']} | {r['method']} | {r.get('peft', 'full')} | {r.get('lr', '')} | failed: {r['error']} |||||||"
            )
            continue
        lines.append(
            f"| {Path(str(r['model'])).name} | {Path(str(r['task'])).stem}{' (empty template)' if r.get('template') == 'empty' else ''} | "
            f"{r['method']}{' ({} demos)'.format(r['demos']) if 'demos' in r else ''} | {r.get('peft', 'full')} | {r.get('lr', '') if r['steps'] else ''} | {r['steps']} | {_passes(r, r)} | {_metric(r.get('zero_shot'))} | "
            f"{_metric(r.get('dev'))} | {_metric(r.get('test'))} | {r['peak_memory_mb']:.0f} | {r['seconds_per_step']:.2f} | {r.get('step_to_forward_ratio', '-')} | {r.get('tokens_per_second', '-')} |"
        )
    lines += _to_target(results, out)
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _to_target(results: list[dict], out: Path) -> list[str]:
    """Per (model, task, scheme, head, seed) with a MeZO run: training forward passes each run
    needed to first reach MeZO's best dev score over its learning rates at that seed (Sparse
    MeZO's "faster to the same accuracy" claim). Per seed, because a seed draws its own dev rows:
    one seed's score is no target for another's. None where MeZO never beat its start."""
    rows = []
    trained = [r for r in results if "error" not in r and r.get("steps")]
    dev = lambda d: next(iter(d.values()))  # noqa: E731 - the one metric of a summary
    where = lambda r: (r["model"], r["task"], r.get("peft"), r.get("init_head"))  # noqa: E731
    for r in trained:
        refs = [
            m
            for m in trained
            if m["method"] == "mezo"
            and where(m) == where(r)
            and (m.get("seed") or 0) == (r.get("seed") or 0)
        ]
        if not refs:
            continue
        ref = max(refs, key=lambda m: dev(m["dev"]))
        target = dev(ref["dev"])
        if target <= dev(ref["zero_shot"]):
            continue  # MeZO never beat zero-shot: no target to reach
        curve = _curve(out, r)
        if curve is None:
            continue  # restored without its log: when it got there is not known
        hit = next((_passes(r, x) for x in curve if dev(x["dev"]) >= target), None)
        rows.append(
            f"| {Path(str(r['model'])).name} | {Path(str(r['task'])).stem} | {r['method']} | "
            f"{r.get('init_head') or '-'} | {r.get('lr', '')} | {r.get('seed', 0)} | "
            f"{100 * target:.1f} | {hit if hit is not None else 'not reached'} |"
        )
    if not rows:
        return []
    head = ["", "Forward passes to reach MeZO's best dev score (over its learning rates, from the same head, at the same seed):", "",
            "| model | task | method | head | lr | seed | target | forward passes |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    return head + rows


def _plots(results: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    several = len({r["model"] for r in ok}) > 1
    key = lambda r: (r["model"], r["task"], r["method"], r.get("peft"))  # noqa: E731
    rates = len({(key(r), r.get("lr")) for r in ok}) > len({key(r) for r in ok})
    seeds = len({r.get("seed") or 0 for r in ok}) > 1
    tasks = sorted({str(r["task"]) for r in ok}, key=lambda t: Path(t).stem)
    panels = len(tasks) > 1 and len(ok) > 20  # a long suite: one panel per task

    def name(r: dict, sep: str = " ") -> str:
        where = "" if panels else sep + Path(str(r["task"])).stem
        if several:
            where += f", {Path(str(r['model'])).name}"
        lr = f" lr {r.get('lr')}" if rates and r.get("steps") else ""
        seed = f" seed {r.get('seed') or 0}" if seeds and r.get("steps") else ""
        return f"{r['method']}/{r.get('peft', 'full')}{lr}{seed}{where}"

    groups = [[r for r in ok if str(r["task"]) == t] for t in tasks] if panels else [ok]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        # one colour per run, baselines included (axhline does not advance the colour cycle);
        # past 20 runs the colours repeat with another marker
        colors = plt.cm.tab20.colors if len(group) > 10 else plt.cm.tab10.colors
        for i, r in enumerate(group):
            label, color = name(r), colors[i % len(colors)]
            if r["steps"] == 0:  # a baseline (ICL, linear probe): one accuracy, drawn as a level
                level = 100 * next(iter(r["dev"].values()))
                ax.axhline(level, ls="--", lw=1, color=color, label=label)
                continue
            rows = _curve(out, r)
            if rows is None:  # restored without its log
                continue
            pts = [(0, next(iter(r["zero_shot"].values())))] + [
                (_passes(r, x), next(iter(x["dev"].values()))) for x in rows
            ]
            ax.plot(
                [p[0] for p in pts],
                [100 * p[1] for p in pts],
                marker="os^Dv"[i // len(colors) % 5],
                ms=3,
                label=label,
                color=color,
            )
        title = [Path(str(group[0]["task"])).stem] if panels else []
        lost = sum(r["steps"] > 0 and _curve(out, r) is None for r in group)
        if lost:  # say so on the panel, rather than leave it looking as if nothing ran
            title.append(f"({lost} runs restored without their curves: results.csv rows only)")
        ax.set_title("\n".join(title), fontsize=10)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("dev accuracy / F1 (%)")
        if ax.get_legend_handles_labels()[0]:  # none where every run was restored without a log
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "dev_vs_forward_passes.png", dpi=120)
    plt.close(fig)
    for key, fname, label in [
        ("peak_memory_mb", "peak_memory.png", "peak resident memory (MB)"),
        ("seconds_per_step", "seconds_per_step.png", "seconds per step"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [name(r, "\n") for r in ok]
        ax.bar(range(len(ok)), [r[key] for r in ok])
        ax.set_xticks(range(len(ok)), names, rotation=90, fontsize=6)
        ax.set_ylabel(label)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def run_suite(
    name: str,
    out: str | os.PathLike,
    *,
    data_dir: str | None = None,
    dry_run: bool = False,
    report_only: bool = False,
    device: str | None = None,
    restore_from: str | os.PathLike | None = None,
) -> list[dict]:
    """Run a named suite into `out` and write its results; returns one dict per run.
    `report_only` writes the report from the runs finished so far (an interrupted grid);
    `device` (auto, cpu, cuda, cuda:N, mps) where every run computes (default: auto);
    `restore_from` a results folder whose finished runs `out` takes first (see `restore`)."""
    out = Path(out)
    if restore_from is not None:
        if name == "memory":
            raise ConfigError("the memory suite measures, it has no finished runs to restore")
        if dry_run:
            print(f"would restore {restore(restore_from, out, dry_run=True)} finished runs")
        else:
            with claim(out, "report", wait=True):  # not while another worker writes the report
                print(f"restored {restore(restore_from, out)} finished runs from {restore_from}")
    if name == "memory":
        from .memory import BASES, memory_suite

        return memory_suite(out, device=device or "auto", bases=BASES)

    def derive() -> list[dict[str, Any]]:
        runs = suite(name, out)
        return runs if device is None else [{**run, "device": device} for run in runs]

    runs = derive()
    if dry_run:
        for run in runs:
            print(run_id(run), json.dumps(run, default=str))
        return []
    if not report_only:
        # one run at a time, the suite derived again after each: a suite may add runs that
        # depend on finished ones (the convergence suite's seeds at the rate chosen on dev).
        # A run another worker holds is skipped; when every run left is held, wait for one.
        tried: set[str] = set()  # run by this worker (a failed run is not retried by it)
        while True:
            runs = derive()
            todo = [
                r for r in runs
                if run_id(r) not in tried and _status(out / "runs" / run_id(r)) != "completed"
            ]  # fmt: skip
            if not todo:
                break
            for run in todo:
                rid = run_id(run)
                with claim(out, rid) as fd:
                    if fd is None:
                        continue
                    tried.add(rid)
                    print(f"{len(runs) - len(todo) + 1}/{len(runs)}:", end=" ", flush=True)
                    execute([run], out, data_dir=data_dir, lock_fd=fd)
                    break
            else:
                time.sleep(WAIT_SECONDS)
    with claim(out, "report", wait=True):  # workers finishing together write one at a time
        runs = derive()
        results = execute(runs, out, data_dir=data_dir, report_only=True)
        done = sum("error" not in r for r in results)
        title = f"zotune bench {name}" + (
            f" ({done} of {len(runs)} runs)" if done < len(runs) else ""
        )
        write_results(results, out, title)
    return results


__all__ = ["claim", "execute", "make_tiny_model", "restore", "run_suite", "suite", "write_results"]
