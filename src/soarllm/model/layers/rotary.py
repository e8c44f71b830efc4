"""Rotary position embedding (RoPE) with the scaling variants checkpoints ask for.

Frequencies follow transformers' ROPE_INIT_FUNCTIONS (modeling_rope_utils): default, linear,
llama3, dynamic (dynamic NTK) and yarn. Two of them reach past the trained context:

- yarn: per-dimension blend of interpolated and extrapolated frequencies, and cos/sin scaled by
  the attention factor (mscale, 0.1 ln(factor) + 1, or the mscale/mscale_all_dim ratio of
  DeepSeek's configs); covers original_max_position_embeddings x factor positions.
- dynamic: transformers recomputes the NTK base from the length of each forward pass, which a
  paged KV cache cannot follow (keys cached under one base would be read under another). Like
  vLLM, the table here is computed once for the longest sequence it serves,
  max_position_embeddings x factor: it equals transformers' frequencies at that length, and
  at shorter lengths the positions keep that one base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from soarllm.errors import UnsupportedModelError
from soarllm.kernels.triton_utils import use_triton_kernel


def rope_parameters(config) -> dict:
    """The rope settings of an HF config, whichever transformers version wrote it."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default") or "default")
    if params.get("max_position_embeddings") is None:
        params["max_position_embeddings"] = getattr(config, "max_position_embeddings", None)
    return params


def scaled_max_position(max_position: int, params: dict) -> int:
    """How many positions the rope of `params` covers for a model trained on `max_position`
    (its max_position_embeddings): dynamic NTK and YaRN stretch the trained context."""
    kind = params.get("rope_type", "default")
    if kind == "dynamic":
        return int(max_position * float(params["factor"]))
    if kind == "yarn":
        original = int(params.get("original_max_position_embeddings") or max_position)
        return max(max_position, int(original * _yarn_factor(params, max_position)))
    return max_position


def rope_max_position(config) -> int:
    """The longest sequence an HF config's rope covers (max_position_embeddings, stretched by a
    dynamic-NTK or YaRN factor)."""
    max_position = getattr(config, "max_position_embeddings", None) or 2048
    return scaled_max_position(max_position, rope_parameters(config))


def inv_frequencies(dim: int, params: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the attention scaling factor for a rope config.

    `seq_len` matters to dynamic NTK only: the sequence length its base is stretched for
    (transformers' `seq_len` argument; at most max_position_embeddings means no stretch).
    """
    base = float(params["rope_theta"])
    kind = params.get("rope_type", "default")
    if kind == "dynamic":
        base = _dynamic_ntk_base(dim, base, params, seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "yarn":
        return _yarn(dim, base, params)
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported yet (supported: default, linear, llama3, "
        "dynamic, yarn); use a checkpoint with one of those in rope_scaling / rope_parameters"
    )


def _dynamic_ntk_base(dim: int, base: float, params: dict, seq_len: int | None) -> float:
    factor = float(params["factor"])
    trained = params.get("max_position_embeddings")
    if trained is None:
        raise UnsupportedModelError("dynamic rope scaling needs the config's max_position_embeddings")
    seq_len = max(seq_len or trained, trained)
    return base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))


def _yarn_factor(params: dict, max_position: int | None = None) -> float:
    """YaRN's factor; DeepSeek-style configs may leave it out (then the context ratio)."""
    if params.get("factor") is not None:
        return float(params["factor"])
    trained = max_position or params["max_position_embeddings"]
    return trained / float(params["original_max_position_embeddings"])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, params: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): dimensions that turn fewer than beta_slow times over the original
    context are interpolated (divided by the factor), more than beta_fast times extrapolated
    (kept), a linear ramp between; cos/sin are scaled by the attention factor."""
    factor = _yarn_factor(params)
    original = float(params["original_max_position_embeddings"])
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension turning `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # weight of the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table indexed by position; rotates the first ``rotary_dim`` of each head."""

    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        params = dict(params)
        if params.get("max_position_embeddings") is None:
            params["max_position_embeddings"] = max_position
        # dynamic NTK / YaRN cover more positions than the model was trained on
        max_position = scaled_max_position(max_position, params)
        inv_freq, scaling = inv_frequencies(self.rotary_dim, params, seq_len=max_position)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rotary_dim] for the batch's positions; computed once per step."""
        cos = self.cos.index_select(0, positions).to(dtype)[:, None, :]
        sin = self.sin.index_select(0, positions).to(dtype)[:, None, :]
        return cos, sin

    def apply(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """q [T, Hq, D], k [T, Hkv, D] -> rotated q, k (on CUDA rotated in place, one kernel)."""
        if use_triton_kernel(q) and _kernel_fits(q) and _kernel_fits(k):
            from soarllm.kernels.triton.rotary import rotary_embedding

            return rotary_embedding(q, k, *cos_sin)
        return self.rotate(cos_sin, q), self.rotate(cos_sin, k)

    def rotate(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (any heads sharing the positions) -> rotated x. On CUDA (outside torch.compile
        tracing) a Triton kernel rotates x in place and returns it."""
        cos, sin = cos_sin
        if use_triton_kernel(x) and _kernel_fits(x):
            from soarllm.kernels.triton.rotary import rotary_embedding

            return rotary_embedding(x, None, cos, sin)[0]
        return _rotate(x, cos, sin, self.rotary_dim)


def _kernel_fits(x: torch.Tensor) -> bool:
    """The Triton kernel takes [T, H, D] with unit stride along D."""
    return x.dim() == 3 and x.stride(-1) == 1


def _rotate(x, cos, sin, rd):
    if rd < x.shape[-1]:
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat((_rotate(x_rot, cos, sin, rd), x_pass), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
