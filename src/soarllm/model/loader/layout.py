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
    if config.model_type in EXPERT_NAMES:
        tensors = unstacked_experts(tensors, *EXPERT_NAMES[config.model_type])
    return tensors


# MoE families: transformers 5 holds each layer's experts stacked (``experts.gate_up_proj``
# [E, 2I, H], ``experts.down_proj`` [E, H, I]) and renames modules on loading; checkpoints store
# every expert's projections apart. model_type -> ((transformers' module name, the checkpoint's),
# names of the gate, up and down projections in the checkpoint).
EXPERT_NAMES: dict[str, tuple[tuple[str, str] | None, str, str, str]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."), "w1", "w3", "w2"),
    "qwen2_moe": (None, "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": (None, "gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": (None, "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": (None, "gate_proj", "up_proj", "down_proj"),
}


def unstacked_experts(tensors: dict, rename, gate: str, up: str, down: str) -> dict:
    """The per-expert checkpoint names and shapes of transformers 5's stacked expert tensors."""
    out = {}
    for name, (shape, dtype) in tensors.items():
        if rename is not None:
            name = name.replace(*rename)
        if name.endswith(".experts.gate_up_proj"):
            experts, rows, cols = shape
            base = name.removesuffix(".gate_up_proj")
            for e in range(experts):
                out[f"{base}.{e}.{gate}.weight"] = (torch.Size([rows // 2, cols]), dtype)
                out[f"{base}.{e}.{up}.weight"] = (torch.Size([rows // 2, cols]), dtype)
        elif name.endswith(".experts.down_proj"):
            experts, rows, cols = shape
            base = name.removesuffix(".down_proj")
            for e in range(experts):
                out[f"{base}.{e}.{down}.weight"] = (torch.Size([rows, cols]), dtype)
        else:
            out[name] = (shape, dtype)
    return out
