"""Recipes: settings a user leaves out come from the recipe for the model's kind."""

from __future__ import annotations

import pytest

from zotune.cli import main
from zotune.recipes import DECODER, describe
from zotune.train import DEMO, ConfigError, TrainConfig


def test_a_decoder_takes_the_decoder_recipe_for_what_is_not_set(tiny_model_dir):
    cfg = TrainConfig.with_recipe({"model": tiny_model_dir, "lr": 1e-2})
    assert cfg.recipe == "decoder-prefix"
    assert (cfg.method, cfg.peft, cfg.eps, cfg.batch_size) == ("mezo", "prefix", 0.1, 8)
    assert cfg.lr == 1e-2  # what the user set wins
    assert (cfg.steps, cfg.num_train) == (DECODER.sizes["steps"], DECODER.sizes["num_train"])
    assert "using recipe decoder-prefix" in describe(cfg)


def test_another_scheme_takes_only_the_recipe_sizes(tiny_model_dir):
    cfg = TrainConfig.with_recipe({"model": tiny_model_dir, "peft": "lora"})
    assert cfg.peft == "lora" and cfg.lr == TrainConfig.lr and cfg.eps == TrainConfig.eps
    assert cfg.steps == DECODER.sizes["steps"]
    assert "set --lr and --eps" in describe(cfg)


def test_paper_recipe_keeps_mezo_protocol_and_bad_names_are_errors(tiny_model_dir):
    cfg = TrainConfig.with_recipe({"model": tiny_model_dir, "recipe": "paper"})
    assert cfg == TrainConfig(model=tiny_model_dir)  # the dataclass defaults: MeZO's protocol
    with pytest.raises(ConfigError, match="unknown --recipe 'fast'"):
        TrainConfig.with_recipe({"model": tiny_model_dir, "recipe": "fast"}).validate()


def test_the_demo_job_is_the_decoder_recipe_on_sst2():
    cfg = TrainConfig.with_recipe({"model": "smollm2-135m", "task": "sst2"})
    assert {k: getattr(cfg, k) for k in DEMO} == DEMO


def test_the_command_line_prints_the_recipe(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--steps", "2", "--eval-every", "2"]
    args += ["--num-train", "16", "--num-dev", "8", "--num-test", "8", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert "using recipe decoder-prefix" in capsys.readouterr().out
    assert "recipe: decoder-prefix" in (out / "config.yaml").read_text()


def test_an_encoder_with_a_classification_head_takes_the_linear_probe_recipe(tiny_bert_dir):
    cfg = TrainConfig.with_recipe({"model": tiny_bert_dir})
    assert (cfg.recipe, cfg.init_head, cfg.peft, cfg.lr) == (
        "encoder-lp",
        "linear-probe",
        "full",
        1e-5,
    )
