"""A character-level tokenizer with an exact round trip, enough for workload and metric tests."""

from __future__ import annotations

import string


class CharTokenizer:
    chat_template = None
    all_special_ids: list[int] = []
    eos_token_id = None

    def __init__(self) -> None:
        self.chars = string.ascii_letters + string.digits + " .,:;()[]{}=+-*/_\n'\"#<>!?"
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i] for i in ids)
