"""Tiny random models for tests and smoke runs: seconds to build, no download."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import BertConfig, LlamaConfig

from .engine.directions import Gaussian, derive_seed


def llama_config(vocab: int, **kw) -> LlamaConfig:
    """A 2-layer Llama config with hidden size 32."""
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaConfig(
        vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **{**dims, **kw}
    )


def bert_config(vocab: int, **kw) -> BertConfig:
    """A 2-layer BERT config with hidden size 32."""
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return BertConfig(vocab_size=vocab, max_position_embeddings=512, **dims, **kw)


def make_tiny_model(path: str | os.PathLike, hidden_size: int = 32) -> str:
    """A 2-layer random Llama (MLP width 2 x `hidden_size`) with a byte-level tokenizer trained
    on the shipped SST-2 sample: seconds to build, for smoke runs and tests."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    sample = Path(__file__).parent / "data" / "sst2" / "train.tsv"
    lines = sample.read_text(encoding="utf-8").splitlines()[1:]
    corpus = [ln.split("\t")[0] + " It was great terrible good bad Yes No Maybe\n" for ln in lines]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tmp = path.with_name(path.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return str(path)


def reference_z(shape, seed: int, key: int) -> torch.Tensor:
    """z of the gaussian law for one tensor, by a separate, pure-Python implementation of the
    documented law (a test oracle for the engine's kernels) (lowbias32 of a keyed Weyl
    sequence, then the table)."""
    m32 = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m32
        x ^= x >> 15
        x = (x * 0x846CA68B) & m32
        return x ^ (x >> 16)

    table, delta = Gaussian().table.tolist(), Gaussian().delta
    k = derive_seed(seed, key)
    out = []
    for i in range(torch.Size(shape).numel()):
        u = mix((i * (k & m32 | 1) + (k >> 32)) & m32)
        c, f = u >> 20, (u & 0xFFFFF) / 2**20
        out.append(
            torch.tensor(table[c], dtype=torch.float32)
            + torch.tensor(f, dtype=torch.float32) * delta[c]
        )
    return torch.stack(out).view(shape)
