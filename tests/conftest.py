"""Shared fixtures. The real default model is pulled once into SOARLLM_HOME (CI pulls it before
the tests; a developer's cache is reused)."""

from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the default model's GGUF file (pulled on first use)."""
    from soarllm import hub

    return Path(hub.pull(DEFAULT_MODEL, progress=False))
