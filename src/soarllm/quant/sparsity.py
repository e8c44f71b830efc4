"""2:4 semi-structured sparsity: in every group of 4 consecutive inputs of an output row, 2
weights are kept and 2 are zero (the pattern sparse tensor cores run; here it buys memory).

Selection (which 2 of each 4 to keep), before the layer is quantized:

    magnitude   the larger |W_ij|                  (no calibration)
    wanda       the larger |W_ij| * ||X_j||_2      (Sun et al., 2023: "Wanda"; X_j is input j over
                the calibration tokens, read off the diagonal of GPTQ's H = 2 X X^T / n, which
                ranks the same since sqrt(n / 2) is common to the group)

With GPTQ the mask is fixed first and the pruned weights are quantized to 0 inside GPTQ's column
loop, so their error is compensated like rounding error (SparseGPT's joint prune + quantize with
a Wanda mask).

Storage, compressed-tensors' ``sparse-24-bitmask`` format stacked on ``pack-quantized``:

    weight_packed       the kept integers only, [out, in / 2] in row order, packed to int32 as
                        pack-quantized packs a weight of that shape (library's pack_to_int32)
    bitmask             uint8 [out, ceil(in / 8)]: bit j of byte b is input 8 b + j (the library's
                        pack_bitmasks, numpy's little bit order); exactly 2 bits set per nibble
    weight_shape        the dense [out, in]; weight_scale / weight_zero_point as the dense layer's

Pruned weights are exactly 0: their integer is the group's zero point. compressed-tensors
0.15+ dropped its sparse compressors (its ModelCompressor writes ``sparsity_config: {}``) and the
old ones compressed only a float or int8 ``weight`` tensor, never packed integers; so no released
library decompresses this layout. The library's own pieces do (unpack_from_int32, unpack_bitmasks,
then the pack-quantized decompressor: the tests' oracle). ``dense`` storage writes the pruned
weights as ordinary pack-quantized tensors with a ``dense`` sparsity_config (metadata only), which
transformers and vLLM read today; it does not shrink the file.
"""

from __future__ import annotations

import math

import torch

from soarllm.errors import ConfigError, UnsupportedModelError

PATTERN = "2:4"
SELECTIONS = ("magnitude", "wanda")
FORMATS = ("sparse-24-bitmask", "dense")
SPARSE_SUFFIXES = ("bitmask",)


def check_options(sparsity: str | None, prune: str | None, fmt: str) -> None:
    """`soar quantize --sparsity/--prune/--sparse-format` values."""
    if sparsity is None:
        if prune is not None:
            raise ConfigError("--prune applies with --sparsity 2:4 only; add it or leave --prune out")
        return
    if str(sparsity).strip() != PATTERN:
        raise ConfigError(f"sparsity {sparsity!r} is not supported; the one pattern is "
                          f"--sparsity {PATTERN} (2 of every 4 consecutive inputs kept)")
    if prune is not None and prune not in SELECTIONS:
        raise ConfigError(f"unknown --prune {prune!r}; use one of {', '.join(SELECTIONS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown sparse format {fmt!r}; use one of {', '.join(FORMATS)}")


def check_prunable(linears: dict) -> None:
    """Every layer to prune has a multiple of 4 inputs."""
    bad = [(n, m.in_features) for n, m in linears.items() if m.in_features % 4]
    if bad:
        name, size = bad[0]
        raise ConfigError(f"2:4 sparsity needs a multiple of 4 inputs per layer; {name} has "
                          f"{size} ({len(bad)} layer(s) like it): quantize without --sparsity")


# -- selection ----------------------------------------------------------------------------------

def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """bool [out, in]: the 2 highest scores of each group of 4 inputs (ties: the lower input)."""
    rows, cols = scores.shape
    if cols % 4:
        raise ConfigError(f"2:4 sparsity needs a multiple of 4 inputs; the layer has {cols}")
    groups = scores.float().reshape(rows, cols // 4, 4)
    keep = groups.argsort(dim=-1, descending=True, stable=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """|W| * ||X_j|| (up to a factor common to every weight), or |W| without activations."""
    score = weight.detach().float().abs()
    if hessian is None:
        return score
    return score * torch.diagonal(hessian).float().clamp(min=0).sqrt()[None, :]


def prune_24(weight: torch.Tensor, hessian: torch.Tensor | None = None):
    """(weight with the pruned entries zeroed, keep mask) by Wanda's score, or by magnitude."""
    mask = mask_24(wanda_scores(weight, hessian))
    return weight * mask, mask


# -- storage ------------------------------------------------------------------------------------

def sparsity_config(fmt: str, ignore: list[str], global_sparsity: float) -> dict:
    """The ``sparsity_config`` of config.json's quantization_config (the library's classes)."""
    from compressed_tensors.config import DenseSparsityConfig, Sparse24BitMaskConfig

    cls = Sparse24BitMaskConfig if fmt == "sparse-24-bitmask" else DenseSparsityConfig
    config = cls(targets=["Linear"], ignore=ignore, global_sparsity=global_sparsity,
                 sparsity_structure=PATTERN)
    return config.model_dump(mode="json", exclude={"registry_requires_subclass"})


def compress_24(parts: dict[str, torch.Tensor], mask: torch.Tensor, args) -> dict[str, torch.Tensor]:
    """A pack-quantized layer's tensors -> its sparse-24-bitmask tensors (kept integers + mask)."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    from compressed_tensors.utils.helpers import pack_bitmasks

    rows, cols = mask.shape
    q = unpack_from_int32(parts["weight_packed"], args.num_bits, torch.Size((rows, cols)))
    out = dict(parts)
    out["weight_packed"] = pack_to_int32(q[mask].reshape(rows, cols // 2), args.num_bits)
    out["bitmask"] = pack_bitmasks(mask.cpu()).contiguous()
    return out


def unpack_mask(bitmask: torch.Tensor, shape: tuple[int, int], where: str) -> torch.Tensor:
    """bool [out, in] keep mask of a stored bitmask, checked to be 2:4."""
    rows, cols = shape
    if cols % 4 or tuple(bitmask.shape) != (rows, math.ceil(cols / 8)) or bitmask.dtype != torch.uint8:
        raise UnsupportedModelError(
            f"{where}: bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit a 2:4 layer of "
            f"shape {tuple(shape)} (uint8 [{rows}, {math.ceil(cols / 8)}] expected); the "
            "checkpoint is damaged or not sparse-24-bitmask"
        )
    mask = bits(bitmask, cols)
    per_group = mask.reshape(rows, cols // 4, 4).sum(-1)
    bad = (per_group != 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise UnsupportedModelError(
            f"{where}: its stored mask keeps {int(per_group[r, g])} of the 4 inputs "
            f"{4 * g}..{4 * g + 3} of row {r} ({len(bad)} group(s) like it); a 2:4 layer keeps "
            "exactly 2 of every 4. Re-write the checkpoint (soar quantize --sparsity 2:4)"
        )
    return mask


def bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """bool [out, cols] of a little-bit-order packed bitmask [out, ceil(cols / 8)]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    return ((bitmask[..., None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)[:, :cols]


def kept_columns(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 [out, cols / 2]: the input index of each kept weight, in stored (row) order."""
    groups = bits(bitmask, cols).reshape(bitmask.shape[0], cols // 4, 4).to(torch.uint8)
    within = groups.argsort(dim=-1, descending=True, stable=True)[..., :2]  # stable: in input order
    base = torch.arange(0, cols, 4, device=bitmask.device)[None, :, None]
    return (within + base).reshape(bitmask.shape[0], cols // 2)
