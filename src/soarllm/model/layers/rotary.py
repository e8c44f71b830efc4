"""Rotary position embedding (RoPE) with the scaling variants checkpoints ask for."""

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
    return params


def inv_frequencies(dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the attention scaling factor for a rope config."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
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
        f"rope scaling type {kind!r} is not supported yet (supported: default, linear, llama3)"
    )


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table indexed by position; rotates the first ``rotary_dim`` of each head."""

    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        inv_freq, scaling = inv_frequencies(self.rotary_dim, params)
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
