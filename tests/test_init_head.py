"""--init-head linear-probe (LP then ZO): a classifier's head fit by logistic regression on the
inputs it consumes, deterministically, so resumed and replayed runs rebuild the same start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.probe import _labels, _select, classifier_head, head_inputs
from zotune.runs import load_run_model, open_run
from zotune.train import ConfigError, TrainConfig, load_for


def config(model: str, **settings) -> TrainConfig:
    values = dict(model=model, task="sst2", num_train=64, num_dev=32, num_test=16, batch_size=8)
    cfg = TrainConfig(**{**values, **settings})
    cfg.validate()
    return cfg


def head_of(loaded) -> dict[str, torch.Tensor]:
    head = classifier_head(loaded.model)
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}


def test_linear_probe_head_is_the_probe_and_is_deterministic(tiny_bert_dir, capsys):
    fresh_task, fresh, _ = load_for(config(tiny_bert_dir))
    assert fresh.kind == "classifier"
    # the probe fit on the fresh model's head inputs (the encoder is the same either way)
    xs = [head_inputs(fresh, s) for s in (fresh_task.train, fresh_task.dev)]
    best, fit, mean, std = _select(xs, [_labels(fresh_task.train), _labels(fresh_task.dev)], 2)

    task, loaded, objective = load_for(config(tiny_bert_dir, init_head="linear-probe"))
    assert "linear-probe head: train" in capsys.readouterr().err
    assert objective.evaluate(task.train)["accuracy"] == pytest.approx(best["train"]["accuracy"])
    assert objective.evaluate(task.dev)["accuracy"] == pytest.approx(best["dev"]["accuracy"])
    with torch.no_grad():  # the folded standardization gives the probe's logits
        folded = classifier_head(loaded.model)(xs[0])
        torch.testing.assert_close(folded, fit((xs[0] - mean) / std), rtol=1e-4, atol=1e-4)
    first = head_of(loaded)
    assert not torch.equal(first["weight"], head_of(fresh)["weight"])
    _, again, _ = load_for(config(tiny_bert_dir, init_head="linear-probe"))
    second = head_of(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    encoder = dict(loaded.model.bert.named_parameters())  # only the head changed
    assert all(torch.equal(p, encoder[n]) for n, p in fresh.model.bert.named_parameters())


def test_linear_probe_head_before_lora(tiny_bert_dir):
    _, full, _ = load_for(config(tiny_bert_dir, init_head="linear-probe"))
    _, lora, _ = load_for(config(tiny_bert_dir, init_head="linear-probe", peft="lora"))
    heads = {
        n: p for n, p in lora.model.named_parameters() if "classifier" in n and "original" in n
    }
    assert heads, "peft keeps a copy of the classifier head"
    expected = head_of(full)
    for name, p in heads.items():
        assert torch.equal(p, expected["bias" if name.endswith("bias") else "weight"])


def test_linear_probe_head_needs_a_classifier(tiny_model_dir, tiny_bert_dir):
    with pytest.raises(ConfigError, match="needs a classifier model, .* kind causal"):
        load_for(config(tiny_model_dir, init_head="linear-probe"))
    with pytest.raises(ConfigError, match="unknown --init-head 'probe': choose fresh or linear"):
        config(tiny_bert_dir, init_head="probe")


def train_args(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--task", "sst2", "--init-head", "linear-probe",
        "--steps", "24", "--eval-every", "4", "--batch-size", "4", "--lr", "1e-3",
        "--eps", "1e-2", "--num-train", "32", "--num-dev", "16", "--num-test", "16",
        "--save-every", "3", "--save-weights", "--keep", "final", "--out", str(out),
        "--quiet", *extra,
    ]  # fmt: skip


def test_linear_probe_run_replays_and_resumes(tiny_bert_dir, tmp_path):
    """The LP head is rebuilt bit for bit: replaying a run's trajectory onto `load_for`'s model
    gives the trained weights, and a SIGTERMed MeZO-SVRG run resumes to the same end."""
    extra = ("--method", "mezo-svrg", "--set", "refresh=4")
    ref = tmp_path / "ref"
    assert main(train_args(tiny_bert_dir, ref, *extra)) == 0
    summary = json.loads((ref / "summary.json").read_text())
    saved = load_file(str(ref / "weights.safetensors"))

    mezo = tmp_path / "mezo"
    assert main(train_args(tiny_bert_dir, mezo, "--steps", "6")) == 0
    assert open_run(mezo).replayable
    final = dict(load_run_model(mezo, "final")[2].model.named_parameters())
    weights = load_file(str(mezo / "weights.safetensors"))
    assert all(torch.equal(final[k], weights[k]) for k in weights)
    start = dict(load_run_model(mezo, 0)[2].model.named_parameters())
    assert not torch.equal(start["classifier.weight"], weights["classifier.weight"])

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "zotune.cli", *train_args(tiny_bert_dir, out, *extra)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8):
        assert proc.poll() is None, proc.stderr.read().decode()[-500:]
        assert time.time() < deadline, "the run did not reach step 8 in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    resumed = load_file(str(out / "weights.safetensors"))
    assert saved.keys() == resumed.keys()
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    done = json.loads((out / "summary.json").read_text())
    for key in ("status", "zero_shot", "dev", "test", "best_step", "final_dev"):
        assert done[key] == summary[key], key


def test_linear_probe_features_are_cached_across_runs(tiny_bert_dir, tmp_path, monkeypatch):
    """A grid of LP-then-ZO runs computes the frozen encoder's features once: the second load
    reads them from ZOTUNE_CACHE and fits the same head; ZOTUNE_CACHE=off keeps nothing."""
    import zotune.probe as probe

    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    _, first, _ = load_for(config(tiny_bert_dir, init_head="linear-probe"))
    assert len(list((tmp_path / "probe").glob("*.pt"))) == 2  # train and dev

    def no_forward(*args, **kw):
        raise AssertionError("the features were computed again")

    monkeypatch.setattr(probe, "head_inputs", no_forward)
    _, again, _ = load_for(config(tiny_bert_dir, init_head="linear-probe"))
    assert all(torch.equal(head_of(first)[k], head_of(again)[k]) for k in ("weight", "bias"))
    monkeypatch.undo()
    monkeypatch.setenv("ZOTUNE_CACHE", "off")
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("HOME", str(other))
    load_for(config(tiny_bert_dir, init_head="linear-probe", seed=1))
    assert not other.exists()


def test_the_linear_probe_baseline_is_where_lp_then_zo_starts(tiny_bert_dir, tmp_path):
    """`--method linear-probe` on a classifier probes the head's own inputs, so its dev and test
    scores are an LP-then-ZO run's step 0 (before, it probed the [CLS] state, not the pooler's)."""
    common = ("--eval-batch-size", "16", "--eval-every", "1", "--steps", "1", "--keep", "best")
    lp, zo = tmp_path / "lp", tmp_path / "zo"
    assert main([*train_args(tiny_bert_dir, lp, "--method", "linear-probe"), *common]) == 0
    assert main([*train_args(tiny_bert_dir, zo, "--method", "mezo"), *common]) == 0
    probe, start = (json.loads((d / "summary.json").read_text()) for d in (lp, zo))
    assert probe["dev"] == pytest.approx(start["zero_shot"])
    assert probe["test"] == pytest.approx(start["zero_shot_test"])
