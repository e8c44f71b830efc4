"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen2-MoE's routing without the shared expert,
and attention with an RMSNorm over each head of q and of k before rope (no q/k/v biases unless
``attention_bias``)."""

from __future__ import annotations

from soarllm.model.layers.norm import RMSNorm
from soarllm.model.models.moe import MoEAttention, MoEDims, MoEForCausalLM
from soarllm.model.models.qwen2_moe import is_sparse_layer, qwen_moe_dims


class Qwen3MoeAttention(MoEAttention):
    def __init__(self, config, layer_idx, dtype, rotary_emb, quant_config=None, prefix="",
                 tp=None):
        super().__init__(config, layer_idx, dtype, rotary_emb, quant_config, prefix, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def forward(self, rope, x, kv_cache):
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        q, k = self.rotary_emb[0].apply(rope, q, k)
        o = self.attn(q, k, v.reshape(t, self.num_kv_heads, self.head_dim), kv_cache)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class Qwen3MoeForCausalLM(MoEForCausalLM):
    attention_cls = Qwen3MoeAttention

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
        )
