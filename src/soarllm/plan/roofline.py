"""A roofline model of one engine step, layer by layer, on one device of a tensor-parallel group.

For a step that computes ``T`` new tokens for ``B`` sequences (per device, TP degree ``t``):

* FLOPs  = 2 T P_lin L / t                               (Q, K, V, O and MLP projections)
         + 4 h_q sum_i(new_i * ctx_i) L / t              (QK^T and PV; causal prefill of s tokens
                                                           uses new * ctx = s (s + 1) / 2)
         + 2 n_logits h V / t                            (LM head, vocab-parallel)
* bytes  = (L P_lin w + V h a) / t                       (weights read once per step)
         + 2 L kv_dev d k sum_i ctx_i   (decode)         (KV cache read)
         + 2 L kv_dev d k T                              (KV cache written)
* comm   = 2 L [2 (t - 1) / t  T h a / (bw_link comm_eff) + latency]   (two all-reduces a layer)
* time   = max(FLOPs / (peak compute_eff), bytes / (bw memory_eff))     (sum when not overlapped)
         + comm + step_overhead + B seq_overhead

with h_q = heads x head_dim, kv_dev = ceil(kv_heads / t), d = head_dim, w / a / k the bytes of a
weight, an activation and a KV element. TTFT is the prefill step of a batch of prompts that
arrive together; TPOT is one decode step with every sequence at its mid-output context.
"""

from __future__ import annotations

from dataclasses import dataclass

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import ModelShape

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
GROUP_SCALE_BYTES = 2.0 / 128  # one fp16 scale per group of 128 weights


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
        raise InvalidRequestError(f"unknown --quant {quant!r}; use w8a16, w4a16 or w8a8")


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

    @property
    def eff(self) -> Efficiency:
        return self.efficiency or self.hardware.efficiency

    def weight_bytes(self) -> float:
        """Weights on one device: quantized projections, embeddings and LM head in activation
        precision (a tied LM head is the embedding itself)."""
        m, p = self.model, self.precision
        proj = m.num_layers * m.linear_params_per_layer * p.weight_bytes
        tables = m.embedding_params + (0 if m.tie_word_embeddings else m.lm_head_params)
        norms = (2 * m.num_layers + 1) * m.hidden_size
        return (proj + (tables + norms) * p.act_bytes) / self.tp

    def step(self, new_tokens: list[int], contexts: list[int], n_logits: int) -> StepCost:
        """Cost of one step: sequence i computes ``new_tokens[i]`` tokens ending at context
        length ``contexts[i]`` (which includes them)."""
        m, p, hw, eff, t = self.model, self.precision, self.hardware, self.eff, self.tp
        T, B = sum(new_tokens), len(new_tokens)
        q_dim = m.num_heads * m.head_dim
        kv_dev = -(-m.num_kv_heads // t)
        pairs = 0.0  # sum over query tokens of the keys each attends to
        kv_read_tokens = 0
        for new, ctx in zip(new_tokens, contexts):
            past = ctx - new
            pairs += new * past + new * (new + 1) / 2
            if new == 1:
                kv_read_tokens += ctx
        flops = (
            2 * T * m.linear_params_per_layer * m.num_layers / t
            + 4 * q_dim * pairs * m.num_layers / t
            + 2 * n_logits * m.hidden_size * m.vocab_size / t
        )
        lm_head_bytes = m.lm_head_params * p.act_bytes / t
        proj_bytes = m.num_layers * m.linear_params_per_layer * p.weight_bytes / t
        kv_elem = 2 * m.num_layers * kv_dev * m.head_dim * p.kv_bytes
        nbytes = proj_bytes + lm_head_bytes + kv_elem * (kv_read_tokens + T)
        compute_s = flops / (hw.peak_flops(p.compute_dtype) * eff.compute_eff)
        memory_s = nbytes / (hw.memory_bw_gbs * 1e9 * eff.memory_eff)
        comm_s = 0.0
        if t > 1:
            if hw.interconnect_gbs <= 0:
                raise InvalidRequestError(f"{hw.name} has no interconnect for tensor parallel")
            msg = T * m.hidden_size * p.act_bytes
            per_allreduce = (2 * (t - 1) / t) * msg / (hw.interconnect_gbs * 1e9 * eff.comm_eff)
            comm_s = 2 * m.num_layers * (per_allreduce + hw.interconnect_latency_us * 1e-6)
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
