"""Fused Mixture-of-Experts layer: route, sort tokens by expert, one matmul per expert, combine.

Each token's router picks ``top_k`` of ``E`` experts (softmax over the router logits, top-k, the
k weights renormalised to sum to 1 where the config asks: Mixtral always, Qwen-MoE with
``norm_topk_prob``). The T*k (token, expert) slots are sorted by expert (an argsort of the flat
assignment), so each expert's tokens are one contiguous slice; each expert then runs its gate/up
and down projections once over only that slice (``torch._grouped_mm`` over all slices at once,
or one matmul per non-empty expert where it is missing), and the weighted outputs are added back
to their tokens with ``index_add_``. No expert ever sees a token not routed to it.

The experts' weights live stacked, as vLLM and transformers 5 keep them: ``w13`` [E, 2I, H]
(gate rows then up rows) and ``w2`` [E, H, I]. Per-expert checkpoint tensors (Mixtral's
``experts.N.w1/w3/w2``, Qwen's ``experts.N.gate_proj/up_proj/down_proj``) load into their expert's
rows through the parameter's ``weight_loader`` with shard id ``(N, "gate" | "up" | "down")``;
already stacked tensors (transformers 5's ``experts.gate_up_proj`` / ``experts.down_proj``) load
whole with shard id None.

Tensor parallel (``tp``, world size N) splits the experts one of two ways; either way every rank
routes the whole (replicated) batch and the ranks' partial outputs are summed with one all-reduce
(the caller's, so a shared expert's partial sum joins it):

- by width (the default): each rank holds every expert's rows [r * I/N, (r + 1) * I/N) of gate and
  up (column parallel) and the same columns of down (row parallel);
- by expert (``enable_expert_parallel``, vLLM's name): rank r holds experts [r * E/N, (r + 1) * E/N)
  whole and computes only the token slots routed to them; the others add nothing on that rank.

Each rank's loader keeps only its slice: per-expert checkpoint tensors of another rank's experts
are skipped, never copied. By expert, ``expert_dispatch="all_to_all"`` replaces the all-reduce:
each rank takes its share of the (replicated) tokens, sends every (token, expert) slot to the
rank owning the expert, gets the outputs back, weights and sums them, and the shares are
all-gathered (``_dispatched``). With activations replicated by tensor-parallel attention this
moves more bytes than the all-reduce (the default); it is the form that data-parallel attention
(activations sharded by token) would keep without the final gather.

``expert_load`` counts the tokens routed to each expert since the last reset (every expert of
the model, not only this rank's: the routing is replicated); the runner reads it for the engine's
load-balance statistics.

Quantized experts (``quantization="w8a16"`` / ``"w4a16"``, quant/moe.py) keep the stacks' names
with int8 or packed int4 values and add per-row or per-group scales (``gate_up_proj_scale``, ...);
the grouped matmul then loops over the experts that got tokens and dequantizes only their weights
(``torch._grouped_mm`` takes float weights only).

Under ``torch.compile`` the experts run as the custom op ``soarllm::fused_experts`` (opaque to the
compiler, like attention): the per-expert slices have data-dependent sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from soarllm.errors import ConfigError
from soarllm.kernels.ops import define_op
from soarllm.model.layers.activation import ACT_AND_MUL
from soarllm.model.parallel_state import TPGroup
from soarllm.quant.base import QuantizationConfig, as_float, set_weight_loader
from soarllm.quant.moe import STACKS, UnquantizedFusedMoEMethod, dequantize_expert

# A per-expert checkpoint tensor: <module>.experts.<N>.<projection>.weight
EXPERT_TENSOR = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
# projection name in checkpoints -> shard of the stacked weights
EXPERT_SHARDS = {
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",  # Qwen-MoE, DeepSeek
    "w1": "gate", "w3": "up", "w2": "down",  # Mixtral
}


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: (weights float32 [T, k], expert ids int64 [T, k]) for logits [T, E]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(router_logits: torch.Tensor, top_k: int, num_groups: int, topk_groups: int,
                 scoring: str = "softmax", correction_bias: torch.Tensor | None = None,
                 renormalize: bool = False,
                 scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's group-limited routing: (weights float32 [T, k], expert ids [T, k]).

    The E experts form ``num_groups`` groups; each token keeps its ``topk_groups`` best groups
    and picks its ``top_k`` experts among them. A group scores its best expert (V2, softmax
    scores) or, with V3's ``correction_bias`` (sigmoid scores + a per-expert load-balancing
    bias, used for choosing only), the sum of its two best. The weights are the unbiased scores,
    renormalised if asked, times ``routed_scaling_factor``.
    """
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ConfigError(f"router scoring {scoring!r} is not supported (softmax, sigmoid)")
    tokens, experts = scores.shape
    if experts % num_groups or not 1 <= topk_groups <= num_groups:
        raise ConfigError(
            f"{experts} experts cannot form {num_groups} groups of which {topk_groups} are kept; "
            "fix n_group / topk_group in config.json"
        )
    choice = scores if correction_bias is None else scores + correction_bias.float()
    grouped = choice.view(tokens, num_groups, experts // num_groups)
    if correction_bias is None:
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, True)
    allowed = kept.repeat_interleave(experts // num_groups, dim=1)
    ids = choice.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """The T*k slots grouped by expert: (order [T*k] of flat slot indices, token of each sorted
    slot [T*k], tokens per expert [E])."""
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = torch.div(order, topk_ids.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts)
    return order, token_of, counts


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] in expert-sorted order, weight [E, N, K], counts [E] rows per expert -> [M, N]:
    each expert's contiguous rows times its own weight, nothing else. With ``scale`` (and
    ``zero``) the weight is quantized (quant/moe.py) and each expert that has rows is
    dequantized for its own matmul."""
    if scale is None and x.device.type == "cpu" and hasattr(torch, "_grouped_mm"):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)
    rows = weight.shape[1]
    out = x.new_empty(x.shape[0], rows)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            w = weight[e] if scale is None else dequantize_expert(
                weight[e], scale[e], None if zero is None else zero[e]).to(x.dtype)
            torch.mm(x[start : start + n], w.t(), out=out[start : start + n])
            start += n
    return out


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu",
                  expert_start: int | None = None, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, w13_zero: torch.Tensor | None = None,
                  w2_zero: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t of x [T, H].

    ``expert_start`` None: w13 / w2 hold every expert. An int (expert parallel): they hold experts
    [expert_start, expert_start + len(w13)) of a larger set, and only the slots routed to those
    count (the sum is this rank's share). Scales (and zeros): w13 / w2 are quantized
    (quant/moe.py)."""
    args = (x, w13, w2, topk_weights, topk_ids, activation, expert_start, w13_scale, w2_scale,
            w13_zero, w2_zero)
    if torch.compiler.is_compiling():
        return torch.ops.soarllm.fused_experts(*args)
    return _fused_experts(*args)


def _fused_experts(x, w13, w2, topk_weights, topk_ids, activation, expert_start=None,
                   w13_scale=None, w2_scale=None, w13_zero=None, w2_zero=None):
    num_local = w13.shape[0]
    if expert_start is None:
        order, token_of, counts = sort_by_expert(topk_ids, num_local)
    else:  # other ranks' experts go to one extra bucket, sorted last and cut off
        local = topk_ids - expert_start
        local = local.masked_fill((local < 0) | (local >= num_local), num_local)
        order, token_of, counts = sort_by_expert(local, num_local + 1)
        kept = int(counts[:num_local].sum())
        if kept == 0:
            return torch.zeros_like(x)
        order, token_of, counts = order[:kept], token_of[:kept], counts[:num_local]
    xs = x.index_select(0, token_of)
    h = ACT_AND_MUL[activation](grouped_matmul(xs, w13, counts, w13_scale, w13_zero))
    out = grouped_matmul(h, w2, counts, w2_scale, w2_zero)
    out = out * topk_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, out)


define_op(
    "fused_experts",
    "(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, str activation, "
    "int? expert_start, Tensor? w13_scale, Tensor? w2_scale, Tensor? w13_zero, "
    "Tensor? w2_zero) -> Tensor",
    _fused_experts,
    lambda x, *args: torch.empty_like(x),
)


def per_expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    act_and_mul: Callable = ACT_AND_MUL["silu"]) -> torch.Tensor:
    """The dense reference the benchmark compares with: every expert runs over every token and
    its output is kept with the token's weight for it (zero where it was not routed)."""
    num_experts = w13.shape[0]
    dense = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_(1, topk_ids, topk_weights.float())
    out = torch.zeros_like(x)
    for e in range(num_experts):
        y = F.linear(act_and_mul(F.linear(x, w13[e])), w2[e])
        out += dense[:, e : e + 1].to(x.dtype) * y
    return out


class FusedMoE(nn.Module):
    """The routed experts of one MoE block: stacked weights, routing and the fused compute.

    ``forward(x, router_logits)`` -> [T, H]; under tensor parallelism this rank's partial sum,
    which the caller all-reduces. The router (``gate``) is the block's own Linear. A
    ``quant_config`` picks how the experts are stored (``get_moe_method``; None: model dtype).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, activation: str = "silu", dtype: torch.dtype = torch.float32,
                 prefix: str = "", tp: TPGroup | None = None, expert_parallel: bool = False,
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        where = prefix or "MoE layer"
        if not 1 <= top_k <= num_experts:
            raise ConfigError(
                f"{where}: num_experts_per_tok={top_k} must be between 1 and the "
                f"number of experts ({num_experts}); fix num_experts_per_tok in config.json"
            )
        if activation not in ACT_AND_MUL:
            raise ConfigError(
                f"{where}: expert activation {activation!r} is not supported "
                f"(supported: {', '.join(sorted(ACT_AND_MUL))})"
            )
        self.tp = tp = tp or TPGroup.single()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        self.prefix = prefix
        # this rank's experts [expert_start, expert_start + local_experts) and rows of each
        self.expert_parallel = expert_parallel and tp.world_size > 1
        local_experts, local_inter = num_experts, intermediate_size
        if self.expert_parallel:
            check_expert_split(num_experts, tp.world_size, where)
            local_experts = num_experts // tp.world_size
        else:
            check_width_split(intermediate_size, num_experts, tp.world_size, where)
            local_inter = intermediate_size // tp.world_size
        self.expert_start = tp.rank * local_experts if self.expert_parallel else 0
        self.local_experts, self.local_intermediate = local_experts, local_inter
        # transformers 5's names for the stacked tensors, so its state dicts load as they are
        method = quant_config.get_moe_method(self, prefix) if quant_config is not None else None
        self.quant_method = method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(self, dtype)
        for name in STACKS:
            set_weight_loader(getattr(self, name), self.weight_loader)
        # tokens routed to each expert of the model (load-balance statistics)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        # expert_dispatch="all_to_all" (set by the runner, expert parallel only): each rank sends
        # its share of the tokens to the ranks owning their experts and gets the results back
        self.all_to_all = False

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        """shard_id None: the whole stacked tensor; (expert, "gate" | "up" | "down"): one
        expert's projection [I, H] or [H, I]. Either is cut to this rank's experts and rows and
        stored by the quant method (in the model dtype, or quantized)."""
        down = param is self.down_proj
        inter, hidden = self.local_intermediate, self.hidden_size
        to_int4 = getattr(loaded, "to_int4", None)
        store_int4 = getattr(self.quant_method, "store_int4", None)
        blocks = (self._rank_blocks(loaded, down)
                  if shard_id is None and to_int4 is not None and store_int4 is not None else None)
        if blocks is not None:
            # a whole stack of 4-bit blocks (GGUF) into 4-bit experts: repacked, not re-rounded
            # (this rank's experts or its slice of the width, cut on block boundaries)
            q, scale, zero = blocks.to_int4(self.quant_method.group_size)
            expected = (self.local_experts, *((hidden, inter) if down else (2 * inter, hidden)))
            if tuple(q.shape) != expected:
                raise ValueError(f"checkpoint shape {tuple(q.shape)} != expected {expected}")
            store_int4(self, "down_proj" if down else "gate_up_proj", slice(None), slice(None),
                       q, scale, zero)
            return
        columns = None  # a width-split down projection rounded by whole rows (quant method)
        if (down and self.tp.world_size > 1 and not self.expert_parallel
                and getattr(self.quant_method, "rounds_whole_rows", False)):
            columns = (self.tp.rank * inter, inter)
        if shard_id is None:
            tensor = self._rank_slice(as_float(loaded), down, stacked=True, whole_rows=columns)
            experts, rows = slice(None), slice(None)
            expected = (self.local_experts, *((hidden, inter) if down else (2 * inter, hidden)))
        else:
            expert, part = shard_id
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert {expert} out of range: the config has "
                                 f"{self.num_experts} experts")
            if part == "down":
                if not down:
                    raise ValueError("a down projection goes to down_proj")
            elif param is not self.gate_up_proj:
                raise ValueError(f"a {part} projection goes to gate_up_proj")
            experts = expert - self.expert_start
            if not 0 <= experts < self.local_experts:
                return  # another rank's expert
            tensor = self._rank_slice(as_float(loaded), down, stacked=False, whole_rows=columns)
            rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter)}.get(part, slice(None))
            expected = (hidden, inter) if down else (inter, hidden)
        if columns is not None:
            expected = (*expected[:-1], self.intermediate_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {expected}")
        whole_rows = {} if columns is None else {"columns": columns}
        self.quant_method.store(self, "down_proj" if down else "gate_up_proj", experts, rows,
                                tensor, **whole_rows)

    def _rank_blocks(self, blocks, down: bool):
        """This rank's part of a whole stack of stored blocks (``_rank_slice`` for blocks), or
        None where it would cut through a block."""
        if self.tp.world_size == 1:
            return blocks
        if self.expert_parallel:
            return blocks.narrow(0, self.expert_start, self.local_experts)
        inter, local = self.intermediate_size, self.local_intermediate
        start = self.tp.rank * local
        if down:
            return blocks.narrow(-1, start, local)
        gate, up = blocks.narrow(1, start, local), blocks.narrow(1, inter + start, local)
        return type(blocks).concat([gate, up], dim=1)

    def _rank_slice(self, tensor: torch.Tensor, down: bool, stacked: bool,
                    whole_rows=None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor: its experts (stacked tensors, expert
        parallel) or its rows of the expert width (gate / up rows, down columns; with
        ``whole_rows`` down's columns are left for the quant method to cut after rounding)."""
        if self.tp.world_size == 1 or whole_rows is not None:
            return tensor
        if self.expert_parallel:
            return tensor.narrow(0, self.expert_start, self.local_experts) if stacked else tensor
        inter, local = self.intermediate_size, self.local_intermediate
        start = self.tp.rank * local
        if down:  # [.., H, I]: this rank's columns
            return tensor.narrow(-1, start, local)
        if not stacked:  # one gate or up projection [I, H]
            return tensor.narrow(0, start, local)
        gate_up = tensor.narrow(-2, start, local), tensor.narrow(-2, inter + start, local)
        return torch.cat(gate_up, dim=-2)  # [E, 2I, H]: this rank's gate rows, then up rows

    def checkpoint_param(self, proj: str) -> nn.Parameter:
        """The stacked parameter a per-expert projection (checkpoint name) loads into."""
        return self.down_proj if EXPERT_SHARDS[proj] == "down" else self.gate_up_proj

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self.run(x, weights, ids)

    @property
    def sums_over_ranks(self) -> bool:
        """Whether ``run`` returns every token's whole routed sum on every rank (all-to-all
        dispatch), so the block all-reduces only what else it adds (shared experts); else each
        rank returns its partial sum and the block's one all-reduce completes it."""
        return self.all_to_all

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The experts on tokens already routed (weights, ids [T, top_k]; a family's own router,
        e.g. DeepSeek's grouped top-k), counted in ``expert_load``."""
        flat = ids.reshape(-1)
        self.expert_load.index_add_(0, flat, torch.ones_like(flat))
        quantized = {f"{w}_{part}": getattr(self, f"{stack}_{part}", None)
                     for w, stack in (("w13", "gate_up_proj"), ("w2", "down_proj"))
                     for part in ("scale", "zero")}
        if self.all_to_all:
            return self._dispatched(x, weights, ids, quantized)
        return fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.activation,
                             self.expert_start if self.expert_parallel else None, **quantized)

    def _dispatched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    quantized: dict) -> torch.Tensor:
        """All-to-all expert parallelism: rank r takes its contiguous share of the (replicated)
        tokens, sends each (token, expert) slot's hidden state to the rank owning the expert,
        which runs its experts over what it received; the outputs come back the same way, the
        source rank weights and sums each token's k of them, and the ranks' shares are gathered
        so that every rank holds every token's sum again (attention stays tensor parallel)."""
        tp, k = self.tp, self.top_k
        per, extra = divmod(x.shape[0], tp.world_size)  # the first `extra` ranks one more
        sizes = [per + (r < extra) for r in range(tp.world_size)]
        start = sum(sizes[: tp.rank])
        mine = slice(start, start + sizes[tp.rank])
        xs, w, e = x[mine], weights[mine].reshape(-1), ids[mine].reshape(-1)
        dest = torch.div(e, self.local_experts, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)  # slots grouped by the rank they go to
        send = torch.bincount(dest, minlength=tp.world_size)
        recv = tp.all_to_all(send, [1] * tp.world_size, [1] * tp.world_size)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        token_of = torch.div(order, k, rounding_mode="floor")
        got_x = tp.all_to_all(xs.index_select(0, token_of), send_sizes, recv_sizes)
        got_e = tp.all_to_all(e[order] - dest[order] * self.local_experts, send_sizes, recv_sizes)
        y = fused_experts(got_x, self.gate_up_proj, self.down_proj,
                          torch.ones(len(got_e), 1, dtype=torch.float32, device=x.device),
                          got_e[:, None], self.activation, None, **quantized)
        back = tp.all_to_all(y, recv_sizes, send_sizes)
        back = back * w[order].unsqueeze(-1).to(back.dtype)
        out = torch.zeros_like(xs).index_add_(0, token_of, back)
        return tp.all_gather_rows(out, sizes)

    def extra_repr(self) -> str:
        split = ""
        if self.expert_parallel:
            split = (f", local experts [{self.expert_start}, "
                     f"{self.expert_start + self.local_experts})")
        elif self.tp.world_size > 1:
            split = f", local intermediate={self.local_intermediate}"
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, renormalize={self.renormalize}{split}, "
                f"{self.quant_method.describe()}")


def check_expert_split(num_experts: int, world_size: int, where: str = "the model") -> None:
    """Expert parallel: every rank owns the same number of whole experts."""
    if num_experts % world_size:
        raise ConfigError(
            f"{where}: enable_expert_parallel splits the {num_experts} experts over "
            f"tensor_parallel_size={world_size} ranks, which must divide {num_experts}; choose a "
            f"tensor_parallel_size that divides {num_experts}, or leave expert parallelism off "
            f"(drop --enable-expert-parallel) to split each expert's width instead"
        )


def check_width_split(intermediate_size: int, num_experts: int, world_size: int,
                      where: str = "the model") -> None:
    """Tensor parallel by width: every rank owns the same rows of every expert."""
    if intermediate_size % world_size:
        hint = (" or split by expert (--enable-expert-parallel)"
                if num_experts % world_size == 0 else "")
        raise ConfigError(
            f"{where}: tensor_parallel_size={world_size} does not divide the experts' "
            f"intermediate size ({intermediate_size}); choose a tensor_parallel_size that "
            f"divides {intermediate_size}{hint}"
        )
