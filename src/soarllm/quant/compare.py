"""Layer-wise precision compare (MindStudio-style): two models on the same tokens, layer by layer.

Both models load through soarllm's loader (e.g. a GGUF file dequantized vs its `soar quantize`d
copy, or one checkpoint with two `quantization` settings). Forward hooks on the decoder layers
catch each layer's output hidden state (the residual stream after the layer: the layer returns
vLLM's (mlp output, residual) pair, whose sum it is); per layer the two models' states are
compared by per-token cosine similarity and max / mean absolute error, and the final logits by
top-1 and top-k agreement. The first layer whose mean cosine falls below the threshold is named
as where the drift starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from soarllm.errors import ConfigError


@dataclass
class LayerDiff:
    layer: int
    cosine_mean: float
    cosine_min: float
    max_abs: float
    mean_abs: float


@dataclass
class CompareResult:
    model_a: str
    model_b: str
    num_tokens: int
    layers: list[LayerDiff]
    logits_cosine_mean: float
    top1_agreement: float
    topk_agreement: float  # mean |top-k(a) & top-k(b)| / k over tokens
    k: int
    threshold: float
    first_drift_layer: int | None  # first layer with mean cosine < threshold
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_model(model: str, quantization: str | None = None, dtype: torch.dtype = torch.float32):
    """(our model, its HF config, tokenizer directory), loaded as the engine loads it."""
    from soarllm.kernels.attention import ReferenceAttentionBackend
    from soarllm.model.loader import load_checkpoint
    from soarllm.model.registry import resolve_model_class
    from soarllm.quant.config import get_quant_config

    ckpt = load_checkpoint(model)
    cls = resolve_model_class(ckpt.config)
    qc = get_quant_config(quantization, ckpt, cls.packed_modules)
    net = cls(ckpt.config, dtype, ReferenceAttentionBackend(), quant_config=qc)
    net.load_weights(qc.weights(ckpt, dtype) if qc else ckpt.weights(dtype))
    return net.eval(), ckpt.config, ckpt.tokenizer_dir


def _decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no model.layers to compare")
    return layers


def _hidden(out) -> torch.Tensor:
    if isinstance(out, tuple):
        h, residual = out[0], out[1]
        return h if residual is None else h + residual
    return out


@torch.inference_mode()
def run_layers(model, ids: list[int], block_size: int = 16):
    """One prefill of `ids`: ([hidden state after each decoder layer, float32 [T, H]],
    logits float32 [T, V])."""
    from soarllm.kernels.attention import AttentionMetadata

    n = len(ids)
    blocks = math.ceil(n / block_size)
    dtype = next(model.parameters()).dtype
    caches = [torch.zeros(2, blocks, block_size, model.num_kv_heads, model.head_dim, dtype=dtype)
              for _ in range(model.num_layers)]
    positions = torch.arange(n)
    meta = AttentionMetadata(
        positions=positions, query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([n]),
        slot_mapping=positions.clone(), block_tables=torch.arange(blocks)[None],
        logits_indices=positions.clone(), num_decodes=0, query_lens_cpu=[n],
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
    )
    states: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: states.append(_hidden(out).float()))
               for layer in _decoder_layers(model)]
    try:
        hidden = model(torch.tensor(ids), positions, caches, meta)
        logits = model.compute_logits(hidden).float()
    finally:
        for h in handles:
            h.remove()
    return states, logits


def compare_models(model_a, model_b, prompts_ids: list[list[int]], *, threshold: float = 0.99,
                   k: int = 5, names: tuple[str, str] = ("A", "B")) -> CompareResult:
    if model_a.num_layers != model_b.num_layers:
        raise ConfigError(f"the models have {model_a.num_layers} and {model_b.num_layers} "
                          "decoder layers; compare two versions of the same model")
    if model_a.vocab_size != model_b.vocab_size:
        raise ConfigError(f"the models' vocabularies differ ({model_a.vocab_size} vs "
                          f"{model_b.vocab_size}); compare two versions of the same model")
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model_a.num_layers)]
    cos_all, top1, topk = [], [], []
    for ids in prompts_ids:
        sa, la = run_layers(model_a, ids)
        sb, lb = run_layers(model_b, ids)
        for i, (a, b) in enumerate(zip(sa, sb)):
            if a.shape != b.shape:
                raise ConfigError(f"layer {i} hidden sizes differ ({tuple(a.shape)} vs "
                                  f"{tuple(b.shape)}); compare two versions of the same model")
            per_layer[i].append(torch.stack([
                F.cosine_similarity(a, b, dim=-1), (a - b).abs().amax(dim=-1),
                (a - b).abs().mean(dim=-1)]))
        cos_all.append(F.cosine_similarity(la, lb, dim=-1))
        top1.append((la.argmax(-1) == lb.argmax(-1)).float())
        ta, tb = la.topk(k, dim=-1).indices, lb.topk(k, dim=-1).indices
        topk.append((ta[:, :, None] == tb[:, None, :]).any(-1).float().mean(-1))
    layers = []
    for i, rows in enumerate(per_layer):
        m = torch.cat(rows, dim=1)  # [3, tokens]
        layers.append(LayerDiff(i, m[0].mean().item(), m[0].min().item(), m[1].max().item(),
                                m[2].mean().item()))
    drift = next((d.layer for d in layers if d.cosine_mean < threshold), None)
    return CompareResult(
        model_a=names[0], model_b=names[1], num_tokens=sum(len(p) for p in prompts_ids),
        layers=layers, logits_cosine_mean=torch.cat(cos_all).mean().item(),
        top1_agreement=torch.cat(top1).mean().item(), topk_agreement=torch.cat(topk).mean().item(),
        k=k, threshold=threshold, first_drift_layer=drift,
    )


def default_prompts(tokenizer, num: int = 4, tokens: int = 128) -> list[list[int]]:
    """Held-out text the project did not write: stdlib source and Python reference prose."""
    from soarllm.eval.corpus import corpus_text

    out = []
    for name in ("stdlib", "prose"):
        ids = tokenizer.encode(corpus_text(name, max_chars=tokens * 8 * num), add_special_tokens=False)
        out += [ids[i * tokens : (i + 1) * tokens] for i in range(num // 2)]
    return [p for p in out if len(p) >= 2]
