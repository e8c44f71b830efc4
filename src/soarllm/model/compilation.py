"""Compiling the model step with torch.compile (inductor), and warming it up.

What is compiled is the decoder stack between the embedding lookup and the final norm, for any
number of tokens: one graph for a single token (a batch-1 decode, the latency case) and one with a
symbolic token count for everything else, so the mix of decodes and prefill chunks a step carries
never triggers a recompilation after warm-up. Attention stays outside the fused code as the
``soarllm::attention`` custom op (see model/layers/attention.py), reading the step's metadata from
the forward context: the compiled graph sees only tensors.

Inductor's on-disk caches (FX graph and AOTAutograd caches) live under ``$SOARLLM_HOME/compile``,
so a second start of the same model loads the compiled code instead of compiling it again.
``enforce_eager`` turns compilation off; on CPU without a C++ compiler the engine runs eagerly
after one warning line.

On CUDA the stack is not compiled: the layers call hand-fused Triton kernels there (RMSNorm with
the residual add, SiLU-and-mul, weight-only int4/int8 GEMV) and decode steps are captured as CUDA
graphs (model/cuda_graph.py), which removes the launch overhead that compilation would otherwise
address; a start then takes seconds instead of a compile of minutes (SGLang's default too).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch

from soarllm.kernels.cpu_native import find_program

logger = logging.getLogger(__name__)

# Token counts the warm-up runs: 1 compiles the static single-token graph, 2 the dynamic one that
# serves every other count.
WARMUP_SIZES = (1, 2)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use, or None."""
    return find_program("CXX", ("g++", "c++", "clang++"))


def configure_inductor() -> None:
    """Settings that suit an inference step (the cache directory is set when soarllm is
    imported, see soarllm/__init__.py)."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    # The compiled step's wrapper (the code calling its kernels and the ops between them, ~300
    # calls per step for a 30-layer model) as C++ instead of Python: on a 2-core CPU batch-1
    # decode of the default model went from ~78 to ~95 tok/s and batch 32 from ~358 to ~392;
    # the first compile takes longer (the wrapper is C++ to build), later starts load it cached.
    inductor_config.cpp_wrapper = True
    # Compiled graphs are cached per code object (one per model here: see _own_forward); past the
    # limit dynamo silently runs new graphs eagerly, so keep it generous.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def compile_backbone(backbone: torch.nn.Module, device: str,
                     enforce_eager: bool) -> CompiledBackbone | None:
    """A compiled callable for ``backbone(input_ids, positions, kv_caches)``, or None to run
    eagerly (asked for, or not possible here)."""
    if enforce_eager or device.startswith("cuda"):
        return None
    if device == "cpu" and cxx_compiler() is None:
        logger.warning("no C++ compiler found (g++/clang++): running the model eagerly; install "
                       "one (e.g. apt install g++) for the compiled CPU path")
        return None
    configure_inductor()
    return CompiledBackbone(torch.compile(_own_forward(backbone), fullgraph=True, dynamic=False))


def _own_forward(backbone: torch.nn.Module) -> Callable:
    """``backbone(input_ids, positions, kv_caches)`` as a function with a code object of its own.

    Dynamo keeps compiled graphs per code object: compiling the module itself would put every
    model of one class (a target and its draft) in the cache of one ``forward``, and after warm-up
    (guards checked only where they tell graphs apart) a model whose parameters differ in name
    from another's (a quantized draft's ``qweight`` beside the target's ``weight``) makes the
    guard check itself fail (KeyError). One cache per model keeps each model's graphs apart."""

    def forward(input_ids, positions, kv_caches):
        return backbone(input_ids, positions, kv_caches)

    return types.FunctionType(forward.__code__.replace(), forward.__globals__, "forward",
                              None, forward.__closure__)


class CompiledBackbone:
    """``backbone(input_ids, positions, kv_caches)`` through its compiled graphs: the static one
    for a single token, the one with a symbolic token count for the rest.

    Before each call dynamo checks every guard of its cached graphs (tensor shapes, strides and
    dtypes of every parameter and KV cache: ~1.2 ms per step for a 30-layer model on a 2-core CPU,
    a tenth of a batch-1 decode). Once the runner has warmed both graphs up (``warmed_up``),
    calls evaluate only the guards that tell cached graphs apart (PyTorch's
    ``skip_guard_eval_unsafe`` stance): the token count, and the module where several models share
    the process. That is safe here because the runner never feeds the backbone anything the
    warm-up did not cover: same dtypes, same parameter and cache tensors, 1 or N tokens.
    """

    def __init__(self, compiled: Callable):
        self._compiled = compiled
        self.warmed_up = False

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor:
        if input_ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        if not self.warmed_up:
            return self._compiled(input_ids, positions, kv_caches)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._compiled(input_ids, positions, kv_caches)
        except RuntimeError as err:
            # an input no cached graph was built for (e.g. a tensor made outside inference mode
            # by a caller other than the runner): dynamo refuses before running anything, so
            # check every guard instead (it compiles a graph for it, once)
            if "skip_guard_eval_unsafe" not in str(err):
                raise
            return self._compiled(input_ids, positions, kv_caches)
