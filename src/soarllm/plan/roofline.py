"""A roofline model of one engine step, layer by layer, on one device of a parallel layout.

For a step that computes ``T`` new tokens for ``B`` sequences (per device, TP degree ``t``;
experts spread over ``S = max(ep, t)`` devices that together see ``T_e = T S / t`` tokens):

* FLOPs  = 2 T P_act / t                                 (projections a token passes through:
                                                           attention, dense MLP, shared and top-k
                                                           experts)
         + f_pair sum_i(new_i * ctx_i) L / t             (attention; causal prefill of s tokens
                                                           uses new * ctx = s (s + 1) / 2)
         + 2 n_logits h V / t                            (LM head, vocab-parallel)
* bytes  = (P_dense w + V h a) / t                       (non-expert weights read once per step)
         + L_moe D(T_e) P_exp w / S                      (the experts the step's tokens touch,
                                                           D(n) = E (1 - (1 - k/E)^n))
         + L c_dev k sum_i ctx_i   (decode)              (KV cache read)
         + L c_dev k T                                   (KV cache written)
* comm   = n_ar  all_reduce(t, T h a)                    (2 a layer; 1 in a MoE layer under EP)
         + 2 L_moe all_to_all(S, T / t x top-k x h a)    (EP dispatch + combine, when S > t)
* time   = max(FLOPs / (peak compute_eff), bytes / (bw memory_eff))     (sum when not overlapped)
         + comm + step_overhead + B seq_overhead

with f_pair = 4 heads x head_dim for GQA (2 for QK^T, 2 for PV; MLA: ``attention_flops_per_pair``),
c_dev the KV elements per token and layer on a device (2 ceil(kv_heads / t) head_dim; MLA:
kv_lora_rank + qk_rope_head_dim, whole on every rank), w / a / k the bytes of a weight, an
activation and a KV element, and the collectives of ``collectives``. Expert traffic assumes
uniform routing (no hot experts, no load imbalance). TTFT is the prefill step of a batch of
prompts that arrive together; TPOT is one decode step with every sequence at its mid-output
context.
"""

from __future__ import annotations

from dataclasses import dataclass

from soarllm.errors import InvalidRequestError
from soarllm.plan.collectives import all_reduce_s, all_to_all_s
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import ModelShape

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
GROUP_SCALE_BYTES = 2.0 / 128  # one fp16 scale per group of 128 weights
BLOCK_SCALE_BYTES = 4.0 / (128 * 128)  # fp8: one fp32 scale per 128 x 128 block (DeepSeek-V3)
QUANTS = ("w8a16", "w4a16", "w8a8", "fp8")


@dataclass(frozen=True)
class Precision:
    """Bytes per weight / activation / KV element and the dtype the matmuls run in."""

    weight_bytes: float
    act_bytes: float
    kv_bytes: float
    compute_dtype: str
    label: str

    @classmethod
    def make(cls, dtype: str, quant: str | None = None, kv_dtype: str | None = None) -> Precision:
        if dtype not in DTYPE_BYTES:
            raise InvalidRequestError(f"unknown dtype {dtype!r}; use {', '.join(DTYPE_BYTES)}")
        act = DTYPE_BYTES[dtype]
        kv = DTYPE_BYTES.get(kv_dtype or dtype)
        if kv is None:
            raise InvalidRequestError(f"unknown --kv-dtype {kv_dtype!r}; use {', '.join(DTYPE_BYTES)}")
        if quant in (None, "", "none"):
            return cls(act, act, kv, dtype, dtype)
        if quant == "w8a16":
            return cls(1.0 + GROUP_SCALE_BYTES, act, kv, dtype, quant)
        if quant == "w4a16":
            return cls(0.5 + GROUP_SCALE_BYTES, act, kv, dtype, quant)
        if quant == "w8a8":
            return cls(1.0, act, kv, "int8", quant)
        if quant == "fp8":
            return cls(1.0 + BLOCK_SCALE_BYTES, act, kv, "fp8", quant)
        raise InvalidRequestError(f"unknown --quant {quant!r}; use {', '.join(QUANTS)}")


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float
    comm_s: float
    compute_s: float
    memory_s: float
    overhead_s: float
    time_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Roofline:
    model: ModelShape
    hardware: Hardware
    precision: Precision
    tp: int = 1
    efficiency: Efficiency | None = None  # None: the hardware's own
    ep: int = 1  # devices the routed experts are spread over (<= tp: split with TP, no all-to-all)

    @property
    def eff(self) -> Efficiency:
        return self.efficiency or self.hardware.efficiency

    @property
    def expert_shards(self) -> int:
        return max(self.ep, self.tp)

    def weight_bytes(self) -> float:
        """Weights on one device: quantized projections (the non-expert ones split by TP, the
        routed experts over the expert-parallel group), embeddings, LM head and norms in
        activation precision (a tied LM head is the embedding itself)."""
        m, p = self.model, self.precision
        dense = (m.non_expert_linear_params * p.weight_bytes
                 + (m.table_params + m.norm_params) * p.act_bytes)
        return dense / self.tp + m.routed_expert_params * p.weight_bytes / self.expert_shards

    def expert_bytes_read(self, tokens: int) -> float:
        """Routed-expert weights one device reads in a step of ``tokens`` tokens per replica."""
        m = self.model
        if not m.is_moe:
            return 0.0
        moe_tokens = tokens * self.expert_shards / self.tp
        return (m.num_moe_layers * m.expected_distinct_experts(moe_tokens) * m.expert_params
                * self.precision.weight_bytes / self.expert_shards)

    def comm_s(self, tokens: int) -> float:
        """All-reduces of the TP group and, under expert parallel, the all-to-alls of the MoE
        layers (each device dispatches its 1/t share of the tokens to their top-k experts)."""
        m, p, hw, eff, t, s = (self.model, self.precision, self.hardware, self.eff, self.tp,
                               self.expert_shards)
        ep_layers = m.num_moe_layers if s > t else 0
        n_all_reduce = 2 * m.num_layers - ep_layers
        comm = n_all_reduce * all_reduce_s(hw, eff, t, tokens * m.hidden_size * p.act_bytes)
        if ep_layers:
            dispatch = tokens / t * m.experts_per_token * m.hidden_size * p.act_bytes
            comm += 2 * ep_layers * all_to_all_s(hw, eff, s, dispatch)
        return comm

    def step(self, new_tokens: list[int], contexts: list[int], n_logits: int) -> StepCost:
        """Cost of one step: sequence i computes ``new_tokens[i]`` tokens ending at context
        length ``contexts[i]`` (which includes them)."""
        m, p, hw, eff, t = self.model, self.precision, self.hardware, self.eff, self.tp
        T, B = sum(new_tokens), len(new_tokens)
        attention_flops = 0.0
        kv_read_tokens = 0
        for new, ctx in zip(new_tokens, contexts):
            past = ctx - new
            pairs = new * past + new * (new + 1) / 2  # keys each query token attends to
            attention_flops += pairs * m.attention_flops_per_pair(decode=new == 1)
            if new == 1:
                kv_read_tokens += ctx
        flops = (
            2 * T * m.active_linear_params / t
            + attention_flops * m.num_layers / t
            + 2 * n_logits * m.hidden_size * m.vocab_size / t
        )
        lm_head_bytes = m.lm_head_params * p.act_bytes / t
        dense_bytes = m.non_expert_linear_params * p.weight_bytes / t
        kv_token = m.kv_bytes_per_token(p.kv_bytes, t)
        nbytes = (dense_bytes + self.expert_bytes_read(T) + lm_head_bytes
                  + kv_token * (kv_read_tokens + T))
        compute_s = flops / (hw.peak_flops(p.compute_dtype) * eff.compute_eff)
        memory_s = nbytes / (hw.memory_bw_gbs * 1e9 * eff.memory_eff)
        comm_s = self.comm_s(T)
        overhead = eff.step_overhead_s + B * eff.seq_overhead_s
        core = max(compute_s, memory_s) if eff.overlap else compute_s + memory_s
        return StepCost(flops, nbytes, comm_s, compute_s, memory_s, overhead,
                        core + comm_s + overhead)

    def ttft(self, batch: int, input_len: int) -> StepCost:
        """Prefill of ``batch`` prompts of ``input_len`` tokens that arrive together."""
        return self.step([input_len] * batch, [input_len] * batch, batch)

    def tpot(self, batch: int, input_len: int, output_len: int) -> StepCost:
        """One decode step of ``batch`` sequences at their mid-output context."""
        ctx = input_len + max(1, output_len // 2)
        return self.step([1] * batch, [ctx] * batch, batch)

    def kv_bytes_per_sequence(self, input_len: int, output_len: int) -> float:
        return self.model.kv_bytes_per_token(self.precision.kv_bytes, self.tp) * (
            input_len + output_len)

    def max_batch_by_memory(self, input_len: int, output_len: int) -> int:
        free = self.hardware.usable_memory_bytes - self.weight_bytes()
        if free <= 0:
            return 0
        return int(free // self.kv_bytes_per_sequence(input_len, output_len))
