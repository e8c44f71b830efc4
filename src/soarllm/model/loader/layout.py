"""The tensors (HF names and shapes) a config's transformers model holds, found without weights.

Transformers builds the model on the meta device, which allocates nothing, so this works for any
size. It is the ground truth both for random (dummy) weights and for naming GGUF tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from soarllm.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def expected_tensors(config: PretrainedConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """HF tensor name -> (shape, dtype) of every weight a checkpoint of `config` stores.

    Non-persistent buffers (rotary tables) are left out, and so is `lm_head.weight` when the
    embeddings are tied, as in the checkpoints transformers saves.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"transformers cannot build a causal LM for model_type {config.model_type!r} ({e}); "
            "give the config of a text-only causal LM"
        ) from None
    tensors = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors
