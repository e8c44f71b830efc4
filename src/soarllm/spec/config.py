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

METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    # ngram (prompt lookup): the longest and shortest suffix of the text so far to look up.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # Turn speculation off for a request (or the whole batch) when the step-time cost model says
    # it does not pay; False keeps it always on (for measurements).
    adaptive: bool = True

    def __post_init__(self) -> None:
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
