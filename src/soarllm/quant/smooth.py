"""Smoothing mappings, and SmoothQuant (Xiao et al., 2023).

A *mapping* is a group of "balance" linear layers that read one input, and the "smooth" op that
produces that input: a norm, or a linear layer whose output channels feed them one to one.
Scaling the balance layers' input columns by s and dividing the smooth op's output channels by s
leaves the float model unchanged,

    W x = (W diag(s)) (x / s),

so the difficulty of quantizing can be moved between activations and weights for free before any
rounding. SmoothQuant picks s to even out activation outliers for W8A8; AWQ (quant/awq.py) picks
it to protect the weight columns of salient inputs for W4A16. The mappings of a decoder layer:

    q, k, v      <- input_layernorm
    gate, up     <- post_attention_layernorm (Gemma: pre_feedforward_layernorm)
    down         <- up          (up's output channel j is down's input j, times act(gate_j))
    o            <- v           (only without grouped-query attention: one v channel per o input)

A norm multiplies by (offset + weight): offset 0 for Llama's RMSNorm, 1 for Gemma's, found by
probing the norm with a zero weight rather than by class name.

SmoothQuant's factor per input channel j, over calibration activations X and the balance
weights W (all of them, stacked by rows):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

alpha (the migration strength) 0.5 splits the range evenly between activations and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from soarllm.errors import UnsupportedModelError

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MIN = 1e-5  # floor of the statistics a factor is a power of


@dataclass
class SmoothMapping:
    """The balance layers reading one input, and the op (norm or linear) producing it."""

    smooth_name: str
    smooth: nn.Module
    balance_names: list[str]
    balance: list[nn.Linear]

    @property
    def name(self) -> str:
        """e.g. model.layers.3.self_attn.{q,k,v}_proj, for messages and tables."""
        parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in self.balance_names}
        leaves = [n.rsplit(".", 1)[-1] for n in self.balance_names]
        if len(parents) == 1 and len(leaves) > 1:
            parent = parents.pop()
            return f"{parent + '.' if parent else ''}{{{','.join(leaves)}}}"
        return ",".join(self.balance_names)

    def weights(self) -> torch.Tensor:
        """The balance layers' weights stacked by rows, float32 [sum of outputs, in]."""
        return torch.cat([m.weight.detach().float() for m in self.balance])


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(checkpoint prefix of the layers, the decoder layers) of a transformers causal LM."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.layers; smoothing needs a decoder-only model")
    return ("model.layers" if base is not model else "layers"), layers


def layer_mappings(layer: nn.Module, prefix: str = "") -> list[SmoothMapping]:
    """The mappings of one decoder layer (names under `prefix`), or UnsupportedModelError."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    mlp_norm_name = ("pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm")
                     else "post_attention_layernorm")
    need = {"input_layernorm": getattr(layer, "input_layernorm", None),
            mlp_norm_name: getattr(layer, mlp_norm_name, None)}
    need.update({f"self_attn.{n}": getattr(attn, n, None) for n in _ATTENTION + ("o_proj",)})
    need.update({f"mlp.{n}": getattr(mlp, n, None) for n in _MLP})
    missing = [n for n, m in need.items() if m is None]
    wrong = [n for n, m in need.items() if n.endswith("proj") and m is not None
             and not isinstance(m, nn.Linear)]
    if missing or wrong:
        raise UnsupportedModelError(
            f"{type(layer).__name__} has no smoothing mappings (lacks "
            f"{', '.join(missing or wrong)}): SmoothQuant and AWQ support the Llama family "
            "(Llama, Mistral, Qwen2, SmolLM2) and Gemma 3 dense decoders; quantize without "
            "smoothing (--method rtn)"
        )
    for norm_name in ("input_layernorm", mlp_norm_name):
        _norm_offset(need[norm_name], f"{prefix}{norm_name}")  # refuses a norm it cannot fold into

    def mapping(smooth_name, balance_names):
        return SmoothMapping(f"{prefix}{smooth_name}", need[smooth_name],
                             [f"{prefix}{n}" for n in balance_names],
                             [need[n] for n in balance_names])

    found = [
        mapping("input_layernorm", [f"self_attn.{n}" for n in _ATTENTION]),
        mapping(mlp_norm_name, ["mlp.gate_proj", "mlp.up_proj"]),
        mapping("mlp.up_proj", ["mlp.down_proj"]),
    ]
    v, o = need["self_attn.v_proj"], need["self_attn.o_proj"]
    if v.out_features == o.in_features and not hasattr(attn, "v_norm"):
        found.append(mapping("self_attn.v_proj", ["self_attn.o_proj"]))
    return found


def smoothing_mappings(model: nn.Module) -> list[SmoothMapping]:
    """Every decoder layer's mappings, named as in the checkpoint."""
    prefix, layers = decoder_layers(model)
    return [m for i, layer in enumerate(layers) for m in layer_mappings(layer, f"{prefix}.{i}.")]


@torch.no_grad()
def _norm_offset(norm: nn.Module, name: str) -> float:
    """c in norm(x) = normalize(x) * (c + weight): 0 (Llama) or 1 (Gemma), by probing."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise UnsupportedModelError(f"{name} ({type(norm).__name__}) has no per-channel weight "
                                    "to fold smoothing factors into; quantize without smoothing (--method rtn)")
    saved = weight.detach().clone()
    probe = torch.ones(1, weight.numel(), dtype=weight.dtype)
    probe[:, 1::2] = -1  # RMS 1, mean ~0: a mean-centring norm is not mistaken for one
    try:
        weight.zero_()
        at_zero = norm(probe).abs().max().item()
        weight.fill_(1.0)
        at_one = norm(probe).abs().max().item()
    finally:
        weight.copy_(saved)
    if at_zero == 0:
        return 0.0
    if abs(at_one - 2 * at_zero) <= 1e-3 * at_zero:
        return 1.0
    raise UnsupportedModelError(f"{name} ({type(norm).__name__}) scales its output neither by "
                                "its weight nor by 1 + its weight; cannot fold smoothing into it")


@torch.no_grad()
def fold_scales(mapping: SmoothMapping, scales: torch.Tensor) -> None:
    """Balance layers' input columns times s, the smooth op's output channels divided by s (in
    place; the float model computes the same function afterwards)."""
    s = scales.detach().float()
    for linear in mapping.balance:
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])
    smooth = mapping.smooth
    if isinstance(smooth, nn.Linear):
        smooth.weight.div_(s.to(smooth.weight.dtype)[:, None])
        if smooth.bias is not None:
            smooth.bias.div_(s.to(smooth.bias.dtype))
        return
    offset = _norm_offset(smooth, mapping.smooth_name)
    w = smooth.weight
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); 1 where a channel is dead (no activation or
    no weight), which smoothing cannot help."""
    a = act_absmax.float()
    w = weight.float().abs().amax(dim=0)
    s = a.clamp(min=_MIN).pow(alpha) / w.clamp(min=_MIN).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def smooth(mappings: list[SmoothMapping], act_absmax: dict[str, torch.Tensor],
           alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into each mapping, from the per-channel max|x| of each linear
    layer's input (its name in the mapping -> [in]); returns mapping name -> s."""
    applied = {}
    for mapping in mappings:
        s = smoothquant_scales(act_absmax[mapping.balance_names[0]], mapping.weights(), alpha)
        fold_scales(mapping, s)
        applied[mapping.name] = s
    return applied
