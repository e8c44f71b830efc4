"""A decoder-only transformer's shape, and the parameter counts the roofline needs.

Dense and mixture-of-experts (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, Kimi-K2) models, with either
grouped-query attention or DeepSeek's multi-head latent attention (MLA), whose KV cache holds one
compressed latent (``kv_lora_rank``) plus one shared rotary key (``qk_rope_head_dim``) per token
and layer instead of K and V per KV head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from soarllm.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    mlp_matrices: int = 3  # gated MLP (gate, up, down); 2 for a plain MLP
    max_position_embeddings: int | None = None
    # Mixture of experts (num_experts 0: dense). Layers without experts keep a dense MLP of
    # intermediate_size: DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers.
    num_experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0  # DeepSeek: always-on experts of moe_intermediate_size
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one gated shared expert of this size
    num_dense_layers: int = 0  # layers with a dense MLP in a MoE model
    # Multi-head latent attention (kv_lora_rank > 0)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: queries projected directly from the hidden state
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    # -- attention --------------------------------------------------------------------------

    @property
    def attention_params_per_layer(self) -> int:
        h, n = self.hidden_size, self.num_heads
        if not self.is_mla:
            q, kv = n * self.head_dim, self.num_kv_heads * self.head_dim
            return h * q + 2 * h * kv + q * h
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * self.q_lora_rank + self.q_lora_rank * n * qk if self.q_lora_rank else h * n * qk
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)  # latent + shared rotary key
        kv_b = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + n * self.v_head_dim * h

    def attention_flops_per_pair(self, decode: bool = False) -> int:
        """FLOPs of one (query, key) pair in one layer, all heads: scores plus the weighted sum.
        An MLA decode step attends in the latent space (the up-projections absorbed into the query
        and output), a prefill expands K and V per head, as DeepSeek's inference code does."""
        n = self.num_heads
        if not self.is_mla:
            return 4 * n * self.head_dim
        if decode:
            return 2 * n * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * n * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)

    def kv_elements_per_token_layer(self, tp: int = 1) -> int:
        """KV cache elements one token adds to one layer on one device of a TP group: K and V of
        the device's KV heads (replicated when tp > num_kv_heads), or MLA's latent and rotary key,
        which every head reads and every TP rank therefore holds whole."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * -(-self.num_kv_heads // tp) * self.head_dim

    def kv_bytes_per_token(self, kv_bytes: float, tp: int = 1) -> float:
        """KV cache of one token over all layers, on one device of a tensor-parallel group."""
        return self.num_layers * self.kv_elements_per_token_layer(tp) * kv_bytes

    # -- MLP and experts --------------------------------------------------------------------

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden_size * self.intermediate_size

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of a dense layer's projections: attention and the MLP."""
        return self.attention_params_per_layer + self.dense_mlp_params

    @property
    def expert_params(self) -> int:
        """One routed expert (a gated MLP of moe_intermediate_size)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_params_per_moe_layer(self) -> int:
        """Weights every token of a MoE layer uses: the router, shared experts and their gate."""
        h = self.hidden_size
        shared = self.num_shared_experts * self.expert_params
        if self.shared_expert_intermediate_size:
            shared += 3 * h * self.shared_expert_intermediate_size + h  # + the sigmoid gate
        return h * self.num_experts + shared

    @property
    def non_expert_linear_params(self) -> int:
        """Projections every token passes through: split by tensor parallel, read every step."""
        dense_mlps = (self.num_layers - self.num_moe_layers) * self.dense_mlp_params
        return (self.num_layers * self.attention_params_per_layer + dense_mlps
                + self.num_moe_layers * self.shared_params_per_moe_layer)

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def active_linear_params(self) -> int:
        """Projections one token passes through (the FLOPs of a token are twice this)."""
        return (self.non_expert_linear_params
                + self.num_moe_layers * self.experts_per_token * self.expert_params)

    def expected_distinct_experts(self, tokens: float) -> float:
        """Experts of one MoE layer that ``tokens`` tokens touch, each picking top-k of E: under
        uniform routing an expert is missed by a token with probability 1 - k/E, so the expected
        count is E (1 - (1 - k/E)^tokens). A decode step reads only these experts' weights."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)

    # -- totals -----------------------------------------------------------------------------

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        per_layer = 2 * self.hidden_size
        if self.is_mla:
            per_layer += self.kv_lora_rank + self.q_lora_rank  # the latents' own RMSNorms
        return self.num_layers * per_layer + self.hidden_size

    @property
    def table_params(self) -> int:
        """Embedding and LM head (one matrix when tied)."""
        return self.embedding_params + (0 if self.tie_word_embeddings else self.lm_head_params)

    @property
    def num_params(self) -> int:
        return (self.non_expert_linear_params + self.routed_expert_params + self.table_params
                + self.norm_params)

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses, embeddings and LM head included (the published convention
        of Mixtral's 12.9B and DeepSeek-V3's 37B)."""
        return self.active_linear_params + self.table_params + self.norm_params

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """From a transformers config.json dictionary (nested text_config is followed)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        try:
            h = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                name=name,
                hidden_size=h,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or h // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_position_embeddings=config.get("max_position_embeddings"),
                **_moe_fields(config),
                **_mla_fields(config),
            )
        except KeyError as e:
            raise ModelNotFoundError(f"config of {name!r} lacks {e.args[0]!r}") from None
        if shape.is_moe and not 0 < shape.experts_per_token <= shape.num_experts:
            raise ModelNotFoundError(
                f"config of {name!r}: num_experts_per_tok={shape.experts_per_token} must be "
                f"between 1 and the number of experts ({shape.num_experts})")
        return shape


def _moe_fields(config: dict[str, Any]) -> dict[str, int]:
    """Expert fields under each family's spelling: Mixtral (num_local_experts; its
    intermediate_size is the expert's), Qwen2/3-MoE (num_experts, decoder_sparse_step,
    mlp_only_layers), DeepSeek-V2/V3 and Kimi-K2 (n_routed_experts, n_shared_experts,
    first_k_dense_replace, moe_layer_freq)."""
    layers = int(config["num_hidden_layers"])
    if config.get("num_local_experts"):
        return {"num_experts": int(config["num_local_experts"]),
                "experts_per_token": int(config["num_experts_per_tok"]),
                "moe_intermediate_size": int(config["intermediate_size"])}
    if config.get("n_routed_experts"):
        first, freq = int(config.get("first_k_dense_replace") or 0), int(
            config.get("moe_layer_freq") or 1)
        moe = sum(1 for i in range(layers) if i >= first and i % freq == 0)
        return {"num_experts": int(config["n_routed_experts"]),
                "experts_per_token": int(config["num_experts_per_tok"]),
                "moe_intermediate_size": int(config["moe_intermediate_size"]),
                "num_shared_experts": int(config.get("n_shared_experts") or 0),
                "num_dense_layers": layers - moe}
    if config.get("num_experts"):
        step, dense = int(config.get("decoder_sparse_step") or 1), set(
            config.get("mlp_only_layers") or [])
        moe = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
        return {"num_experts": int(config["num_experts"]),
                "experts_per_token": int(config["num_experts_per_tok"]),
                "moe_intermediate_size": int(config["moe_intermediate_size"]),
                "shared_expert_intermediate_size": int(
                    config.get("shared_expert_intermediate_size") or 0),
                "num_dense_layers": layers - moe}
    return {}


def _mla_fields(config: dict[str, Any]) -> dict[str, int]:
    if not config.get("kv_lora_rank"):
        return {}
    return {"kv_lora_rank": int(config["kv_lora_rank"]),
            "q_lora_rank": int(config.get("q_lora_rank") or 0),
            "qk_nope_head_dim": int(config["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(config["qk_rope_head_dim"]),
            "v_head_dim": int(config["v_head_dim"])}


def _known_models() -> dict[str, Any]:
    return json.loads(resources.files("soarllm.plan").joinpath("models.json").read_text())


def known_model_names() -> list[str]:
    return sorted(_known_models()["models"])


def _from_gguf(path: Path) -> ModelShape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        return field.parts[field.data[0]].tolist()[0] if field.data else None

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = {
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "vocab_size": len(tokens.data) if tokens is not None else value(f"{arch}.vocab_size"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "max_position_embeddings": value(f"{arch}.context_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    return ModelShape.from_config(config, name=path.stem)


def load_model_shape(spec: str) -> ModelShape:
    """A shape from a known name, a config.json, a model directory or a ``.gguf`` file."""
    known = _known_models()
    key = known["aliases"].get(spec, known["aliases"].get(spec.lower(), spec))
    if key in known["models"]:
        return ModelShape.from_config(known["models"][key], name=key)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelShape.from_config(json.loads((path / "config.json").read_text()), path.name)
    if path.is_file() and path.suffix == ".json":
        return ModelShape.from_config(json.loads(path.read_text()), path.stem)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: pass a config.json, a model directory, a .gguf file or one of "
        f"{', '.join(known_model_names())}"
    )
