"""Settings: typed YAML and flags, help for every flag, bare `zotune`, --lora-targets,
--gguf-file, and one-line errors for every model that cannot be loaded."""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from zotune.cli import main
from zotune.settings import coerce
from zotune.train import DEMO, ConfigError, TrainConfig


def tiny_train(model: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--task", "sst2", "--steps", "2", "--eval-every", "2",
            "--batch-size", "4", "--num-train", "16", "--num-dev", "8", "--num-test", "8",
            "--lr", "1e-3", "--out", str(out), "--quiet", *extra]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zotune: error: "), err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- typed values


def test_yaml_values_take_the_fields_types(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "lr: 1e-6\neps: 1E-3\nweight-decay: 0\nsteps: 1e3\nsave_weights: 'true'\n"
        "threads: null\npeft: lora\nlora_targets: q_proj, v_proj\nnum_virtual_tokens: '7'\nout: 2024\n"
    )
    cfg = TrainConfig.from_dict(TrainConfig.from_yaml(config))
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)  # YAML 1.1: "1e-6" is a string
    assert cfg.eps == 1e-3 and cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.save_weights is True and cfg.threads is None
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.num_virtual_tokens == 7
    assert cfg.out == "2024"
    cfg.validate()
    listed = TrainConfig.from_dict({"lora_targets": ["q_proj", "k_proj"], "save_weights": "no"})
    assert listed.lora_targets == ["q_proj", "k_proj"] and listed.save_weights is False


def test_the_python_api_values_are_converted_by_validate():
    cfg = TrainConfig(lr="1e-4", steps="20", save_weights="yes", peft="lora", lora_targets="q_proj")
    cfg.validate()
    assert (cfg.lr, cfg.steps, cfg.save_weights, cfg.lora_targets) == (1e-4, 20, True, ["q_proj"])


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", "fast", "must be a number"),
        ("lr", "true", "must be a number"),
        ("steps", "1.5", "must be an integer"),
        ("steps", "[1, 2]", "must be an integer"),
        ("batch_size", "true", "must be an integer"),
        ("save_weights", "maybe", "must be true or false"),
        ("model", "{a: 1}", "must be a string"),
        ("threads", "two", "must be an integer or null"),
        ("extra", "3", "must be a mapping"),
        ("lora_targets", "{q: 1}", "must be a list of names"),
    ],
)
def test_wrong_types_are_one_line_errors_naming_setting_value_and_type(
    tmp_path, capsys, key, value, expected
):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(TrainConfig.from_yaml(config))
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and f"setting {key} (--{key.replace('_', '-')})" in msg
    assert expected in msg
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 2
    assert expected in one_error_line(capsys) and not out.exists()


def test_flags_go_through_the_same_conversion(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "ten", "--out", str(out), "--quiet"]) == 2
    assert "setting steps (--steps) must be an integer, got 'ten'" in one_error_line(capsys)
    assert main(["train", "--lr", "1e-3x", "--out", str(out)]) == 2
    assert "must be a number, got '1e-3x'" in one_error_line(capsys) and not out.exists()


def test_unknown_settings_are_still_refused_with_the_valid_list(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate': valid settings are"):
        TrainConfig.from_dict(TrainConfig.from_yaml(config))


def test_coerce_edge_cases():
    assert coerce("x", "1_000", int) == 1000 and coerce("x", 3.0, int) == 3
    assert coerce("x", 2, float) == 2.0 and coerce("x", "none", int | None) is None
    assert coerce("x", "none", str | None) == "none"  # a folder may be called that
    assert coerce("x", None, dict) == {} and coerce("x", ",", list[str] | None) is None
    for value, tp in [(True, int), (False, float), (2, bool), (True, str), ("nan", int)]:
        with pytest.raises(ConfigError):
            coerce("x", value, tp)


# ----------------------------------------------------------------------------- help, bare zotune


def test_train_help_has_a_line_with_the_default_for_every_setting(capsys):
    from zotune.cli import parser

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    train = parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"
        flag = "--set" if f.name == "extra" else "--" + f.name.replace("_", "-")
        assert flag in text and helps.get(flag), flag
        assert f.name == "extra" or "(default: " in helps[flag], f"{flag} shows no default"
    assert "--lr X learning rate (default: 1e-06)" in text
    assert "--no-save-weights" in text and "built-in demo job" in text


def test_bare_zotune_prints_help_and_trains_nothing(monkeypatch, capsys):
    import zotune.train

    def no_training(*a, **k):
        raise AssertionError("bare `zotune` must not train")

    monkeypatch.setattr(zotune.train, "train", no_training)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zotune") and "plot" in out and "train" in out


def test_zotune_train_alone_still_runs_the_demo_job(monkeypatch):
    import zotune.train

    seen = {}

    def fake(cfg, quiet=False, resume=False):
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr(zotune.train, "train", fake)
    assert main(["train"]) == 2
    assert {k: getattr(seen["cfg"], k) for k in DEMO} == DEMO
    assert main(["train", "--steps", "3"]) == 2  # the rest still from the decoder recipe
    assert seen["cfg"].peft == "prefix" and seen["cfg"].steps == 3
    assert main(["train", "--steps", "3", "--recipe", "paper"]) == 2  # MeZO's protocol
    assert seen["cfg"].peft == "full" and seen["cfg"].lr == 1e-6
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "$(BIN)/zotune train\n" in makefile


# ----------------------------------------------------------------------------- --lora-targets


def test_lora_targets_reach_peft(tiny_model_dir, tmp_path, capsys):
    from zotune.train import load_for

    cfg = TrainConfig.from_dict(
        dict(model=tiny_model_dir, peft="lora", lora_targets="k_proj,o_proj", num_train=16)
    )
    cfg.validate()
    _, loaded, _ = load_for(cfg)
    assert set(loaded.model.peft_config["default"].target_modules) == {"k_proj", "o_proj"}
    adapted = {
        n.rsplit(".", 1)[-1] for n, m in loaded.model.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted == {"k_proj", "o_proj"}
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    out = tmp_path / "run"
    assert (
        main(tiny_train(tiny_model_dir, out, "--peft", "lora", "--lora-targets", "q_proj,o_proj"))
        == 0
    )
    saved = TrainConfig.from_dict(TrainConfig.from_yaml(out / "config.yaml"))
    assert saved.lora_targets == ["q_proj", "o_proj"]  # a replay gets the same adapter
    capsys.readouterr()
    weights = tmp_path / "w"
    assert main(["replay", str(out), "--out", str(weights)]) == 0
    assert (weights / "weights.safetensors").exists()


def test_bad_lora_targets_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train(tiny_model_dir, out, "--peft", "lora", "--lora-targets", "qkv")) == 2
    err = one_error_line(capsys)
    assert "--lora-targets" in err and "'qkv'" in err and "q_proj" in err and not out.exists()
    assert main(tiny_train(tiny_model_dir, out, "--lora-targets", "q_proj")) == 2
    assert "--lora-targets applies to --peft lora only" in one_error_line(capsys)


def test_default_lora_targets_error_names_the_flag():
    import torch

    from zotune.models import LoadedModel, ModelError, apply_peft

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = None
    loaded = LoadedModel(model=model, tokenizer=None, kind="causal", name="odd")
    with pytest.raises(ModelError, match="--lora-targets NAME,NAME"):
        apply_peft(loaded, "lora")


# ----------------------------------------------------------------------------- --gguf-file


def test_gguf_file_picks_one_of_several(tmp_path, capsys):
    from zotune.models import _resolve

    models = tmp_path / "ggufs"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"GGUF not really")
    (models / "b.gguf").write_bytes(b"GGUF not really either")
    assert _resolve(str(models), "b.gguf").gguf_file == "b.gguf"
    out = tmp_path / "run"
    assert main(tiny_train(str(models), out)) == 2
    err = one_error_line(capsys)
    assert "2 .gguf files" in err and "a.gguf, b.gguf" in err and "--gguf-file NAME" in err
    assert main(tiny_train(str(models), out, "--gguf-file", "b.gguf")) == 2
    err = one_error_line(capsys)  # the flag got through to loading: b.gguf itself is broken
    assert "cannot read b.gguf" in err and "--gguf-file" in err
    assert main(tiny_train(str(models), out, "--gguf-file", "c.gguf")) == 2
    err = one_error_line(capsys)
    assert "no file c.gguf" in err and "a.gguf, b.gguf" in err and not out.exists()
    assert main(["eval", "--model", str(models), "--gguf-file", "a.gguf", "--split", "dev"]) == 2
    assert "cannot read a.gguf" in one_error_line(capsys)


# ----------------------------------------------------------------------------- broken models


def _break_config(d: Path) -> None:
    (d / "config.json").write_text("{this is not json")


def _truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _no_tokenizer(d: Path) -> None:
    for p in d.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()


def _unknown_model_type(d: Path) -> None:
    (d / "config.json").write_text('{"hidden_size": 8}')


@pytest.mark.parametrize(
    "damage, message",
    [
        (_break_config, "cannot read the config of model"),
        (_unknown_model_type, "cannot read the config of model"),
        (_truncate_weights, "damaged or incomplete"),
        (_no_weights, "cannot load the weights"),
        (_no_tokenizer, "cannot load the tokenizer"),
    ],
)
def test_a_broken_model_folder_is_a_one_line_error(
    tiny_model_dir, tmp_path, capsys, damage, message
):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    damage(broken)
    out = tmp_path / "run"
    assert main(tiny_train(str(broken), out)) == 2
    assert message in one_error_line(capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
    assert main(["eval", "--model", str(broken), "--split", "dev"]) == 2
    assert message in one_error_line(capsys)
