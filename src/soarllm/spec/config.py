"""SpeculativeConfig: which proposer drafts tokens and how many (vLLM's key names).

Given as ``speculative_config`` to the engine (a dict, or a JSON string from the command line:
``--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'``). Predicted Outputs
(a request's ``prediction``) need no server configuration: a request that carries a prediction
speculates with it whatever this config says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from soarllm.errors import ConfigError
from soarllm.sampling_params import MAX_SPECULATIVE_TOKENS

METHODS = ("ngram", "suffix", "lookahead", "draft_model")
_ALIASES = {"draft": "draft_model"}


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    # ngram (prompt lookup): the longest and shortest suffix of the text so far to look up.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # suffix: what followed the same last tokens in earlier outputs (context lengths
    # prompt_lookup_min..max) must have this share of those continuations
    suffix_decoding_min_token_prob: float = 0.4
    # lookahead: window W (columns), n-gram size N (N - 1 levels), guess set G (n-grams verified
    # per step); a step computes 1 + G (N - 1) + (W - 1) + W (N - 2) tokens per request
    lookahead_window_size: int = 4
    lookahead_ngram_size: int = 3
    lookahead_guess_set_size: int = 4
    lookahead_pool_from_prompt: bool = True  # start each request's n-gram pool from its prompt
    # draft_model: the draft's checkpoint (sharing the target's tokenizer); None = a self-draft,
    # the target's own checkpoint cut to its first draft_num_layers layers.
    model: str | None = None
    draft_num_layers: int | None = None
    quantization: str | None = None  # of the draft's weights (e.g. "w4a16"); None = as loaded
    # Turn speculation off for a request (or the whole batch) when the step-time cost model says
    # it does not pay; False keeps it always on (for measurements).
    adaptive: bool = True

    def __post_init__(self) -> None:
        self.method = _ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown speculative method {self.method!r}; use one of {list(METHODS)} "
                "(Predicted Outputs need no method: send `prediction` with the request)"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
                f"got {k!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ConfigError(
                f"prompt_lookup_min and prompt_lookup_max must be integers with "
                f"1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}"
            )
        prob = self.suffix_decoding_min_token_prob
        if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0 < prob <= 1:
            raise ConfigError(f"suffix_decoding_min_token_prob must be in (0, 1], got {prob!r}")
        for name, low in (("lookahead_window_size", 1), ("lookahead_ngram_size", 2),
                          ("lookahead_guess_set_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= 64:
                raise ConfigError(f"{name} must be an integer in [{low}, 64], got {v!r}")
        layers = self.draft_num_layers
        if self.method == "draft_model":
            if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)
                                       or layers < 1):
                raise ConfigError(f"draft_num_layers must be a positive integer, got {layers!r}")
            if self.model is None and layers is None and self.quantization is None:
                raise ConfigError(
                    "draft_model needs a draft: a \"model\" sharing the target's tokenizer, or a "
                    "self-draft of the target's first layers (\"draft_num_layers\": e.g. 8) and/or "
                    "its weights quantized (\"quantization\": \"w4a16\")"
                )
        elif self.model is not None or layers is not None or self.quantization is not None:
            raise ConfigError(
                f"model, draft_num_layers and quantization describe a draft model; they do not "
                f"apply to method {self.method!r} (use \"method\": \"draft_model\")"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"speculative_config is not valid JSON ({e.msg} at character {e.pos}); "
                    """write it like '{"method": "ngram", "num_speculative_tokens": 4}'"""
                ) from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(
                f"unknown speculative_config key(s) {unknown}; known ones are {sorted(names)}"
            )
        if "method" not in value:
            raise ConfigError(f"speculative_config needs a method, one of {list(METHODS)}")
        return cls(**value)
