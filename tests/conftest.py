"""Shared fixtures: a tiny randomly initialized decoder saved like a real checkpoint."""

from __future__ import annotations

import pytest

from zotune.testing import bert_config, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with a byte-level BPE tokenizer, saved with save_pretrained (seconds)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_4bit_model_dir(tmp_path_factory) -> str:
    """The tiny Llama at hidden size 64: bitsandbytes' 4-bit CPU kernel (on CPUs with AVX512-BF16)
    packs each layer's weights in blocks of 64 input features, as every real model's widths
    allow and hidden size 32 does not."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-64", hidden_size=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A bare 2-layer BERT (no head: zotune loads it as a classifier) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    BertModel(bert_config(len(tok), pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
