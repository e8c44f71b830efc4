"""What every causal LM here shares: KV layout, LM head (tied or not) and weight loading by name."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from soarllm.model.layers.linear import MergedLinear

# Checkpoint tensors that carry no weights we need (precomputed rope tables and the like).
_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class DecoderForCausalLM(nn.Module):
    # checkpoint name fragment -> (merged parameter fragment, shard): the weight-name table
    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config, dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype
        text = getattr(config, "text_config", None) or config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.vocab_size = text.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))

    def build_lm_head(self, embedding: nn.Embedding) -> None:
        if self.tie_word_embeddings:
            self.lm_head = None
            self._embedding = [embedding]  # not a submodule: avoid listing the weight twice
        else:
            hidden = embedding.weight.shape[1]
            self.lm_head = nn.Linear(hidden, self.vocab_size, bias=False, dtype=self.dtype)
            self.lm_head.weight.requires_grad_(False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self._embedding[0].weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, w)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self.load_packed_weights(weights)

    def load_packed_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters; returns the names of loaded params."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_SKIPPED):
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            for frag, (merged, shard) in self.packed_modules.items():
                if f".{frag}." in name:
                    target = name.replace(f".{frag}.", f".{merged}.")
                    module_name, param_name = target.rsplit(".", 1)
                    module = self.get_submodule(module_name)
                    assert isinstance(module, MergedLinear)
                    module.load_shard(param_name, shard, tensor)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
                p = params[name]
                if p.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(p.shape)}")
                p.data.copy_(tensor)
                loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        for module in self.modules():
            qm = getattr(module, "quant_method", None)
            if qm is not None:
                qm.process_weights_after_loading(module)
        return loaded
