"""Llama family: Llama 2/3, Mistral, Qwen2/2.5, SmolLM2 (one decoder, switches read from the config).

Differences handled here: Qwen2 adds biases to q/k/v; Mistral may use a sliding window; SmolLM2 and
small Qwen2 models tie the LM head to the embedding; Llama 3 scales rope ("llama3" rope type).

Tensor parallel (``tp``): each rank holds its query heads, its KV heads (replicated when there are
fewer KV heads than ranks), its slice of the MLP width and of the vocabulary; o_proj and down_proj
sum the ranks' partial outputs (model/layers/parallel_linear.py). At world size 1 the layers are
the plain ones.
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
from soarllm.model.layers.rotary import RotaryEmbedding, rope_parameters
from soarllm.model.models.base import DecoderForCausalLM
from soarllm.model.parallel_state import TPGroup, kv_head_range


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, rotary_emb: RotaryEmbedding,
                 quant_config=None, prefix: str = "", tp: TPGroup | None = None):
        # rotary_emb is shared by every layer; the model looks cos/sin up once per step.
        super().__init__()
        tp = tp or TPGroup.single()
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        # this rank's heads (all of them at world size 1)
        self.num_heads = tp.split(total_heads, "attention heads")
        first_kv, self.num_kv_heads = kv_head_range(total_kv, tp)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.scale = self.head_dim**-0.5
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        d = self.head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            config.hidden_size,
            {"q": self.num_heads * d, "k": self.num_kv_heads * d, "v": self.num_kv_heads * d},
            bias=qkv_bias,
            dtype=dtype,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            tp=tp,
            shard_starts={"q": tp.rank * self.num_heads * d, "k": first_kv * d, "v": first_kv * d},
        )
        self.o_proj = RowParallelLinear(
            total_heads * d,
            config.hidden_size,
            bias=bool(getattr(config, "attention_bias", False)),
            dtype=dtype,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
            tp=tp,
            what="attention heads x head size",
        )
        self.rotary_emb = [rotary_emb]  # a list keeps the shared module out of submodules
        self.attn = Attention(self.scale, _sliding_window(config, layer_idx))

    def forward(self, rope, x, kv_cache):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk = qkv[:, : (nq + nkv) * d].view(t, nq + nkv, d)
        v = qkv[:, (nq + nkv) * d :].view(t, nkv, d)
        if self.attn.fuses_rope(qk, kv_cache):  # rotated by the kernel that stores k and v
            o = self.attn(qk[:, :nq], qk[:, nq:], v, kv_cache, rope=rope)
        else:  # q and k heads side by side: one rotation for both
            qk = self.rotary_emb[0].rotate(rope, qk)
            o = self.attn(qk[:, :nq], qk[:, nq:], v, kv_cache)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


def _sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if config.model_type == "qwen2":
        if not getattr(config, "use_sliding_window", False):
            return None
        if layer_idx < getattr(config, "max_window_layers", 0):
            return None
    return int(window)


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype, quant_config=None, prefix: str = "",
                 tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = tp.split(config.intermediate_size, "intermediate size (MLP width)")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, {"gate": inter, "up": inter}, bias=bias, dtype=dtype,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
            tp=tp, shard_starts={"gate": tp.rank * inter, "up": tp.rank * inter},
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=bias, dtype=dtype, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj", tp=tp,
                                           what="intermediate size (MLP width)")
        self.act_and_mul = ACT_AND_MUL[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, rotary_emb, quant_config=None,
                 prefix: str = "", tp: TPGroup | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype, rotary_emb,
                                        quant_config, f"{prefix}.self_attn", tp)
        self.mlp = LlamaMLP(config, dtype, quant_config, f"{prefix}.mlp", tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, rope, x, kv_cache, residual):
        """vLLM's residual pattern: x is the previous layer's MLP output, residual the stream
        before it (None in the first layer); each norm adds the two (fused on CUDA)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype, quant_config=None, tp: TPGroup | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   dtype=dtype, tp=tp)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(
            head_dim,
            config.max_position_embeddings,
            rope_parameters(config),
            rotary_dim=int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, self.rotary_emb, quant_config,
                              f"model.layers.{i}", tp)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, kv_caches):
        h = self.embed_tokens(input_ids)
        rope = self.rotary_emb.lookup(positions, h.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer(rope, h, cache, residual)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(DecoderForCausalLM):
    supports_tensor_parallel = True

    def __init__(self, config, dtype=torch.float32, backend=None, quant_config=None,
                 tp: TPGroup | None = None):
        super().__init__(config, dtype, quant_config, backend, tp)
        self.model = LlamaModel(config, dtype, quant_config, self.tp)
        self.build_lm_head(self.model.embed_tokens)

