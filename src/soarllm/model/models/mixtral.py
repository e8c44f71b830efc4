"""Mixtral: Llama/Mistral attention (optional sliding window) and a sparse MoE block in every
layer, top-k of ``num_local_experts`` with the k router weights renormalised to sum to 1.

Checkpoints name the block ``block_sparse_moe`` and the expert projections w1 (gate), w3 (up) and
w2 (down); transformers 5 renames it ``mlp`` (our name) on loading.
"""

from __future__ import annotations

from soarllm.model.models.moe import MoEDims, MoEForCausalLM


class MixtralForCausalLM(MoEForCausalLM):
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    @classmethod
    def moe_dims(cls, config) -> MoEDims:
        return MoEDims(config.num_local_experts, config.intermediate_size)

    def build_mlp(self, config, layer_idx, dtype, quant_config, prefix):
        return self.sparse_block(
            config, dtype, quant_config, prefix, num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok, intermediate_size=config.intermediate_size,
            renormalize=True,
        )
