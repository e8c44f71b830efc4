"""DeepSeek-V2 / V3: Multi-head Latent Attention (MLA) and DeepSeekMoE.

MLA (DeepSeek-V2 paper, section 2.1). Each token's keys and values come from one compressed
latent ``c_kv`` of ``kv_lora_rank`` (``kv_a_proj_with_mqa``, then ``kv_a_layernorm``) that
``kv_b_proj`` expands to every head's ``k_nope`` (``qk_nope_head_dim``) and value
(``v_head_dim``); position enters only through a decoupled rope key ``k_rope``
(``qk_rope_head_dim``), shared by all heads. Queries come from ``q_proj``, or from the low-rank
path ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` when ``q_lora_rank`` is set, split per
head into ``q_nope`` and ``q_rope``.

The KV cache holds only [c_kv ; k_rope] per token: one "KV head" of width
kv_lora_rank + qk_rope_head_dim, stored once (a one-plane latent cache, kernels/attention.py),
576 values per token and layer for V2/V3 instead of 128 heads x (192 + 128). Attention runs in the
latent space with the absorbed weights: kv_b_proj's key rows W_UK turn q_nope into
q_nope @ W_UK (so q_nope . k_nope = (q_nope @ W_UK) . c_kv), every head attends to the shared
[c_kv ; k_rope] (multi-query attention, the latent as key and value), and the value rows W_UV
lift each head's latent output to its v_head_dim. Prefill uses the same absorbed form (vLLM
expands the latent for long prefills instead: fewer FLOPs, same result).

Rope: DeepSeek's checkpoints lay rope dimensions out in interleaved pairs (x0, x1), (x2, x3), ...
(V2 always; V3 when ``rope_interleave``, its default). They are de-interleaved and rotated in
the NeoX half layout, as transformers' V3 does; only q_rope . k_rope matters, which the
permutation keeps. YaRN's cos/sin factor (mscale / mscale_all_dim) is layers/rotary.py's; the
softmax scale is (qk_nope_head_dim + qk_rope_head_dim)^-0.5 times mscale(factor,
mscale_all_dim)^2 when the rope is scaled.

DeepSeekMoE: layers from ``first_k_dense_replace`` on are sparse: a router (float32, as
checkpoints keep it) picks ``num_experts_per_tok`` of ``n_routed_experts`` by group-limited
top-k (layers/fused_moe.grouped_topk), and ``n_shared_experts`` always-on experts run as one
SwiGLU MLP of n_shared_experts x moe_intermediate_size, added ungated. V2 scores by softmax
(``topk_method`` greedy: one group; group_limited_greedy: ``n_group`` / ``topk_group``), with no
renormalisation (V2 checkpoints set ``norm_topk_prob`` false; transformers ignores it); V3 by
sigmoid plus the per-expert ``e_score_correction_bias`` for the choice only (``noaux_tc``),
renormalised where ``norm_topk_prob``. Both scale the routed weights by
``routed_scaling_factor``.

Tensor parallel (``tp``): each rank holds its heads: its rows of ``q_proj`` / ``q_b_proj`` and of
``kv_b_proj`` (their absorbed W_UK / W_UV), its columns of ``o_proj`` (partial sums all-reduced);
the latent path (``q_a_proj``, ``kv_a_proj_with_mqa``, their norms) is replicated and so is the
latent KV cache, whole on every rank (one "KV head" that every local head reads). Dense MLPs,
shared experts and the vocabulary split as in Llama; the routed experts by width or whole
(``enable_expert_parallel``), one all-reduce for routed + shared.

Not yet: a quantized ``kv_b_proj`` (it stays in the model dtype: its rows are
the absorbed weights), V3's multi-token-prediction layer (its checkpoint tensors, past
``num_hidden_layers``, are skipped), the Triton backend on the latent cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.model.layers.attention import Attention
from soarllm.model.layers.fused_moe import FusedMoE, grouped_topk
from soarllm.model.layers.linear import Linear
from soarllm.model.layers.norm import RMSNorm
from soarllm.model.layers.parallel_linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from soarllm.model.layers.rotary import RotaryEmbedding, rope_parameters
from soarllm.model.models.base import DecoderForCausalLM
from soarllm.model.models.llama import LlamaModel
from soarllm.model.models.moe import MoEDecoderLayer, MoEDims, MoEForCausalLM, gated_mlp
from soarllm.model.parallel_state import TPGroup
from soarllm.quant.base import new_param

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def softmax_scale(config) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled rope."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim")
    if params.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = float(params["factor"])
        m = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x0, x1), (x2, x3), ... -> (x0, x2, ..., x1, x3, ...): the NeoX half layout."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention over a latent KV cache (module docstring)."""

    def __init__(self, config, dtype, rotary_emb: RotaryEmbedding, interleaved_rope: bool,
                 quant_config=None, prefix: str = "", tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        heads_all = config.num_attention_heads
        self.num_heads = tp.split(heads_all, "attention heads")  # this rank's
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.interleaved_rope = interleaved_rope
        hidden = config.hidden_size
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        bias = bool(getattr(config, "attention_bias", False))
        heads = dict(tp=tp, what="attention heads")
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads_all * qk_head_dim, dtype=dtype,
                                               quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj", **heads)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias, dtype=dtype,
                                   quant_config=quant_config, prefix=f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads_all * qk_head_dim,
                                                 dtype=dtype, quant_config=quant_config,
                                                 prefix=f"{prefix}.q_b_proj", **heads)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim,
                                         bias=bias, dtype=dtype, quant_config=quant_config,
                                         prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        # unquantized: its rows are the absorbed weights W_UK and W_UV
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, heads_all * (self.qk_nope_head_dim + self.v_head_dim), dtype=dtype,
            prefix=f"{prefix}.kv_b_proj", **heads)
        self.o_proj = RowParallelLinear(heads_all * self.v_head_dim, hidden, bias=bias,
                                        dtype=dtype, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj", **heads)
        self.rotary_emb = [rotary_emb]  # a list keeps the shared module out of submodules
        self.attn = Attention(softmax_scale(config))

    def forward(self, rope, x, kv_cache):
        t, heads, nope, r = x.shape[0], self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, heads, nope + r)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        latent = self.kv_a_proj_with_mqa(x)
        c_kv, k_rope = latent[:, : self.kv_lora_rank], latent[:, self.kv_lora_rank :]
        c_kv = self.kv_a_layernorm(c_kv)
        # q and k rope parts as heads side by side: one rotation for both
        qk_rope = torch.cat((q_rope, k_rope.view(t, 1, r)), dim=1)
        if self.interleaved_rope:
            qk_rope = deinterleave(qk_rope)
        qk_rope = self.rotary_emb[0].rotate(rope, qk_rope.contiguous())
        # absorbed weights: [H, nope + v, L] rows of kv_b_proj
        w_kv = self.kv_b_proj.weight.view(heads, nope + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
        q_latent = torch.einsum("thd,hdl->thl", q_nope, w_uk)
        q = torch.cat((q_latent, qk_rope[:, :heads]), dim=-1)
        k = torch.cat((c_kv, qk_rope[:, heads]), dim=-1).view(t, 1, self.kv_lora_rank + r)
        o = self.attn(q, k, k, kv_cache)  # the latent is key and value: [T, H, L + R]
        o = torch.einsum("thl,hvl->thv", o[..., : self.kv_lora_rank], w_uv)
        return self.o_proj(o.reshape(t, heads * self.v_head_dim))


class DeepseekRouter(nn.Module):
    """Router logits in float32 (checkpoints keep ``gate.weight`` in float32) and, for V3, the
    per-expert ``e_score_correction_bias`` that steers the choice of experts."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool):
        super().__init__()
        self.weight = new_param((num_experts, hidden), torch.float32)
        self.e_score_correction_bias = (new_param((num_experts,), torch.float32)
                                        if correction_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight)


class DeepseekMoE(nn.Module):
    """Routed experts chosen by group-limited top-k, plus the ungated shared experts."""

    def __init__(self, config, dtype, scoring: str, renormalize: bool, num_groups: int,
                 topk_groups: int, quant_config=None, prefix: str = "",
                 tp: TPGroup | None = None, expert_parallel: bool = False):
        super().__init__()
        self.tp = tp = tp or TPGroup.single()
        self.scoring, self.renormalize = scoring, renormalize
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.scaling_factor = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
        experts = config.n_routed_experts
        if experts % num_groups or not 1 <= topk_groups <= num_groups:
            raise ConfigError(
                f"{prefix}: {experts} experts cannot form n_group={num_groups} groups of which "
                f"topk_group={topk_groups} are kept; fix n_group / topk_group in config.json")
        self.gate = DeepseekRouter(config.hidden_size, experts, scoring == "sigmoid")
        self.experts = FusedMoE(experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, renormalize, config.hidden_act,
                                dtype, prefix=f"{prefix}.experts", tp=tp,
                                expert_parallel=expert_parallel, quant_config=quant_config)
        shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (gated_mlp(config, config.moe_intermediate_size * shared, dtype,
                                         quant_config, f"{prefix}.shared_experts", tp,
                                         reduce_results=False)
                               if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = grouped_topk(self.gate(x), self.experts.top_k, self.num_groups,
                                    self.topk_groups, self.scoring,
                                    self.gate.e_score_correction_bias, self.renormalize,
                                    self.scaling_factor)
        out = self.experts.run(x, weights, ids)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if self.tp.world_size > 1 and self.experts.sums_over_ranks:  # all-to-all dispatch
            return out if shared is None else out + self.tp.all_reduce(shared)
        out = out if shared is None else out + shared
        return self.tp.all_reduce(out) if self.tp.world_size > 1 else out


class DeepseekModel(LlamaModel):
    """Llama's model (same forward: one rope lookup per step, the residual stream) whose layers
    are MLA + a dense or DeepSeekMoE MLP, and whose rope covers qk_rope_head_dim."""

    def __init__(self, config, dtype, quant_config, family: DeepseekV2ForCausalLM):
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   dtype=dtype, tp=family.tp)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings,
                                          rope_parameters(config))
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attention = MLAttention(config, dtype, self.rotary_emb, family.interleaved_rope(config),
                                    quant_config, f"{prefix}.self_attn", family.tp)
            mlp = family.build_mlp(config, i, dtype, quant_config, f"{prefix}.mlp")
            layers.append(MoEDecoderLayer(config, attention, mlp, dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class DeepseekV2ForCausalLM(MoEForCausalLM):
    # only the MLPs merge checkpoint tensors (q_proj stays q_proj: there is no k_proj / v_proj)
    packed_modules = {"gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
    # the cache holds one latent vector per token, key and value at once (kernels/attention.py)
    latent_kv_cache = True
    supports_tensor_parallel = True

    def __init__(self, config, dtype=torch.float32, backend=None, quant_config=None,
                 tp=None, enable_expert_parallel: bool = False):
        DecoderForCausalLM.__init__(self, config, dtype, quant_config, backend, tp)
        self.enable_expert_parallel = enable_expert_parallel
        self.routing = self.check_routing(config)
        # what the runner sizes the KV cache by: one "KV head" of the latent's width, whole on
        # every rank
        self.num_kv_heads, self.head_dim = 1, config.kv_lora_rank + config.qk_rope_head_dim
        self.model = DeepseekModel(config, dtype, quant_config, self)
        self.build_lm_head(self.model.embed_tokens)

    @classmethod
    def moe_dims(cls, config) -> MoEDims:
        shared = getattr(config, "n_shared_experts", None) or 0
        dense = (getattr(config, "first_k_dense_replace", 0) or 0) > 0
        return MoEDims(config.n_routed_experts, config.moe_intermediate_size,
                       config.moe_intermediate_size * shared,
                       config.intermediate_size if dense else 0)

    @staticmethod
    def interleaved_rope(config) -> bool:
        return True  # V2's rope pairs are always interleaved

    def check_routing(self, config) -> tuple[str, bool, int, int]:
        """(scoring, renormalize, n_group, topk_group) of V2's routers, or a clear refusal."""
        method = getattr(config, "topk_method", None) or "greedy"
        if method == "greedy":
            return "softmax", False, 1, 1
        if method == "group_limited_greedy":
            return "softmax", False, config.n_group, config.topk_group
        raise UnsupportedModelError(
            f"DeepSeek-V2 topk_method={method!r} is not supported (greedy, group_limited_greedy); "
            "a V3-style noaux_tc router belongs to architectures=['DeepseekV3ForCausalLM']"
        )

    def build_mlp(self, config, layer_idx, dtype, quant_config, prefix):
        freq = getattr(config, "moe_layer_freq", 1) or 1
        if freq != 1:
            raise UnsupportedModelError(f"moe_layer_freq={freq} is not supported (only 1: every "
                                        "layer from first_k_dense_replace on is sparse)")
        first_dense = getattr(config, "first_k_dense_replace", 0) or 0
        if not getattr(config, "n_routed_experts", None) or layer_idx < first_dense:
            return gated_mlp(config, config.intermediate_size, dtype, quant_config, prefix,
                             self.tp)
        scoring, renormalize, groups, kept = self.routing
        return DeepseekMoE(config, dtype, scoring, renormalize, groups, kept, quant_config, prefix,
                           self.tp, self.enable_expert_parallel)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def interleaved_rope(config) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    def check_routing(self, config) -> tuple[str, bool, int, int]:
        method = getattr(config, "topk_method", None) or "noaux_tc"
        scoring = getattr(config, "scoring_func", None) or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise UnsupportedModelError(
                f"DeepSeek-V3 routing topk_method={method!r}, scoring_func={scoring!r} is not "
                "supported (noaux_tc with sigmoid scores); fix config.json"
            )
        return ("sigmoid", bool(getattr(config, "norm_topk_prob", True)),
                config.n_group or 1, config.topk_group or 1)
