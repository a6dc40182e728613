"""The `zotune` command end to end on a tiny random model: files, replay, eval, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main

SMALL = ["--num-train", "48", "--num-dev", "24", "--num-test", "24", "--eval-batch-size", "24"]


def train_args(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        model,
        "--task",
        "sst2",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--eps",
        "1e-3",
        "--peft",
        "full",
        "--out",
        str(out),
        "--quiet",
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(tiny_model_dir, out, "--save-weights")) == 0
    return out


def test_train_writes_consistent_files(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "trajectory.zot",
        "summary.json",
        "weights.safetensors",
    } <= names
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "dev" in r] == [3, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("model", "task", "method", "steps", "forward_passes", "zero_shot", "dev", "test"):
        assert key in summary
    assert summary["steps"] == 6 and summary["method"] == "mezo" and summary["task"] == "sst2"
    assert summary["forward_passes"] == rows[-1]["forward_passes"] == 12  # 2 per MeZO step
    assert summary["rows"] == rows[-1]["rows"] == 12 * 8  # each pass reads the batch of 8
    assert 0 <= summary["dev"]["accuracy"] <= 1 and "accuracy" in summary["test"]
    assert summary["dev"]["accuracy"] >= summary["zero_shot"]["accuracy"]  # best-on-dev
    assert summary["peak_memory_mb"] > 0 and summary["wall_seconds"] > 0
    assert all(r["elapsed"] > 0 and "loss" in r for r in rows)
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_replay_rebuilds_the_saved_weights_bit_for_bit(run_dir, tmp_path, capsys):
    """--save-weights keeps the best-on-dev step (--keep best): replay rebuilds it exactly."""
    out = tmp_path / "weights"
    assert main(["replay", str(run_dir), "--out", str(out)]) == 0
    rebuilt = load_file(str(out / "weights.safetensors"))
    saved = load_file(str(run_dir / "weights.safetensors"))
    assert rebuilt.keys() == saved.keys()
    assert all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    assert main(["replay", str(run_dir), "--out", str(tmp_path / "final"), "--keep", "final"]) == 0
    final = load_file(str(tmp_path / "final" / "weights.safetensors"))
    base = load_file(
        os.path.join(
            json.loads((run_dir / "summary.json").read_text())["model"], "model.safetensors"
        )
    )
    assert any(
        not torch.equal(final[k], base[k]) for k in final if k in base
    )  # training moved them


def test_eval_of_a_run_reproduces_its_best_and_final_dev_accuracy(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    for keep, step, dev in [("final", 6, "final_dev"), ("best", summary["best_step"], "dev")]:
        capsys.readouterr()
        args = ["eval", "--run", str(run_dir), "--split", "dev"]
        assert main([*args, "--keep", keep] if keep == "final" else args) == 0  # best: default
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["step"] == step
        assert result["dev"]["accuracy"] == pytest.approx(summary[dev]["accuracy"])


def test_eval_of_a_base_model_and_icl(tiny_model_dir, capsys):
    args = [
        "eval",
        "--model",
        tiny_model_dir,
        "--task",
        "sst2",
        "--num-dev",
        "16",
        "--split",
        "dev",
    ]
    assert main(args) == 0
    assert main([*args, "--demos", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["demos"] == 4 and "accuracy" in json.loads(lines[-1])["dev"]


def test_config_file_and_custom_yaml_task(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["text,label"] + [
        f"{'good fun' if i % 2 else 'bad dull'} film {i},{i % 2}" for i in range(40)
    ]
    for split in ("train", "dev", "test"):
        (data / f"{split}.csv").write_text("\n".join(rows) + "\n")
    task = data / "task.yaml"
    task.write_text(
        "name: mini\ntrain: train.csv\ndev: dev.csv\ntest: test.csv\n"
        "template: '{text} It was'\nlabel_column: label\nlabel_words: {0: bad, 1: great}\n"
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ntask: {task}\nsteps: 4\neval_every: 2\npeft: full\nbatch_size: 4\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "accuracy" in summary["test"]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "no-such-model-here"], "model"),
        (["--task", "sst3"], "unknown task"),
        (["--method", "mezzo"], "unknown method"),
        (["--eps", "0"], "eps"),
        (["--eps", "-1"], "eps"),
        (["--batch-size", "1000"], "batch-size"),
        (["--data-dir", "EMPTY"], "missing data file"),
        (["--steps", "0"], "steps"),
        (["--set", "momentum=0.9"], "--set: unknown hyperparameter 'momentum' for mezo: valid"),
        (["--set", "lr=1"], "set lr with --lr, not --set"),
        (["--method", "mezo-svrg", "--set", "lr_full=fast"], "lr_full must be a number"),
        (["--method", "zo-sgd-mmt", "--set", "momentun=0.5"], "valid ones are momentum, mask"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    tiny_model_dir, tmp_path, capsys, change, message
):
    out = tmp_path / "run"
    change = [str(tmp_path) if c == "EMPTY" else c for c in change]
    args = train_args(tiny_model_dir, out) + change
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zotune: error:") and message in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_set_values_are_checked_and_converted_like_the_python_api():
    from zotune.cli import _parse_value
    from zotune.train import ConfigError, TrainConfig

    extra = {"lr_full": _parse_value("1e-5"), "refresh": _parse_value("3")}  # YAML: "1e-5" is text
    cfg = TrainConfig(method="mezo-svrg", extra=extra)
    cfg.validate()
    assert cfg.extra == {"lr_full": 1e-5, "refresh": 3}
    cfg = TrainConfig(method="icl", extra={"demos": "4"})
    cfg.validate()
    assert cfg.extra == {"demos": 4}
    cfg = TrainConfig(method="fo-adam", extra={"eps": 1e-6})  # Adam's own eps, not --eps
    cfg.validate()
    with pytest.raises(ConfigError, match="'demos' for linear-probe: valid ones are none"):
        TrainConfig(method="linear-probe", extra={"demos": 4}).validate()


def test_malformed_row_exits_2(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text(
        "sentence\tlabel\na fine film\t1\nbroken row without label\n"
    )
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, out, "--data-dir", str(tmp_path))) == 2
    assert "malformed" in capsys.readouterr().err and not out.exists()


def test_console_script_reports_errors_with_exit_code_2(tmp_path):
    exe = Path(sys.executable).with_name("zotune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "zotune.cli"]
    done = subprocess.run(
        [*cmd, "train", "--method", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown method 'nope'" in done.stderr
    assert not (tmp_path / "x").exists()


ALL_METHODS = ["mezo", "zo-sgd", "zo-sgd-mmt", "zo-sgd-sign", "zo-sgd-cons", "zo-adam", "forward-grad",
               "mezo-svrg", "sparse-mezo", "r-mezo", "zo-blockwise", "hybrid-zo-fo", "fo-sgd", "fo-adam"]  # fmt: skip


@pytest.mark.parametrize("peft", ["full", "lora", "prefix", "prompt"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_and_scheme_trains_end_to_end(tiny_model_dir, tmp_path, capsys, method, peft):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--task", "sst2", "--method", method, "--peft", peft,
            "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3", "--eps", "1e-2",
            "--num-train", "12", "--num-dev", "8", "--num-test", "8", "--out", str(out), "--quiet"]  # fmt: skip
    code = main(args)
    if method == "hybrid-zo-fo" and peft in ("prefix", "prompt"):  # one tensor: nothing to split
        assert code == 2 and "hybrid-zo-fo needs" in capsys.readouterr().err
        return
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["peft"] == peft and summary["forward_passes"] > 0
    replayable = method not in ("hybrid-zo-fo", "fo-sgd", "fo-adam")
    assert (out / "trajectory.zot").exists() == replayable


def test_bench_smoke_suite(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "smoke", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"mezo", "zo-adam", "fo-sgd", "icl"}
    assert all(
        "error" not in r and r["forward_passes"] > 0 and r["peak_memory_mb"] > 0 for r in rows
    )
    trained = [r for r in rows if r["method"] != "icl"]
    assert all(r["step_to_forward_ratio"] > 1 for r in trained)  # a step contains its forwards
    assert all(r["tokens_per_second"] > 0 for r in trained)  # the tokens the steps read
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "dev.accuracy" in header and "seconds_per_step" in header
    report = (out / "report.md").read_text()
    assert "| mezo |" in report and "| icl (2 demos) |" in report
    for png in ("dev_vs_forward_passes.png", "peak_memory.png", "seconds_per_step.png"):
        assert (out / png).stat().st_size > 1000
    capsys.readouterr()
    assert main(["bench", "smoke", "--out", str(out)]) == 0  # finished runs are not redone
    assert capsys.readouterr().out.count("(done before)") == 4
    shutil.rmtree(next((out / "runs").glob("*-icl-*")))  # as if the grid had been interrupted
    assert main(["bench", "smoke", "--out", str(out), "--report-only"]) == 0
    assert "(not run yet)" in capsys.readouterr().out
    assert "(3 of 4 runs)" in (out / "report.md").read_text()


def test_bench_rejects_unknown_suite(tmp_path, capsys):
    assert main(["bench", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_non_differentiable_objective_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(train_args(tiny_model_dir, out, "--objective", "accuracy", "--method", "zo-sgd")) == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= r["loss"] <= 0 for r in rows)  # the loss is minus the batch accuracy


def test_linear_probe_baseline(tiny_model_dir, tmp_path):
    out = tmp_path / "lp"
    assert main(train_args(tiny_model_dir, out, "--method", "linear-probe")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "linear-probe" and summary["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert 0 <= summary["dev"]["accuracy"] <= 1 and "accuracy" in summary["test"]
    assert not (out / "trajectory.zot").exists()


def test_memory_suite_measures_each_cell_in_its_own_process(tiny_model_dir, tmp_path):
    from zotune.bench.memory import memory_suite

    methods = ("forward", "mezo", "fo-adam")
    rows = memory_suite(tmp_path, model=tiny_model_dir, batches=(2,), seqs=(8,), methods=methods)
    assert all("error" not in r and r["peak_mb"] > 0 and r["loaded_mb"] > 0 for r in rows), rows
    assert [r["method"] for r in rows] == list(methods)
    assert "| 8 | 2 | " in (tmp_path / "report.md").read_text()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + len(methods)
    assert (tmp_path / "peak_memory.png").stat().st_size > 1000
    again = memory_suite(tmp_path, model=tiny_model_dir, batches=(2,), seqs=(8,), methods=methods)
    assert again == rows  # finished cells are read back, not measured again
