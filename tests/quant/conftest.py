"""A tiny random Llama with activation outliers, as real LLMs have them: a few hidden channels
whose norm weights are far above the rest, so the inputs of q/k/v and gate/up carry a handful
of channels tens of times larger than the median one."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_model

OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_GAIN = 15.0


@pytest.fixture(scope="session")
def outlier_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("outliers"), "llama")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    model.save_pretrained(str(path), safe_serialization=True)
    return path
