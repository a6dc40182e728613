"""The training loop's schedules and gradient accumulation, from the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zotune.cli import main
from zotune.engine.estimators import MicroBatches
from zotune.optim import build
from zotune.optim.replay import replay  # noqa: F401  (the trajectory records the lr in force)


def run(model: str, out: Path, *extra: str) -> list[dict]:
    args = [
        "train", "--model", model, "--task", "sst2", "--steps", "10", "--eval-every", "10",
        "--peft", "full", "--lr", "1e-3", "--eps", "1e-2", "--num-train", "32", "--num-dev", "16",
        "--num-test", "16", "--eval-batch-size", "16", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_with_warmup(tiny_model_dir, tmp_path, schedule):
    rows = run(
        tiny_model_dir, tmp_path / "run", "--batch-size", "4",
        "--lr-scheduler", schedule, "--warmup-steps", "2",
    )  # fmt: skip
    lrs = [r["lr"] for r in rows]
    expected = []
    for t in range(10):
        done = (t - 2) / 8
        factor = (
            t / 2 if t < 2
            else 1.0 if schedule == "constant"
            else 1 - done if schedule == "linear"
            else 0.5 * (1 + math.cos(math.pi * done))
        )  # fmt: skip
        expected.append(1e-3 * factor)
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_grad_accumulation_is_one_k_times_larger_batch(tiny_model_dir, tmp_path):
    """K micro-batches of b under one direction: 2K forward passes a MeZO step, and the same
    projected gradient as one batch of K·b up to float rounding (padding differs per batch)."""
    accum = run(tiny_model_dir, tmp_path / "a", "--batch-size", "4", "--grad-accum", "2")
    whole = run(tiny_model_dir, tmp_path / "b", "--batch-size", "8")
    assert [r["forward_passes"] for r in accum] == [4 * (i + 1) for i in range(10)]
    assert [r["forward_passes"] for r in whole] == [2 * (i + 1) for i in range(10)]
    assert accum[0]["loss"] == pytest.approx(whole[0]["loss"], rel=1e-5)
    assert accum[0]["grad_norm"] == pytest.approx(whole[0]["grad_norm"], rel=1e-3)


def test_sorted_micro_batches_are_the_batch_by_length_with_the_same_loss(tiny_model_dir, tmp_path):
    from zotune.tasks.base import Example
    from zotune.train import micro_batches

    batch = [Example(prompt="x" * n, label=i) for i, n in enumerate([5, 1, 3, 1, 9, 2])]
    assert micro_batches(batch, 3) == [batch[0:2], batch[2:4], batch[4:6]]
    cut = micro_batches(batch, 3, sort=True)
    assert [[ex.label for ex in m] for m in cut] == [[1, 3], [5, 2], [0, 4]]  # ties keep data order
    # the same examples in a step, so the same mean loss up to float rounding
    accum = run(tiny_model_dir, tmp_path / "a", "--batch-size", "4", "--grad-accum", "2")
    ordered = run(
        tiny_model_dir, tmp_path / "s", "--batch-size", "4", "--grad-accum", "2",
        "--sort-micro-batches",
    )  # fmt: skip
    assert [r["forward_passes"] for r in ordered] == [r["forward_passes"] for r in accum]
    assert ordered[0]["loss"] == pytest.approx(accum[0]["loss"], rel=1e-5)
    assert ordered[0]["tokens"] == accum[0]["tokens"]


def test_sorting_micro_batches_needs_more_than_one(tiny_model_dir, tmp_path, capsys):
    args = [
        "train",
        "--model",
        tiny_model_dir,
        "--sort-micro-batches",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 2
    assert "give --grad-accum 2 or more" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_first_order_accumulation_backpropagates_each_micro_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    results = []
    for parts in (1, 2):
        model = torch.nn.Linear(5, 1)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.constant_(model.bias, 0.0)
        opt = build("fo-sgd", model.parameters(), lr=0.1)
        losses = [
            lambda i=i, m=model, k=parts: torch.nn.functional.mse_loss(
                m(x[i * 8 // k : (i + 1) * 8 // k]),
                y[i * 8 // k : (i + 1) * 8 // k],
            )
            for i in range(parts)
        ]
        loss = opt.step(MicroBatches(losses) if parts > 1 else losses[0])
        results.append((loss, model.weight.detach().clone(), opt.forward_passes))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)
    assert (results[0][2], results[1][2]) == (1, 2)


def test_patience_stops_on_a_plateau_with_the_same_steps(tiny_model_dir, tmp_path):
    """With lr 0 dev never beats the start: --patience 2 at --eval-every 2 stops after step 4
    (two evaluations with no new best), having run exactly the steps a run without it runs."""
    settings = ("--batch-size", "4", "--lr", "0", "--eval-every", "2")
    stopped = run(tiny_model_dir, tmp_path / "p", *settings, "--patience", "2")
    full = run(tiny_model_dir, tmp_path / "f", *settings)
    assert [r["step"] for r in stopped] == [1, 2, 3, 4] and len(full) == 10
    assert stopped == [
        dict(r, elapsed=s["elapsed"], seconds=s["seconds"]) for r, s in zip(full, stopped)
    ]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert "2 evaluations" in summary["stopped_early"] and summary["best_step"] == 0
    assert "stopped_early" not in json.loads((tmp_path / "f" / "summary.json").read_text())


def test_bad_loop_settings_exit_2(tiny_model_dir, tmp_path, capsys):
    bad_settings = (
        ["--lr-scheduler", "step"], ["--grad-accum", "0"], ["--keep", "last"], ["--patience", "0"],
    )  # fmt: skip
    for bad in bad_settings:
        out = tmp_path / bad[0].strip("-")
        assert main(["train", "--model", tiny_model_dir, "--out", str(out), *bad]) == 2
        assert not out.exists()


def test_report_to_tensorboard_logs_the_loop_and_provenance(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = run(tiny_model_dir, out, "--batch-size", "4", "--report-to", "tensorboard")
    assert len(rows) == 10 and all("grad_norm" in r and "lr" in r for r in rows)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "forward_passes", "dev/accuracy"} <= tags
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {"zotune", "torch", "transformers", "command", "host"} <= set(summary["provenance"])


def test_full_batch_rows_is_a_fixed_seeded_subset_of_the_training_set():
    """MeZO-SVRG's large-batch variant: --full-batch-rows N reads the same N training rows at
    every anchor (drawn from --seed), all rows with 0; a negative count is a one-line error."""
    from types import SimpleNamespace

    from zotune.tasks.base import Example
    from zotune.train import ConfigError, TrainConfig, full_batch_loss

    seen: list[list[int]] = []

    class Counting:  # an objective whose loss is the mean label of the chunk
        def loss(self, chunk):
            seen[-1].extend(ex.label for ex in chunk)
            return torch.tensor(sum(ex.label for ex in chunk) / len(chunk))

    # rows of one length: batching by length keeps their data order
    task = SimpleNamespace(train=[Example(prompt="", label=i) for i in range(100)])
    for rows, seed in [(0, 0), (10, 0), (10, 0), (10, 1)]:
        cfg = TrainConfig(full_batch_rows=rows, seed=seed, eval_batch_size=4)
        seen.append([])
        value = full_batch_loss(Counting().loss, task, cfg)()
        assert value == pytest.approx(sum(seen[-1]) / len(seen[-1]))
    assert seen[0] == list(range(100))
    assert len(seen[1]) == 10 and seen[1] == seen[2] and seen[1] != seen[3]
    with pytest.raises(ConfigError, match="--full-batch-rows"):
        TrainConfig(full_batch_rows=-1).validate()
