"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases, ``qkv_bias``) and, in
the sparse layers, top-k routed experts plus one shared expert that every token runs, scaled by
sigmoid(shared_expert_gate(x)). ``norm_topk_prob`` says whether the k router weights are
renormalised. Layer i is sparse unless it is listed in ``mlp_only_layers`` or (i + 1) is not a
multiple of ``decoder_sparse_step``; dense layers use a SwiGLU MLP of ``intermediate_size``.
"""

from __future__ import annotations

from soarllm.model.layers.parallel_linear import MergedColumnParallelLinear
from soarllm.model.models.moe import MoEAttention, MoEDims, MoEForCausalLM
from soarllm.model.parallel_state import TPGroup, kv_head_range


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule for which decoder layers of a Qwen-MoE config hold experts."""
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class Qwen2MoeAttention(MoEAttention):
    """Biases on q/k/v where the config says ``qkv_bias`` (none on o_proj)."""

    def __init__(self, config, layer_idx, dtype, rotary_emb, quant_config=None, prefix="",
                 tp: TPGroup | None = None):
        super().__init__(config, layer_idx, dtype, rotary_emb, quant_config, prefix, tp)
        if getattr(config, "qkv_bias", False) and self.qkv_proj.bias is None:
            tp = tp or TPGroup.single()
            d = self.head_dim
            first_kv = kv_head_range(
                getattr(config, "num_key_value_heads", None) or config.num_attention_heads, tp)[0]
            self.qkv_proj = MergedColumnParallelLinear(
                config.hidden_size,
                {name: size for name, (_, size) in self.qkv_proj.shard_offsets.items()},
                bias=True, dtype=dtype, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
                tp=tp, shard_starts={"q": tp.rank * self.num_heads * d, "k": first_kv * d,
                                     "v": first_kv * d},
            )


def qwen_moe_dims(config) -> MoEDims:
    """Routed, shared and dense widths of a Qwen-MoE config (0 where there are none)."""
    dense = any(not is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
    return MoEDims(config.num_experts, config.moe_intermediate_size,
                   getattr(config, "shared_expert_intermediate_size", 0) or 0,
                   config.intermediate_size if dense else 0)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    attention_cls = Qwen2MoeAttention

    @classmethod
    def moe_dims(cls, config) -> MoEDims:
        return qwen_moe_dims(config)

    def build_mlp(self, config, layer_idx, dtype, quant_config, prefix):
        if not is_sparse_layer(config, layer_idx):
            return self.dense_mlp(config, dtype, quant_config, prefix)
        return self.sparse_block(
            config, dtype, quant_config, prefix, num_experts=config.num_experts,
            top_k=config.num_experts_per_tok, intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
        )
