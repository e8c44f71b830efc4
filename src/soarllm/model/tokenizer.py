"""The tokenizer of a checkpoint (fast, with its chat template) and its fill-in-the-middle tokens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from soarllm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from soarllm.model.loader import Checkpoint

# (prefix, suffix, middle) special tokens, by model family.
FIM_TOKEN_SETS: tuple[tuple[str, str, str], ...] = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # Code Llama
    ("<PRE>", "<SUF>", "<MID>"),  # Code Llama, other conversions
)


def load_tokenizer(
    checkpoint_or_dir: Checkpoint | str | Path, tokenizer: str | None = None
) -> PreTrainedTokenizerBase:
    """A fast HF tokenizer: from `tokenizer` (a directory, .gguf file or registry name) when
    given, else the checkpoint's own (for GGUF: the converted one, chat template included)."""
    from soarllm.model.loader import Checkpoint

    if tokenizer is not None:
        directory = _tokenizer_dir(tokenizer)
    elif isinstance(checkpoint_or_dir, Checkpoint):
        if checkpoint_or_dir.tokenizer_dir is None:
            raise ConfigError(
                f"{checkpoint_or_dir.path} ships no tokenizer; pass one with tokenizer=PATH "
                "(a model directory or .gguf file)"
            )
        directory = checkpoint_or_dir.tokenizer_dir
    else:
        directory = _tokenizer_dir(str(checkpoint_or_dir))
    return _from_dir(directory)


def fim_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str] | None:
    """(prefix, suffix, middle) fill-in-the-middle tokens when the vocab has a known set."""
    vocab = tokenizer.get_vocab()
    return next((s for s in FIM_TOKEN_SETS if all(token in vocab for token in s)), None)


def _tokenizer_dir(source: str) -> Path:
    from soarllm.hub import resolve_model
    from soarllm.model.loader.gguf_cache import ensure_converted

    path = resolve_model(source)
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path)
    if path.is_file():
        path = path.parent
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        if len(ggufs) == 1:
            return ensure_converted(ggufs[0])
        raise ConfigError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    return path


def _from_dir(directory: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer in {directory}: {e}") from None
    if not tokenizer.is_fast:
        raise ConfigError(
            f"the tokenizer in {directory} has no fast (tokenizers) version; add a tokenizer.json"
        )
    return tokenizer
