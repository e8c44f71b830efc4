"""soarllm: an LLM inference and serving stack, from checkpoint to endpoint."""

import os as _os

from soarllm.paths import home as _home

# torch.compile's caches live under $SOARLLM_HOME/compile. Set before torch looks: inductor fixes
# its cache directory (and writes this variable) the first time any of its caches is touched, so a
# later setting would split the cache and every start would compile again.
_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_home() / "compile" / "inductor"))

from soarllm.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import the engine lazily: `import soarllm` stays cheap for the CLI and tools.
    if name == "LLM":
        from soarllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
