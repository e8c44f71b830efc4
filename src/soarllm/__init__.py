"""soarllm: an LLM inference and serving stack, from checkpoint to endpoint."""

from soarllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import the engine lazily: `import soarllm` stays cheap for the CLI and tools.
    if name == "LLM":
        from soarllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
