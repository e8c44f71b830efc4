"""The tokenizer the benchmark counts tokens with (prompt lengths, and a check on server usage)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from soarllm.errors import ModelNotFoundError


class Tokenizer(Protocol):
    """What the benchmark needs from a tokenizer (a Hugging Face tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def load_tokenizer(spec: str) -> Any:
    """A Hugging Face tokenizer from a directory, a ``.gguf`` file, a registry name or a hub id."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            if ggufs:
                return AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name)
        return AutoTokenizer.from_pretrained(str(path))
    pulled = _pull_registry_model(spec)
    if pulled is not None:
        return load_tokenizer(pulled)
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"cannot load a tokenizer for {spec!r}: pass --tokenizer with a model directory, "
            f"a .gguf file or a registry name ({e.__class__.__name__}: {e})"
        ) from None


def _pull_registry_model(name: str) -> str | None:
    """The local path of a registry model (``soarllm.hub``), or None if the name is not one."""
    try:
        from soarllm import hub
    except ImportError:
        return None
    try:
        return os.fspath(hub.pull(name))
    except Exception:  # not a registry name, or the hub cannot provide it
        return None


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))
