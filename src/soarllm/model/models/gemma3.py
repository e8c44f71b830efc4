"""Gemma 3 (text): sliding-window and global attention layers interleaved, each kind with its own
rope base; q/k RMS norms; four norms per layer; (1 + w) RMSNorm; embeddings scaled by sqrt(hidden).
"""

from __future__ import annotations

import torch
from torch import nn

from soarllm.model.layers.activation import ACT_AND_MUL
from soarllm.model.layers.attention import Attention
from soarllm.model.layers.norm import RMSNorm
from soarllm.model.layers.parallel_linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from soarllm.model.layers.rotary import RotaryEmbedding
from soarllm.model.models.base import DecoderForCausalLM
from soarllm.model.parallel_state import TPGroup, kv_head_range


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]


def _rope_params(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        return dict(params[layer_type])
    # older configs: one rope_theta for global layers, rope_local_base_freq for sliding ones
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    p = dict(getattr(config, "rope_scaling", None) or {"rope_type": "default"})
    p.setdefault("rope_type", p.get("type", "default"))
    p["rope_theta"] = getattr(config, "rope_theta", 1_000_000.0)
    return p


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str, dtype, rotary_emb, quant_config=None,
                 prefix: str = "", tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        # this rank's heads (all of them at world size 1; KV heads replicated below the ranks)
        self.num_heads = tp.split(config.num_attention_heads, "attention heads")
        first_kv, self.num_kv_heads = kv_head_range(config.num_key_value_heads, tp)
        self.head_dim = d = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedColumnParallelLinear(
            config.hidden_size,
            {"q": self.num_heads * d, "k": self.num_kv_heads * d, "v": self.num_kv_heads * d},
            bias=bias,
            dtype=dtype,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            tp=tp,
            shard_starts={"q": tp.rank * self.num_heads * d, "k": first_kv * d, "v": first_kv * d},
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size,
                                        bias=bias, dtype=dtype, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj", tp=tp,
                                        what="attention heads x head size")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, offset=1.0)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, offset=1.0)
        self.rotary_emb = [rotary_emb]
        self.layer_type = layer_type
        self.attn = Attention(
            self.scale,
            config.sliding_window if layer_type == "sliding_attention" else None,
            getattr(config, "attn_logit_softcapping", None),
        )

    def forward(self, ropes, x, kv_cache):
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb[0].apply(ropes[self.layer_type], q, k)
        o = self.attn(q, k, v, kv_cache)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    def __init__(self, config, dtype, quant_config=None, prefix: str = "",
                 tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        inter = tp.split(config.intermediate_size, "intermediate size (MLP width)")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, {"gate": inter, "up": inter}, dtype=dtype,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
            tp=tp, shard_starts={"gate": tp.rank * inter, "up": tp.rank * inter})
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           dtype=dtype, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj", tp=tp,
                                           what="intermediate size (MLP width)")
        self.act_and_mul = ACT_AND_MUL[config.hidden_activation]

    def forward(self, x):
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, dtype, rotary_emb, quant_config=None,
                 prefix: str = "", tp: TPGroup | None = None):
        super().__init__()
        eps, h = config.rms_norm_eps, config.hidden_size
        self.self_attn = Gemma3Attention(config, layer_type, dtype, rotary_emb, quant_config,
                                         f"{prefix}.self_attn", tp)
        self.mlp = Gemma3MLP(config, dtype, quant_config, f"{prefix}.mlp", tp)
        self.input_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, dtype, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, dtype, offset=1.0)

    def forward(self, ropes, x, kv_cache, residual):
        """x is the previous layer's (post-norm) MLP output, residual the stream before it (None
        in the first layer); the input and pre-feedforward norms add them (fused on CUDA)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(ropes, h, kv_cache))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config, dtype, quant_config=None, tp: TPGroup | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   dtype=dtype, tp=tp)
        self.embed_scale = config.hidden_size**0.5
        types = _layer_types(config)
        ropes = {
            t: RotaryEmbedding(config.head_dim, config.max_position_embeddings, _rope_params(config, t))
            for t in sorted(set(types))
        }
        self.rotary = nn.ModuleDict(ropes)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, t, dtype, ropes[t], quant_config, f"model.layers.{i}", tp)
            for i, t in enumerate(types)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, offset=1.0)

    def forward(self, input_ids, positions, kv_caches):
        h = self.embed_tokens(input_ids)
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        ropes = {t: rope.lookup(positions, h.dtype) for t, rope in self.rotary.items()}
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer(ropes, h, cache, residual)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm(h, residual)[0]


class Gemma3ForCausalLM(DecoderForCausalLM):
    supports_tensor_parallel = True

    def __init__(self, config, dtype=torch.float32, backend=None, quant_config=None,
                 tp: TPGroup | None = None):
        config.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        super().__init__(config, dtype, quant_config, backend, tp)
        self.model = Gemma3Model(config, dtype, quant_config, self.tp)
        self.build_lm_head(self.model.embed_tokens)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
