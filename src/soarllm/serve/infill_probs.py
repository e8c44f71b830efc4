"""/infill's ``n_probs``: llama.cpp server's ``completion_probabilities``, from engine logprobs.

One entry per generated token, as llama.cpp's server README (tools/server, /completion's
"Response format") writes it since its probabilities moved to log space::

    {"id": 42, "token": " x", "bytes": [32, 120], "logprob": -0.3,
     "top_logprobs": [{"id": 42, "token": " x", "bytes": [32, 120], "logprob": -0.3}, ...]}

``top_logprobs`` holds the ``n_probs`` most likely tokens, most likely first. The probabilities
are those of the model's own distribution (a softmax of its logits, before penalties and
samplers), as llama.cpp reports them unless ``post_sampling_probs`` (not served) is set.
``token`` is the token's piece as text (invalid UTF-8, half of a character, replaced) and
``bytes`` its raw bytes: byte-level BPE symbols mapped back to their bytes, SentencePiece's
``<0xNN>`` byte tokens and ``▁`` spaces read as such.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from soarllm.outputs import TokenLogprobs

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MIN_LOGPROB = -9999.0  # JSON has no -inf


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, symbol -> byte (printable bytes stand for themselves, the
    others are shifted past 255)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    out, shift = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shift)] = b
            shift += 1
    return out


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    try:
        return "ByteLevel" in json.dumps(json.loads(decoder.__getstate__()))
    except Exception:
        return type(decoder).__name__ == "ByteLevel"


class TokenPieces:
    """Token id -> (piece text, raw bytes), cached, for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            raw = self._bytes(token_id)
            got = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return got

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self.special:
            return piece.encode("utf-8")
        m = _BYTE_TOKEN.fullmatch(piece)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        if self.byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode("utf-8")  # an added token, spelled as itself
        return piece.replace("\u2581", " ").encode("utf-8")


def _entry(pieces: TokenPieces, token_id: int, logprob: float) -> dict[str, Any]:
    text, raw = pieces(token_id)
    return {"id": token_id, "token": text, "bytes": raw,
            "logprob": logprob if math.isfinite(logprob) else _MIN_LOGPROB}


def completion_probabilities(pieces: TokenPieces, token_ids: Sequence[int],
                             logprobs: Sequence[TokenLogprobs | None] | None,
                             n_probs: int) -> list[dict[str, Any]]:
    """llama.cpp's ``completion_probabilities`` for the generated ``token_ids``."""
    out = []
    for tid, entry in zip(token_ids, logprobs or []):
        entry = entry or {}
        chosen = entry.get(tid)
        item = _entry(pieces, tid, chosen.logprob if chosen is not None else _MIN_LOGPROB)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        item["top_logprobs"] = [_entry(pieces, t, lp.logprob) for t, lp in ranked
                                if lp.rank <= n_probs]
        out.append(item)
    return out
