"""A decoder-only transformer's shape, and the parameter counts the roofline needs."""

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

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the layer's projections: Q, K, V, O and the MLP."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + self.mlp_matrices * h * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.num_layers * self.linear_params_per_layer + self.embedding_params + head + norms

    def kv_bytes_per_token(self, kv_bytes: float, tp: int = 1) -> float:
        """K and V of one token over all layers, on one device of a tensor-parallel group."""
        heads = -(-self.num_kv_heads // tp)  # KV heads are replicated when tp > num_kv_heads
        return 2 * self.num_layers * heads * self.head_dim * kv_bytes

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """From a transformers config.json dictionary (nested text_config is followed)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        try:
            h = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
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
            )
        except KeyError as e:
            raise ModelNotFoundError(f"config of {name!r} lacks {e.args[0]!r}") from None


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
