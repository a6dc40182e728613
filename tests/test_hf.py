"""ZOTrainer / ZOSFTTrainer: zotune's methods inside transformers' Trainer and TRL's SFTTrainer,
on the tiny Llama and a few dozen rows of the shipped SST-2 sample."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)

import zotune
import zotune.hf
from zotune.hf import ZOArguments, ZOTrainer
from zotune.optim import OPTIMIZERS, ZOOptimizer, available

SAMPLE = Path(zotune.__file__).parent / "data" / "sst2" / "train.tsv"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def texts():
    return [line.split("\t")[0] for line in SAMPLE.read_text().splitlines()[1:33]]


@pytest.fixture(scope="module")
def rows(tok, texts):
    return [dict(tok(t)) for t in texts]


def arguments(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def trainer(model_dir, tok, rows, out, zo=None, model=None, **kw) -> ZOTrainer:
    return ZOTrainer(
        model=model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir),
        args=arguments(out, **kw),
        zo_args=zo or ZOArguments("mezo"),
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zo_trainer_lowers_the_training_loss(tiny_model_dir, tok, rows, tmp_path):
    # 16 rows a step; the loss change measured with seeds 0, 1, 2: -0.026, -0.010, -0.022
    t = trainer(
        tiny_model_dir,
        tok,
        rows,
        tmp_path,
        max_steps=30,
        per_device_train_batch_size=16,
        lr_scheduler_type="linear",
    )
    before = t.evaluate(rows)["eval_loss"]  # the training rows, measured the same way both times
    t.train()
    after = t.evaluate(rows)["eval_loss"]
    assert after < before - 0.01, (before, after)
    zo = t.zo_optimizer
    assert zo.steps == 30 and len(zo.trajectory.records) == 30 and zo.forward_passes == 60
    logged = [h for h in t.state.log_history if "loss" in h and "grad_norm" in h]
    assert len(logged) == 30 and all(h["grad_norm"] > 0 for h in logged)  # |projected grad|


def test_never_calls_backward(tiny_model_dir, tok, rows, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("backward was called")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    t = trainer(tiny_model_dir, tok, rows, tmp_path, max_steps=3, gradient_accumulation_steps=2)
    start = weights(t.model)
    t.train()
    assert all(p.grad is None for p in t.model.parameters())
    assert any(not torch.equal(start[k], v) for k, v in weights(t.model).items())


def test_gradient_accumulation_is_one_estimate_over_the_window(tiny_model_dir, tok, rows, tmp_path):
    # K = 2 micro-batches of 2 rows, both at each perturbation: the same projected gradient as
    # one batch of 4 (up to float rounding: padding differs), and one step, not two
    runs = {}
    for k, b in ((1, 4), (2, 2)):
        t = trainer(
            tiny_model_dir,
            tok,
            rows,
            tmp_path / f"k{k}",
            zo=ZOArguments("mezo", eps=1e-2),
            max_steps=3,
            per_device_train_batch_size=b,
            gradient_accumulation_steps=k,
        )
        t.train()
        runs[k] = t
    one, two = (runs[k].zo_optimizer for k in (1, 2))
    assert len(two.trajectory.records) == 3 and two.forward_passes == 3 * 2
    for r1, r2 in zip(one.trajectory.records, two.trajectory.records):
        assert r2["grads"] == pytest.approx(r1["grads"], rel=1e-3, abs=1e-3)
    losses = [[h["loss"] for h in runs[k].state.log_history if "grad_norm" in h] for k in (1, 2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


ZO_METHODS = [m for m in available() if issubclass(OPTIMIZERS[m], ZOOptimizer)]


@pytest.mark.parametrize("method", ZO_METHODS)
def test_every_zo_method_trains_in_the_trainer(method, tiny_model_dir, tok, rows, tmp_path):
    # 2 steps: mezo-svrg's full-batch step, then a minibatch one
    t = trainer(
        tiny_model_dir,
        tok,
        rows[:8],
        tmp_path,
        zo=ZOArguments(method),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
    )
    start = weights(t.model)
    t.train()
    assert t.zo_optimizer.steps == 2 and len(t.zo_optimizer.trajectory.records) == 2
    assert any(not torch.equal(start[k], v) for k, v in weights(t.model).items())


def test_dropout_draws_the_same_masks_at_each_perturbation(tiny_model_dir, tok, rows, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    t = trainer(tiny_model_dir, tok, rows, tmp_path, model=model, max_steps=1)
    t.create_optimizer()
    batch = DataCollatorForLanguageModeling(tok, mlm=False)(rows[:4])
    model.train()
    assert model(**batch).loss != model(**batch).loss  # dropout is on
    loss = t._same_noise(lambda: model(**batch).loss, 0)
    rng = torch.get_rng_state()
    assert loss() == loss()  # common random numbers within a step
    assert torch.equal(torch.get_rng_state(), rng)  # the Trainer's stream is untouched
    t.train()  # and it trains
    assert t.zo_optimizer.steps == 1


def test_hf_argument_parser_reads_zo_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, ZOArguments))
    _, zo = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "zo-adam", "--eps", "1e-2"]
        + ["--hparams", '{"betas": "0.9,0.99"}']
    )
    assert zo == ZOArguments("zo-adam", eps=1e-2, hparams={"betas": (0.9, 0.99)})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_is_bit_identical(tiny_model_dir, tok, rows, tmp_path):
    # zo-adam (rule state), 2 micro-batches a step, a warmup + linear schedule, 24 rows: 3
    # steps an epoch, so the resumed run skips a step into its epoch, then starts a reshuffled one
    settings = dict(
        zo=ZOArguments("zo-adam", eps=1e-3, hparams={"betas": "0.9,0.99"}),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=2,
    )
    data = rows[:24]
    whole = trainer(tiny_model_dir, tok, data, tmp_path / "whole", **settings)
    whole.train()

    first = trainer(tiny_model_dir, tok, data, tmp_path / "cut", **settings)
    first.add_callback(StopAt(2))
    first.train()
    assert first.state.global_step == 2
    ckpt = tmp_path / "cut" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["zotune"]["steps"] == 2 and len(saved["zotune"]["records"]) == 2
    states = saved["state"].values()  # Adam's moments, one pair per tensor
    assert states and all({"exp_avg", "exp_avg_sq"} <= set(s) for s in states)

    second = trainer(tiny_model_dir, tok, data, tmp_path / "cut", **settings)
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 4
    a, b = weights(whole.model), weights(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same projected gradients and learning rates (the Trainer's schedule) at every step
    assert second.zo_optimizer.trajectory.records == whole.zo_optimizer.trajectory.records
    lrs = [r["lr"][0] for r in second.zo_optimizer.trajectory.records]
    assert lrs == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])


def test_trainer_features_tensorboard_metrics_best_model(tiny_model_dir, tok, rows, tmp_path):
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    rank = iter([3.0, 1.0, 2.0, 4.0])  # the 2nd evaluation is the best (lower is better)

    def metrics(pred):
        logits, labels = pred.predictions, pred.label_ids
        hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
        return {"token_accuracy": float(hits.mean()), "rank": next(rank)}

    t = trainer(
        tiny_model_dir,
        tok,
        rows,
        tmp_path,
        max_steps=4,
        report_to=["tensorboard"],
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="rank",
        greater_is_better=False,
    )
    t.compute_metrics = metrics
    t.add_callback(Record())
    t.train()
    assert seen == [1, 2, 3, 4]
    assert list(tmp_path.glob("runs/**/events.out.tfevents.*"))
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) == 4 and all("eval_token_accuracy" in h for h in evals)
    assert Path(t.state.best_model_checkpoint).name == "checkpoint-2"
    best, last = (
        weights(AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{k}")) for k in (2, 4)
    )
    now = weights(t.model)
    assert all(torch.equal(best[k], now[k]) for k in best)
    assert not all(torch.equal(last[k], now[k]) for k in last)


def test_peft_adapter_saved_by_the_trainer_loads(tiny_model_dir, tok, rows, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    t = trainer(
        tiny_model_dir,
        tok,
        rows,
        tmp_path,
        model=model,
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    t.train()
    trained = {k: v for k, v in weights(model).items() if "lora_" in k}
    assert any(
        k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in trained.items()
    )
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "checkpoint-3"
    )
    again = {k: v for k, v in weights(loaded).items() if "lora_" in k}
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(method="fo-adam"), "first-order"),
        (dict(eps=-1.0), "eps must be a finite number > 0"),
        (dict(eps=float("nan")), "eps must be a finite number > 0"),
        (dict(eps="big"), "eps must be a number"),
        (dict(queries=0), "queries must be an integer >= 1"),
        (dict(direction="uniform"), "unknown direction 'uniform'"),
        (dict(hparams={"lr": 1e-3}), "TrainingArguments.learning_rate"),
        (dict(hparams={"betas": 0.9}), "unknown hyperparameter 'betas' for mezo"),
        (dict(method="zo-adam", hparams={"betas": "x"}), "betas must be"),
        (dict(hparams="{betas"), "hparams is not valid JSON"),
    ],
)
def test_bad_zo_arguments_give_a_one_line_error(kwargs, message):
    with pytest.raises(ValueError) as info:
        ZOArguments(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_zo_trainer_refuses_an_optimizer(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="builds its optimizer from zo_args"):
        ZOTrainer(model=model, args=arguments(tmp_path), optimizers=(opt, None))


def test_zo_sft_trainer_trains_with_trl(tiny_model_dir, tok, texts, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    def refuse(*args, **kwargs):
        raise AssertionError("backward was called")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    data = Dataset.from_list(
        [{"prompt": t[:20], "completion": t[20:]} for t in texts if len(t) > 30]
    )
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        max_length=64,
    )
    t = zotune.hf.ZOSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        zo_args=ZOArguments("mezo"),
        train_dataset=data,
        processing_class=tok,
    )
    start = weights(t.model)
    t.train()
    assert t.zo_optimizer.steps == 3 and all(p.grad is None for p in t.model.parameters())
    assert any(not torch.equal(start[k], v) for k, v in weights(t.model).items())
    logged = [h for h in t.state.log_history if "grad_norm" in h]
    assert len(logged) == 3 and all("mean_token_accuracy" in h for h in logged)


def test_zo_sft_trainer_without_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails
    with pytest.raises(ImportError, match="pip install trl") as info:
        zotune.hf.ZOSFTTrainer(model=None)
    assert "\n" not in str(info.value)
