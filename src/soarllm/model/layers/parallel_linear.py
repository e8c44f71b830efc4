"""Tensor-parallel linear layers (Megatron's split, vLLM's names) and the vocab-parallel
embedding.

- ``ColumnParallelLinear``: each rank holds a slice of the output rows (its heads, its part of the
  intermediate size); the output stays split, no communication.
- ``MergedColumnParallelLinear``: several column-parallel projections in one weight (q/k/v,
  gate/up); each shard is split per rank on its own, so rank r holds q_r, k_r, v_r side by side.
- ``RowParallelLinear``: each rank holds a slice of the input columns and gets a split input; the
  partial outputs are summed with an all-reduce. The bias is added once (rank 0 holds it).
- ``VocabParallelEmbedding``: each rank holds a range of token rows (the vocabulary padded to a
  multiple of the world size); ids outside the range look up zeros and an all-reduce sums the
  ranks. The LM head is a column-parallel linear over the same padded rows.

Every rank loads only its slice: the checkpoint yields full tensors, each parameter's loader
narrows them to the rank's rows or columns before copying (the quantization method's loader then
copies the slice as it would a whole tensor). At world size 1 these are the plain layers: no
wrapping, no collective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soarllm.errors import ConfigError
from soarllm.model.layers.linear import Linear, MergedLinear
from soarllm.model.parallel_state import TPGroup
from soarllm.quant.base import as_float, default_weight_loader


def narrow_padded(tensor: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """``tensor.narrow(dim, start, size)``, zero-padded where the slice runs past the end."""
    avail = max(0, min(size, tensor.shape[dim] - start))
    part = tensor.narrow(dim, min(start, tensor.shape[dim]), avail)
    if avail == size:
        return part
    shape = list(tensor.shape)
    shape[dim] = size - avail
    return torch.cat([part, tensor.new_zeros(shape)], dim=dim)


def _stored(loaded) -> bool:
    """A checkpoint tensor kept as stored (GGUF blocks, compressed-tensors integers) that can cut
    a rank's slice of itself."""
    return not isinstance(loaded, torch.Tensor) and hasattr(loaded, "narrow")


def narrow_loaded(loaded, dim: int, start: int, size: int):
    """A rank's slice of a checkpoint tensor: stored blocks / integers stay stored where the
    slice falls on their boundaries (a quantized layer then loads them as exactly as the whole
    tensor), else the dequantized tensor's slice, zero-padded past the end."""
    if _stored(loaded):
        part = loaded.narrow(dim, start, size)
        if part is not None:
            return part
    return narrow_padded(as_float(loaded), dim, start, size)


def _wrap_loaders(layer: nn.Module, make) -> None:
    """Replace each parameter's weight_loader by ``make(name, param, loader)``."""
    for name, param in list(layer.named_parameters(recurse=False)):
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            param.weight_loader = make(name, param, loader)


class ColumnParallelLinear(Linear):
    """Output rows split over the ranks: rank r holds rows [r * out/W, (r + 1) * out/W)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 tp: TPGroup | None = None, what: str = "output features", **kw):
        tp = tp or TPGroup.single()
        local = tp.split(out_features, what)
        super().__init__(in_features, local, bias=bias, **kw)
        self.tp = tp
        if tp.world_size > 1:
            start = tp.rank * local
            _wrap_loaders(self, lambda _n, _p, load: _rows_loader(load, start, local))


class MergedColumnParallelLinear(MergedLinear):
    """Merged projections, each split over the ranks: ``shard_sizes`` are this rank's rows of
    each shard, ``shard_starts`` where they start in the shard's full checkpoint tensor."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False, *,
                 tp: TPGroup | None = None, shard_starts: dict[str, int] | None = None, **kw):
        super().__init__(in_features, shard_sizes, bias=bias, **kw)
        self.tp = tp = tp or TPGroup.single()
        if tp.world_size > 1:
            starts = dict(shard_starts or {})
            sizes = dict(shard_sizes)
            _wrap_loaders(self, lambda _n, _p, load: _merged_loader(load, starts, sizes))


class RowParallelLinear(Linear):
    """Input columns split over the ranks, partial outputs summed (all-reduce). With
    ``reduce_results`` False the caller sums them, together with other partial sums (an MoE
    block's shared expert and routed experts: one all-reduce for both)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 tp: TPGroup | None = None, what: str = "input features",
                 reduce_results: bool = True, **kw):
        tp = tp or TPGroup.single()
        local = tp.split(in_features, what)
        try:
            super().__init__(local, out_features, bias=bias, **kw)
        except ConfigError as e:  # e.g. a quantization group wider than a rank's inputs
            if tp.world_size == 1:
                raise
            raise ConfigError(
                f"{e} (tensor_parallel_size={tp.world_size} leaves each rank {local} of the "
                f"layer's {in_features} {what}; choose a tensor_parallel_size that leaves every "
                f"rank whole quantization groups)") from e
        self.tp = tp
        self.reduce_results = reduce_results
        if tp.world_size > 1:
            start = tp.rank * local
            # a method that rounds each output row as a whole (one int8 scale per row) takes the
            # full row and keeps these columns itself, so every rank rounds as one rank would
            self.input_shard = (start, local)
            whole = getattr(self.quant_method, "rounds_whole_rows", False)
            _wrap_loaders(self, lambda n, _p, load: _row_parallel_loader(
                load, n, start, local, tp, whole and n != "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x)
        return self.tp.all_reduce(out) if self.tp.world_size > 1 and self.reduce_results else out


class VocabParallelEmbedding(nn.Embedding):
    """Token rows split over the ranks (vocabulary padded to a multiple of the world size)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype,
                 tp: TPGroup | None = None):
        tp = tp or TPGroup.single()
        self.tp = tp
        self.org_vocab_size = num_embeddings
        self.rows_per_rank = -(-num_embeddings // tp.world_size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # a zeroed table, not nn.Embedding's random one (drawing 28M normals took 0.2 s of the
        # default model's start): every row is loaded from the checkpoint
        super().__init__(self.rows_per_rank, embedding_dim,
                         _weight=torch.zeros(self.rows_per_rank, embedding_dim, dtype=dtype),
                         _freeze=True)
        if tp.world_size > 1:
            start, n = self.vocab_start, self.rows_per_rank
            self.weight.weight_loader = lambda p, loaded, shard_id=None: default_weight_loader(
                p, narrow_padded(as_float(loaded), 0, start, n), shard_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(h)


def parallel_lm_head(hidden: int, vocab_size: int, *, tp: TPGroup, dtype: torch.dtype,
                     **kw) -> ColumnParallelLinear:
    """The LM head over the vocabulary padded like ``VocabParallelEmbedding``."""
    padded = -(-vocab_size // tp.world_size) * tp.world_size
    return ColumnParallelLinear(hidden, padded, bias=False, tp=tp, dtype=dtype, **kw)


# -- loaders -----------------------------------------------------------------------------------


def _rows_loader(load, start: int, size: int):
    def loader(param, loaded, shard_id=None):
        load(param, narrow_loaded(loaded, 0, start, size), shard_id)

    return loader


def _merged_loader(load, starts: dict[str, int], sizes: dict[str, int]):
    def loader(param, loaded, shard_id=None):
        if shard_id is None:
            raise ValueError("a fused checkpoint tensor cannot be split for tensor parallelism; "
                             "load a checkpoint with separate projections")
        load(param, narrow_loaded(loaded, 0, starts[shard_id], sizes[shard_id]), shard_id)

    return loader


def _row_parallel_loader(load, name: str, start: int, size: int, tp: TPGroup,
                         whole_rows: bool = False):
    def loader(param, loaded, shard_id=None):
        if whole_rows and not _stored(loaded):  # floats: the method rounds whole rows, cuts
            tensor = as_float(loaded)
        elif name == "bias":  # added once, after the all-reduce sums the ranks
            tensor = as_float(loaded)
            tensor = tensor if tp.is_driver else torch.zeros_like(tensor)
        else:
            tensor = narrow_loaded(loaded, 1, start, size)
        load(param, tensor, shard_id)

    return loader
