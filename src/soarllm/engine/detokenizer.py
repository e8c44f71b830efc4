"""Incremental detokenization and stop strings.

Text grows by decoding a short window of recent tokens twice (with and without the newest ones) and
keeping the difference, so leading-space rules of the tokenizer apply as in a full decode. A
window that ends inside a multi-byte character decodes to U+FFFD and is held back until the
character is complete: the stream never emits half a UTF-8 character.

While a request runs, the last (longest stop string - 1) characters are held back too, so a stop
string split over several tokens never leaks into the stream.

With a fast (Rust) tokenizer the same windowed decode runs inside ``tokenizers``' ``DecodeStream``
(one call per token instead of two through transformers' Python ``decode``): at batch 64 that was
about a quarter of the engine's host time per step. Tokenizers whose ``decode`` also cleans up
tokenization spaces (a Python step of transformers) keep the two-decode path.
"""

from __future__ import annotations

from soarllm.sampling_params import SamplingParams

_WINDOW = 5  # tokens of context before the unread ones


def _decode_stream(tokenizer, context: list[int], skip_special: bool):
    """A ``tokenizers`` DecodeStream primed with ``context``, or None where the two-decode path
    must run (no Rust backend, an older tokenizers, or a Python clean-up step in ``decode``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream

        return backend, DecodeStream(ids=context, skip_special_tokens=skip_special)
    except (ImportError, TypeError):
        return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special = params.skip_special_tokens
        self.tokens: list[int] = list(prompt_token_ids)
        self.prefix_offset = max(len(self.tokens) - _WINDOW, 0)
        self.read_offset = len(self.tokens)
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.stream = _decode_stream(tokenizer, self.tokens[self.prefix_offset :],
                                     self.skip_special)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def _new_text(self) -> str | None:
        """The text the newest token completes, or None while it is held back."""
        if self.stream is not None:
            backend, stream = self.stream
            try:
                return stream.step(backend, self.tokens[-1]) or None
            except Exception:  # an id the vocabulary lacks: decode as the slow path does
                self.stream = None
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        return full[len(prefix) :]

    def add_token(self, token_id: int, check_stop: bool) -> str | None:
        """Append a token; return the stop string if the text now contains one (text is cut)."""
        self.tokens.append(token_id)
        piece = self._new_text()
        if piece is None:
            return None
        new_len = len(self.text)
        self.text += piece
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        if check_stop and self.params.stop:
            return self._find_stop(new_len)
        return None

    def _find_stop(self, new_from: int) -> str | None:
        """The stop string that occurs first in the text (not first in the list): a token may
        complete several at once, and the text keeps none of them."""
        found = []
        for stop in self.params.stop:
            i = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if i != -1:
                found.append((i, -len(stop), stop))
        if not found:
            return None
        i, _, stop = min(found)
        end = i + len(stop) if self.params.include_stop_str_in_output else i
        self.text = self.text[:end]
        self.emitted = min(self.emitted, end)
        return stop

    def flush_pending(self) -> None:
        """At the end, add what a trailing incomplete character still holds (as U+FFFD)."""
        if self.read_offset < len(self.tokens):
            prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(self.tokens)

    def take_delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
