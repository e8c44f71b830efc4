"""What the Mixture-of-Experts families share: a Llama-style decoder whose MLP is a sparse block.

The sparse block is a router (``gate``, a Linear to E logits, left unquantized as its logits pick
the experts), the routed experts (layers/fused_moe.py) and, in Qwen2-MoE, a shared expert that
every token runs, scaled by a sigmoid gate. Attention, norms, rope and the residual stream are
Llama's (model/models/llama.py), reused as they are; each family (mixtral.py, qwen2_moe.py,
qwen3_moe.py) says which attention it uses, which layers are sparse and how checkpoint names map.

Checkpoints store each expert's projections apart (``...experts.N.w1.weight``); they load into
the stacked expert weights through FusedMoE's weight_loader (see ``_load_one``).

Tensor parallel (``tp``): attention, dense MLPs, the shared expert and the vocabulary split as in
Llama; the router is replicated (every rank routes the whole batch); the routed experts split by
width, or by expert with ``enable_expert_parallel`` (layers/fused_moe.py). The block's partial
sums (routed + shared expert) are added up with one all-reduce.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.model.layers.attention import Attention
from soarllm.model.layers.fused_moe import (
    EXPERT_SHARDS,
    EXPERT_TENSOR,
    FusedMoE,
    check_expert_split,
    check_width_split,
)
from soarllm.model.layers.linear import Linear
from soarllm.model.layers.norm import RMSNorm
from soarllm.model.layers.parallel_linear import VocabParallelEmbedding
from soarllm.model.layers.rotary import RotaryEmbedding, rope_parameters
from soarllm.model.models.base import DecoderForCausalLM
from soarllm.model.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel
from soarllm.model.parallel_state import TPGroup

# a per-expert tensor other than the float weight: a quantized checkpoint's packed values, scales
QUANTIZED_EXPERT_TENSOR = re.compile(r"^.+\.experts\.\d+\.\w+\.(?:weight_\w+|input_scale)$")


@dataclass(frozen=True)
class MoEDims:
    """What tensor / expert parallelism must split evenly in a family's config."""

    num_experts: int
    intermediate_size: int  # of each routed expert
    shared_intermediate_size: int = 0  # of the shared expert (0: none)
    dense_intermediate_size: int = 0  # of the dense MLP layers (0: none)


def check_expert_parallel(model_cls, config, world_size: int, enable_expert_parallel: bool) -> None:
    """Refuse, before any weight loads, a split the model cannot take: expert parallelism for a
    model without experts, experts (or widths) the ranks cannot share evenly."""
    dims = getattr(model_cls, "moe_dims", None)
    if dims is None:
        if enable_expert_parallel:
            raise ConfigError(
                f"enable_expert_parallel splits the experts of Mixture-of-Experts models, and "
                f"{model_cls.__name__} has none; drop --enable-expert-parallel")
        return
    if world_size == 1:
        return
    d = dims(config)
    if enable_expert_parallel:
        check_expert_split(d.num_experts, world_size)
    else:
        check_width_split(d.intermediate_size, d.num_experts, world_size)
    tp = TPGroup(rank=0, world_size=world_size)
    if d.shared_intermediate_size:
        tp.split(d.shared_intermediate_size, "shared expert's intermediate size")
    if d.dense_intermediate_size:
        tp.split(d.dense_intermediate_size, "intermediate size (MLP width)")


def gated_mlp(config, intermediate_size: int, dtype, quant_config, prefix: str,
              tp: TPGroup | None = None, reduce_results: bool = True) -> LlamaMLP:
    """A dense SwiGLU MLP of the given width (shared experts, dense layers of a sparse model)."""
    view = SimpleNamespace(hidden_size=config.hidden_size, intermediate_size=intermediate_size,
                           hidden_act=config.hidden_act, mlp_bias=False)
    mlp = LlamaMLP(view, dtype, quant_config, prefix, tp)
    mlp.down_proj.reduce_results = reduce_results
    return mlp


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional shared expert behind a sigmoid gate)."""

    def __init__(self, config, dtype, *, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, shared_intermediate_size: int = 0, quant_config=None,
                 prefix: str = "", tp: TPGroup | None = None, expert_parallel: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.tp = tp = tp or TPGroup.single()
        self.gate = Linear(hidden, num_experts, bias=False, dtype=dtype, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, top_k, hidden, intermediate_size, renormalize,
                                config.hidden_act, dtype, prefix=f"{prefix}.experts", tp=tp,
                                expert_parallel=expert_parallel, quant_config=quant_config)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            # its partial sum joins the experts' in the block's one all-reduce
            self.shared_expert = gated_mlp(config, shared_intermediate_size, dtype, quant_config,
                                           f"{prefix}.shared_expert", tp, reduce_results=False)
            self.shared_expert_gate = Linear(hidden, 1, bias=False, dtype=dtype,
                                             prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        shared = (torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
                  if self.shared_expert is not None else None)
        if self.tp.world_size > 1 and self.experts.sums_over_ranks:  # all-to-all dispatch
            return out if shared is None else out + self.tp.all_reduce(shared)
        out = out if shared is None else out + shared
        return self.tp.all_reduce(out) if self.tp.world_size > 1 else out


class MoEAttention(LlamaAttention):
    """Llama attention; a config with ``layer_types`` says per layer whether it slides."""

    def __init__(self, config, layer_idx: int, dtype, rotary_emb, quant_config=None,
                 prefix: str = "", tp: TPGroup | None = None):
        super().__init__(config, layer_idx, dtype, rotary_emb, quant_config, prefix, tp)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            window = config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
            self.attn = Attention(self.scale, window or None)


class MoEDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (same forward) around the family's attention and MLP."""

    def __init__(self, config, attention: nn.Module, mlp: nn.Module, dtype):
        nn.Module.__init__(self)
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class MoEModel(LlamaModel):
    """Llama's model (same forward) whose layers the family builds."""

    def __init__(self, config, dtype, quant_config, family: MoEForCausalLM):
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   dtype=dtype, tp=family.tp)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(
            head_dim, config.max_position_embeddings, rope_parameters(config),
            rotary_dim=int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
        )
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attention = family.attention_cls(config, i, dtype, self.rotary_emb, quant_config,
                                             f"{prefix}.self_attn", family.tp)
            mlp = family.build_mlp(config, i, dtype, quant_config, f"{prefix}.mlp")
            layers.append(MoEDecoderLayer(config, attention, mlp, dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class MoEForCausalLM(DecoderForCausalLM):
    """A family: its attention class, its sparse/dense MLP per layer, its checkpoint names."""

    attention_cls: type[nn.Module] = MoEAttention
    # checkpoint name fragment -> our module path fragment
    checkpoint_renames: dict[str, str] = {}
    supports_tensor_parallel = True

    def __init__(self, config, dtype=torch.float32, backend=None, quant_config=None,
                 tp: TPGroup | None = None, enable_expert_parallel: bool = False):
        super().__init__(config, dtype, quant_config, backend, tp)
        self.enable_expert_parallel = enable_expert_parallel
        self.model = MoEModel(config, dtype, quant_config, self)
        self.build_lm_head(self.model.embed_tokens)

    @classmethod
    def moe_dims(cls, config) -> MoEDims:
        raise NotImplementedError

    def build_mlp(self, config, layer_idx: int, dtype, quant_config, prefix: str) -> nn.Module:
        raise NotImplementedError

    def sparse_block(self, config, dtype, quant_config, prefix: str, **dims) -> SparseMoeBlock:
        """The family's sparse block, split over this model's ranks."""
        return SparseMoeBlock(config, dtype, quant_config=quant_config, prefix=prefix,
                              tp=self.tp, expert_parallel=self.enable_expert_parallel, **dims)

    def dense_mlp(self, config, dtype, quant_config, prefix: str) -> LlamaMLP:
        return gated_mlp(config, config.intermediate_size, dtype, quant_config, prefix, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts = [m for m in self.modules() if isinstance(m, FusedMoE)]
        for m in experts:
            m.loaded_shards = set()
        loaded = super().load_weights(weights)
        for m in experts:
            want = {(e, p) for e in range(m.num_experts) for p in ("gate", "up", "down")}
            if m.loaded_shards and m.loaded_shards != want:
                lacking = sorted(want - m.loaded_shards)
                raise ValueError(f"checkpoint lacks {len(lacking)} expert tensors of {m.prefix}, "
                                 f"e.g. (expert, projection) {lacking[:3]}")
            del m.loaded_shards
        return loaded

    def _load_one(self, name: str, tensor, params) -> str:
        for old, new in self.checkpoint_renames.items():
            name = name.replace(old, new)
        match = EXPERT_TENSOR.match(name)
        if match is None and QUANTIZED_EXPERT_TENSOR.match(name):
            raise UnsupportedModelError(
                f"checkpoint tensor {name!r}: experts stored quantized (compressed-tensors "
                "weight_packed / weight_scale, ...) cannot be loaded yet; serve the unquantized "
                "checkpoint with quantization='w8a16' (or 'w4a16') to quantize the experts at load")
        if match is None or match["proj"] not in EXPERT_SHARDS:
            return super()._load_one(name, tensor, params)
        try:
            module = self.get_submodule(match["module"])
        except AttributeError:
            module = None
        if not isinstance(module, FusedMoE):
            raise KeyError(f"checkpoint tensor {name!r} has no matching experts layer")
        expert, part = int(match["expert"]), EXPERT_SHARDS[match["proj"]]
        param = module.checkpoint_param(match["proj"])
        try:
            param.weight_loader(param, tensor, (expert, part))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if hasattr(module, "loaded_shards"):
            module.loaded_shards.add((expert, part))
        return f"{match['module']}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
