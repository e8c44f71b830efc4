"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases, ``qkv_bias``) and, in
the sparse layers, top-k routed experts plus one shared expert that every token runs, scaled by
sigmoid(shared_expert_gate(x)). ``norm_topk_prob`` says whether the k router weights are
renormalised. Layer i is sparse unless it is listed in ``mlp_only_layers`` or (i + 1) is not a
multiple of ``decoder_sparse_step``; dense layers use a SwiGLU MLP of ``intermediate_size``.
"""

from __future__ import annotations

from soarllm.model.layers.linear import MergedLinear
from soarllm.model.models.moe import MoEAttention, MoEForCausalLM, SparseMoeBlock, gated_mlp


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule for which decoder layers of a Qwen-MoE config hold experts."""
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class Qwen2MoeAttention(MoEAttention):
    """Biases on q/k/v where the config says ``qkv_bias`` (none on o_proj)."""

    def __init__(self, config, layer_idx, dtype, rotary_emb, quant_config=None, prefix=""):
        super().__init__(config, layer_idx, dtype, rotary_emb, quant_config, prefix)
        if getattr(config, "qkv_bias", False) and self.qkv_proj.bias is None:
            self.qkv_proj = MergedLinear(
                config.hidden_size,
                {name: size for name, (_, size) in self.qkv_proj.shard_offsets.items()},
                bias=True, dtype=dtype, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
            )


class Qwen2MoeForCausalLM(MoEForCausalLM):
    attention_cls = Qwen2MoeAttention

    def build_mlp(self, config, layer_idx, dtype, quant_config, prefix):
        if not is_sparse_layer(config, layer_idx):
            return gated_mlp(config, config.intermediate_size, dtype, quant_config, prefix)
        return SparseMoeBlock(
            config, dtype, num_experts=config.num_experts, top_k=config.num_experts_per_tok,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
            quant_config=quant_config, prefix=prefix,
        )
