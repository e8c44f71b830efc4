"""Per-request generation settings (names follow vLLM / OpenAI)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from soarllm.errors import InvalidRequestError

_GREEDY_EPS = 1e-5

# Bounds of the request parameters: validate() enforces them and the HTTP schemas publish them
# (serve/protocol_*.py read these names, so the two never disagree).
MAX_N = 128
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # larger than any vocabulary: top_k >= vocab size keeps every token
MAX_REPETITION_PENALTY = 10.0  # repetition_penalty in (0, MAX_REPETITION_PENALTY]
MAX_ABS_PENALTY = 2.0  # presence_penalty and frequency_penalty in [-2, 2]
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_SPECULATIVE_TOKENS = 16
MAX_GUIDED_CHOICES = 1024


@dataclass
class StructuredOutputParams:
    """Constrained decoding: exactly one of these is set, and every token the request samples
    keeps its output a prefix of a string the constraint accepts; the request stops (finish reason
    "stop") once nothing can follow. Enforced by the engine's grammar engine (llguidance), which
    refuses what it cannot enforce (naming the keyword) when the request is added.

    - ``json``: a JSON schema (a dict, or its JSON text); ``json_object``: any JSON object.
    - ``regex``: the whole output matches it (Rust regex syntax: no look-around, no backrefs).
    - ``choice``: the output is one of these strings.
    - ``grammar``: a context-free grammar in Lark syntax (``start: ...``) or GBNF/EBNF
      (``root ::= ...``).

    With a constraint, min_tokens bans on EOS and stop tokens do not apply (the grammar decides
    where the output may end) and the request never speculates.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as text (JSON schemas and choice lists serialized canonically): with
        ``kind``, the key of a compiled-grammar cache."""
        kind = self.kind
        if kind == "json_object":
            return ""
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            try:  # the same schema as a dict or as text: one key
                value = json.loads(value)
            except ValueError:
                return value
        if isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param="structured_outputs")

        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise bad("structured output takes exactly one of json, json_object, regex, choice "
                      f"and grammar; got {', '.join(set_) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise bad("a json schema must be an object (or its JSON text)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise bad(f"{name} must be a non-empty string")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_GUIDED_CHOICES:
                raise bad(f"choice must list 1 to {MAX_GUIDED_CHOICES} strings")
            if any(not isinstance(c, str) or not c for c in self.choice):
                raise bad("choice must list non-empty strings")


class RequestOutputKind(enum.Enum):
    """When the engine hands out a RequestOutput for a request (vLLM's names)."""

    CUMULATIVE = 0  # after every step: the text and tokens so far, plus what the step added
    FINAL_ONLY = 2  # once, when the request finishes (LLM.generate: no per-step output to build)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: sampled token + top-k
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Predicted Outputs (OpenAI's `prediction`): text (or token ids) the output is expected to
    # mostly repeat; verified as speculative drafts, never changing the output.
    prediction: str | list[int] | None = None
    # Draft tokens per step for this request (0: no speculation; None: the engine's setting).
    num_speculative_tokens: int | None = None
    # Constrained decoding (JSON schema, regex, choice, grammar); None: free text.
    structured_outputs: StructuredOutputParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param=param)

        if not isinstance(self.n, int) or self.n < 1 or self.n > MAX_N:
            raise bad("n", f"n must be an integer between 1 and {MAX_N}, got {self.n!r}")
        if self.temperature < 0 or self.temperature > MAX_TEMPERATURE:
            raise bad("temperature",
                      f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.top_k, int) or self.top_k > MAX_TOP_K:
            raise bad("top_k", f"top_k must be an integer up to {MAX_TOP_K} (0 or -1: all "
                      f"tokens), got {self.top_k!r}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad(
                "repetition_penalty",
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got "
                f"{self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -MAX_ABS_PENALTY <= v <= MAX_ABS_PENALTY:
                raise bad(name, f"{name} must be in [{-MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}], "
                          f"got {v}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        k = self.num_speculative_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)
                              or not 0 <= k <= MAX_SPECULATIVE_TOKENS):
            raise bad("num_speculative_tokens", "num_speculative_tokens must be an integer in "
                      f"[0, {MAX_SPECULATIVE_TOKENS}] (0: no speculation), got {k!r}")
        if self.prediction is not None and not isinstance(self.prediction, (str, list)):
            raise bad("prediction", "prediction must be a string or a list of token ids")
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputParams):
                raise bad("structured_outputs", "structured_outputs must be a "
                          "StructuredOutputParams")
            so.validate()
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"seed must be an integer, got {self.seed!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise bad("stop", "stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got "
                      f"{len(self.stop)}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0
               for t in self.stop_token_ids):
            raise bad("stop_token_ids", "stop_token_ids must be token ids (integers >= 0, below "
                      "the vocabulary size)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
