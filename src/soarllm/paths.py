"""Where soarllm keeps its files: the cache root every layer may need (models, converted GGUF
files, built kernels, compile caches). Below hub.py and the loaders, so they all import it from
here without importing each other."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.cache/soarllm"


def home() -> Path:
    """soarllm's cache root: $SOARLLM_HOME, default ~/.cache/soarllm."""
    return Path(os.environ.get("SOARLLM_HOME") or DEFAULT_HOME).expanduser()
