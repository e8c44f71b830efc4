"""Tiny random checkpoints shaped for two ranks."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_model


def randomize_biases(model_dir) -> None:
    """The tiny models' biases are initialised to zero, which would hide a bias added once per
    rank: draw them at random in the saved checkpoint."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory):
    """Llama with 4 query heads over 2 KV heads: one KV head per rank at TP=2."""
    return make_tiny_model(tmp_path_factory.mktemp("tp-gqa"), "llama")


@pytest.fixture(scope="session")
def tiny_mqa_dir(tmp_path_factory):
    """One KV head (replicated on both ranks), biases on q/k/v/o, a tied head and a vocabulary
    (515) that two ranks do not split evenly."""
    d = make_tiny_model(tmp_path_factory.mktemp("tp-mqa"), "llama", num_key_value_heads=1,
                        attention_bias=True, vocab_size=515, tie_word_embeddings=True)
    randomize_biases(d)
    return d
