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


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """Gemma 3: one KV head (replicated), q/k norms, sliding and full layers, logit softcap,
    a tied head; every weight (norms included) random."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.tiny import train_tokenizer

    d = tmp_path_factory.mktemp("tp-gemma3")
    tok = train_tokenizer(d)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15 if "embed" in name else (0.08 if p.dim() == 2 else 0.3))
    model.save_pretrained(d, safe_serialization=True)
    return d
