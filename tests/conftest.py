"""Shared fixtures: a tiny randomly initialized decoder saved like a real checkpoint."""

from __future__ import annotations

import pytest

from zotune.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with a byte-level BPE tokenizer, saved with save_pretrained (seconds)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
