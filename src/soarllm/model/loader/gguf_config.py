"""A transformers config built from a GGUF file's metadata (llama.cpp's key names)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from soarllm.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# GGUF general.architecture -> (transformers config class, HF architecture). llama.cpp stores
# Mistral checkpoints as "llama"; LlamaForCausalLM runs them unchanged. It stores Mixtral as
# "llama" too, with {arch}.expert_count set (MIXTRAL below).
ARCHITECTURES: Mapping[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
MIXTRAL = ("MixtralConfig", "MixtralForCausalLM")
# Whether llama.cpp renormalises the k router weights of an MoE architecture (its graph hard-codes
# it: src/models/*.cpp, build_moe_ffn's norm_w) unless the file says {arch}.expert_weights_norm.
MOE_RENORMALIZE: Mapping[str, bool] = {"llama": True, "qwen2moe": False, "qwen3moe": True}

# llama.cpp hard-codes these for Gemma 3 (src/llama-model.cpp) instead of storing them.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0

# Tokens that end a chat turn. llama.cpp stops on them by their text; HF lists them as eos ids.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata, `{arch}` filled in."""

    def __init__(self, reader: GGUFReader):
        self._fields = reader.fields
        self.tensor_names = frozenset(t.name for t in reader.tensors)
        arch = self._fields.get("general.architecture")
        if arch is None:
            raise ConfigError("the GGUF file has no general.architecture: it is not a model file")
        self.architecture: str = arch.contents()

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key.replace("{arch}", self.architecture))
        if field is None:
            return default
        return field.contents()

    def array_length(self, key: str) -> int | None:
        field = self._fields.get(key)
        return None if field is None else len(field.data)


def gguf_architecture(reader: GGUFReader) -> str:
    return GGUFMetadata(reader).architecture


def config_from_gguf(reader: GGUFReader) -> PretrainedConfig:
    import transformers

    meta = GGUFMetadata(reader)
    arch = meta.architecture
    experts = meta.get("{arch}.expert_count") or 0
    if arch not in ARCHITECTURES:
        kind = "Mixture-of-Experts architecture" if experts else "architecture"
        raise UnsupportedModelError(
            f"GGUF {kind} {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(sorted(ARCHITECTURES))} (Mixture-of-Experts: llama with experts "
            "(Mixtral), qwen2moe, qwen3moe). Load the original HF checkpoint instead."
        )
    config_class, hf_arch = MIXTRAL if arch == "llama" and experts else ARCHITECTURES[arch]
    kwargs = _common_kwargs(meta)
    kwargs["architectures"] = [hf_arch]
    if arch in MOE_RENORMALIZE and (experts or arch != "llama"):
        kwargs.update(_moe_kwargs(meta, kwargs))
    if arch == "gemma3":
        kwargs.update(_gemma3_kwargs(meta, kwargs))
    elif arch == "qwen2moe":
        kwargs["qkv_bias"] = "blk.0.attn_q.bias" in meta.tensor_names
    elif arch == "qwen3moe":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in meta.tensor_names
    elif arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in meta.tensor_names
        if "rope_freqs.weight" in meta.tensor_names:
            logger.warning(
                "%s stores llama3-style rope frequency factors (rope_freqs.weight); they are not "
                "carried over, so positions beyond the original context may degrade",
                meta.get("general.name", "this GGUF"),
            )
    return getattr(transformers, config_class)(**kwargs)


def _common_kwargs(meta: GGUFMetadata) -> dict[str, Any]:
    heads = meta.get("{arch}.attention.head_count")
    hidden = meta.get("{arch}.embedding_length")
    head_dim = (
        meta.get("{arch}.attention.key_length")
        or meta.get("{arch}.rope.dimension_count")
        or hidden // heads
    )
    vocab_size = meta.get("{arch}.vocab_size") or meta.array_length("tokenizer.ggml.tokens")
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.get("{arch}.feed_forward_length"),
        "num_hidden_layers": meta.get("{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.get("{arch}.context_length"),
        "rms_norm_eps": _f32(meta.get("{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in meta.tensor_names,
        "rope_parameters": _rope_parameters(meta),
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = meta.get(gguf_key)
        if value is not None:
            kwargs[hf_key] = value
    window = meta.get("{arch}.attention.sliding_window")
    if window:
        kwargs["sliding_window"] = window
    return kwargs


def _moe_kwargs(meta: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    """The routing and expert widths of an MoE file (llama.cpp's keys and its defaults), or a
    clear refusal of routing our MoE layers do not compute."""
    import gguf

    arch = meta.architecture
    experts = meta.get("{arch}.expert_count") or 0
    used = meta.get("{arch}.expert_used_count") or 0
    if not experts or not 1 <= used <= experts:
        raise ConfigError(
            f"the {arch} GGUF file says expert_count={experts}, expert_used_count={used}; a "
            "Mixture-of-Experts file needs 1 <= expert_used_count <= expert_count (a broken "
            "conversion: convert the HF checkpoint again)")
    gating = meta.get("{arch}.expert_gating_func")
    if gating not in (None, gguf.ExpertGatingFuncType.SOFTMAX.value):
        raise UnsupportedModelError(
            f"the {arch} GGUF file routes with gating function {gating} (sigmoid); soarllm's "
            f"{arch} experts route by softmax. Load the original HF checkpoint instead")
    scale = meta.get("{arch}.expert_weights_scale")
    if scale not in (None, 0.0, 1.0):
        raise UnsupportedModelError(
            f"the {arch} GGUF file scales the router weights by {scale}, which {arch} models "
            "do not; load the original HF checkpoint instead")
    renormalize = bool(meta.get("{arch}.expert_weights_norm", MOE_RENORMALIZE[arch]))
    if arch == "llama":  # Mixtral: every layer sparse, experts as wide as feed_forward_length
        if not renormalize:
            raise UnsupportedModelError("a llama GGUF with experts that does not renormalise "
                                        "the router weights is not Mixtral; load the HF checkpoint")
        dense = _dense_layers(meta, common["num_hidden_layers"])
        if dense:
            raise UnsupportedModelError(
                f"the llama GGUF file has experts but layers {dense} hold none; Mixtral has "
                "experts in every layer. Load the original HF checkpoint instead")
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    dense_width = common["intermediate_size"] or 0
    # llama.cpp's fallback when the width is not stored: feed_forward_length / used
    width = meta.get("{arch}.expert_feed_forward_length") or dense_width // used
    if not width:
        raise ConfigError(f"the {arch} GGUF file stores neither expert_feed_forward_length nor "
                          "feed_forward_length; convert the HF checkpoint again")
    kwargs: dict[str, Any] = {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "norm_topk_prob": renormalize,
        "moe_intermediate_size": width,
        "decoder_sparse_step": 1,
        "mlp_only_layers": _dense_layers(meta, common["num_hidden_layers"]),
    }
    if arch == "qwen2moe":
        shared = meta.get("{arch}.expert_shared_count")
        if shared not in (None, 1):
            raise UnsupportedModelError(
                f"the qwen2moe GGUF file has {shared} shared experts; Qwen2-MoE has one. "
                "Load the original HF checkpoint instead")
        kwargs["shared_expert_intermediate_size"] = (
            meta.get("{arch}.expert_shared_feed_forward_length") or dense_width)
    return kwargs


def _dense_layers(meta: GGUFMetadata, layers: int) -> list[int]:
    """Layers without a router (ffn_gate_inp): dense MLPs in a sparse model."""
    return [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in meta.tensor_names]


def _rope_parameters(meta: GGUFMetadata) -> dict[str, Any]:
    theta = _f32(meta.get("{arch}.rope.freq_base", 10_000.0))
    kind = meta.get("{arch}.rope.scaling.type", "none")
    factor = meta.get("{arch}.rope.scaling.factor")
    if kind in ("none", None) or not factor or factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    params: dict[str, Any] = {"rope_type": kind, "rope_theta": theta, "factor": _f32(factor)}
    original = meta.get("{arch}.rope.scaling.original_context_length")
    if original:
        params["original_max_position_embeddings"] = original
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(
            f"GGUF rope scaling type {kind!r} is not supported (only linear and yarn)"
        )
    return params


def _gemma3_kwargs(meta: GGUFMetadata, common: dict[str, Any]) -> dict[str, Any]:
    layers = common["num_hidden_layers"]
    pattern = meta.get("{arch}.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # one flag per layer: True where the layer slides
        sliding = [bool(flag) for flag in pattern]
    else:  # every pattern-th layer attends globally
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    local_theta = _f32(meta.get("{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA))
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B model (62 layers).
    scalar = (
        common["hidden_size"] // common["num_attention_heads"]
        if layers == 62
        else common["head_dim"]
    )
    return {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {
            "full_attention": common["rope_parameters"],
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": meta.get("{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get("{arch}.attn_logit_softcapping"),
    }


def add_end_of_turn_ids(config: PretrainedConfig, vocab: Mapping[str, int]) -> None:
    """Make `config.eos_token_id` a list that also holds the vocab's end-of-turn tokens.

    A GGUF names one eos token; chat models also end a turn with e.g. <end_of_turn> (Gemma),
    which HF lists in generation_config.json and llama.cpp recognizes by its text.
    """
    eos = config.eos_token_id
    ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
    for token in END_OF_TURN_TOKENS:
        token_id = vocab.get(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    if len(ids) > 1:
        config.eos_token_id = ids


def _f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))
