"""Configs of the tiny random models the tests build (2 layers, hidden size 32)."""

from transformers import BertConfig, LlamaConfig


def llama_config(vocab: int, **kw) -> LlamaConfig:
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaConfig(
        vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **dims, **kw
    )


def bert_config(vocab: int, **kw) -> BertConfig:
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return BertConfig(vocab_size=vocab, max_position_embeddings=512, **dims, **kw)
