"""Compiling the model step with torch.compile (inductor), and warming it up.

What is compiled is the decoder stack between the embedding lookup and the final norm, for any
number of tokens: one graph for a single token (a batch-1 decode, the latency case) and one with a
symbolic token count for everything else, so the mix of decodes and prefill chunks a step carries
never triggers a recompilation after warm-up. Attention stays outside the fused code as the
``soarllm::attention`` custom op (see model/layers/attention.py), reading the step's metadata from
the forward context: the compiled graph sees only tensors.

Both graphs are compiled ahead of time and saved under ``$SOARLLM_HOME/compile/aot``
(:class:`CompiledBackbone`): a second start of the same model loads them instead of tracing and
compiling again (the first start of the default model compiles for minutes on a 2-core CPU, later
starts load in about a second). Inductor's own caches live under ``$SOARLLM_HOME/compile`` too.
``enforce_eager`` turns compilation off; on CPU without a C++ compiler the engine runs eagerly
after one warning line.

On CUDA the stack is not compiled: the layers call hand-fused Triton kernels there (RMSNorm with
the residual add, SiLU-and-mul, weight-only int4/int8 GEMV) and decode steps are captured as CUDA
graphs (model/cuda_graph.py), which removes the launch overhead that compilation would otherwise
address; a start then takes seconds instead of a compile of minutes (SGLang's default too).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from soarllm.kernels.cpu_native import cpu_identity, find_program
from soarllm.paths import home

logger = logging.getLogger(__name__)

# Token counts the warm-up runs: 1 compiles the static single-token graph, 2 the dynamic one that
# serves every other count.
WARMUP_SIZES = (1, 2)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use, or None."""
    return find_program("CXX", ("g++", "c++", "clang++"))


# The compiled step's wrapper (the code calling its kernels and the ops between them, ~300 calls
# per step for a 30-layer model) as C++ instead of Python: on a 2-core CPU batch-1 decode of the
# default model went from ~78 to ~95 tok/s and batch 32 from ~358 to ~392; the first compile
# takes longer (the wrapper is C++ to build), later starts load it cached.
CPP_WRAPPER = True


def configure_inductor() -> None:
    """Settings that suit an inference step (the cache directory is set when soarllm is
    imported, see soarllm/__init__.py). Called where a graph is compiled or loaded, not before:
    importing inductor takes 1-2 s of a start on 2 cores, which a restart spends in the thread
    that loads the saved graphs while the model already answers eagerly."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    inductor_config.cpp_wrapper = CPP_WRAPPER
    # No precompiled header for the wrapper's C++: it would make the first compile a little
    # faster, but every later start that loads the compiled step would run the C++ preprocessor
    # over torch's headers again to find it (0.3-1.5 s of a start on 2 cores).
    inductor_config.cpp_cache_precompile_headers = False
    # graphs are compiled ahead of time (CompiledBackbone), so that they can be saved
    torch._dynamo.config.enable_aot_compile = True


def compile_backbone(backbone: torch.nn.Module, device: str, enforce_eager: bool,
                     cache_tag: str = "") -> CompiledBackbone | None:
    """A compiled callable for ``backbone(input_ids, positions, kv_caches)``, or None to run
    eagerly (asked for, or not possible here). ``cache_tag`` tells apart processes whose graphs
    may differ beyond the backbone's shapes (the tensor-parallel rank)."""
    if enforce_eager or device.startswith("cuda"):
        return None
    if device == "cpu" and cxx_compiler() is None:
        logger.warning("no C++ compiler found (g++/clang++): running the model eagerly; install "
                       "one (e.g. apt install g++) for the compiled CPU path")
        return None
    return CompiledBackbone(backbone, cache_tag)


def aot_cache_dir() -> Path:
    """Where compiled model steps are kept between starts."""
    return home() / "compile" / "aot"


def _step(backbone, input_ids, positions, kv_caches):
    """What each graph computes; the backbone is an argument, so its parameters are inputs of the
    graph (never baked in) and one compiled graph serves any model of the same shapes."""
    return backbone(input_ids, positions, kv_caches)


@functools.cache
def _source_digest() -> str:
    """A digest of soarllm's own code (Python and C++ sources): a compiled graph is what dynamo
    traced through this code, so a changed file must not load a graph traced through the old."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c", ".cpp", ".h"):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _trust_vec_isa() -> None:
    """Tell inductor the CPU's vector instructions build and run (its own probe compiles test
    programs), unless a setting already decided it."""
    import torch._inductor.config as inductor_config

    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True


def graph_key(backbone: torch.nn.Module, kv_caches: list[torch.Tensor], tag: str) -> str:
    """The name a compiled step is cached under: everything a graph is specialized on that its
    guards cannot check after loading (code, library versions, which native ops are loaded, the
    compiler settings), plus the shapes its guards do check, so that each configuration of a model
    (another KV cache size, another quantization) keeps a file of its own."""
    from soarllm import __version__

    parts = [torch.__version__, __version__, _source_digest(), tag,
             # the instruction set the compiled code was built for (a cache directory shared by
             # machines with other CPUs must not load it)
             torch.backends.cpu.get_cpu_capability(), cpu_identity(),
             # dynamo guards the thread count, and inductor splits loops for it
             f"threads={torch.get_num_threads()}",
             f"cpp_wrapper={CPP_WRAPPER}",
             # ops registered in soarllm's namespace: a graph built while a native kernel was
             # loaded calls it; without it, the Python implementation
             ",".join(sorted(n for n in torch._C._dispatch_get_all_op_names()
                             if n.startswith("soarllm::"))),
             ",".join(sorted(k for k in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                             if k.startswith("soarllm::"))),
             type(backbone).__qualname__, str(getattr(backbone, "config", "")), repr(backbone)]
    for name, t in itertools.chain(backbone.named_parameters(), backbone.named_buffers()):
        parts.append(f"{name}:{tuple(t.shape)}:{t.stride()}:{t.dtype}")
    parts.extend(f"kv:{tuple(c.shape)}:{c.dtype}" for c in kv_caches)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class CompiledBackbone:
    """``backbone(input_ids, positions, kv_caches)`` through two compiled graphs: a static one for
    a single token (batch-1 decode, the latency case) and one with a symbolic token count for every
    other step.

    Each graph is compiled ahead of time (``torch.compile(...).aot_compile``, fullgraph) and saved
    under :func:`aot_cache_dir`; a later start with the same code, libraries and model shapes loads
    it instead of tracing the model again (tracing alone takes ~15 s for the default model on a
    2-core CPU, loading under a second). A loaded graph is used only if its guards accept the
    warm-up's inputs (shapes, dtypes and strides of every parameter and KV cache); anything else
    compiles afresh and replaces the file.

    After warm-up calls skip dynamo's guard evaluation (~1.2 ms per step for a 30-layer model, a
    tenth of a batch-1 decode): the runner never feeds the backbone anything the warm-up did not
    cover (same dtypes, same parameter and cache tensors, 1 or N tokens), and the token count picks
    the graph.
    """

    def __init__(self, backbone: torch.nn.Module, cache_tag: str = ""):
        self.backbone = backbone
        self.cache_tag = cache_tag
        self._graphs: dict[bool, Callable] = {}  # several tokens? -> compiled graph
        self._key: str | None = None  # graph_key, computed at the first warm-up
        self.loaded = 0  # graphs taken from the cache at warm-up
        self.compiled = 0  # graphs compiled at warm-up
        self.warmed_up = False

    def _path(self, kv_caches: list[torch.Tensor], many: bool) -> Path:
        if self._key is None:
            self._key = graph_key(self.backbone, kv_caches, self.cache_tag)
        return aot_cache_dir() / f"{self._key}-{'n' if many else '1'}.bin"

    def saved(self, kv_caches: list[torch.Tensor]) -> bool:
        """Whether both graphs of this model were saved by an earlier start."""
        return all(self._path(kv_caches, many).exists() for many in (False, True))

    def load_saved(self, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                   kv_caches: list[torch.Tensor]) -> bool:
        """Load both saved graphs without running them, checked against ``inputs`` ((input ids,
        positions) of 1 and of several tokens): what a thread may do while the model runs
        eagerly (the graphs touch no state the eager model uses). False when either does not
        load or fit (see ``forget_saved``)."""
        configure_inductor()
        _trust_vec_isa()
        for input_ids, positions in inputs:
            many = input_ids.shape[0] > 1
            fn = self._load(self._path(kv_caches, many),
                            (self.backbone, input_ids, positions, kv_caches))
            if fn is None:
                self._graphs.clear()
                return False
            self._graphs[many] = fn
            self.loaded += 1
        return True

    def forget_saved(self, kv_caches: list[torch.Tensor]) -> None:
        """Remove this model's saved graphs, so that the next start compiles afresh."""
        for many in (False, True):
            self._path(kv_caches, many).unlink(missing_ok=True)

    def warm_up(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Load or compile the graph for this many tokens (the caller sets the forward context),
        then run it once."""
        configure_inductor()
        many = input_ids.shape[0] > 1
        args = (self.backbone, input_ids, positions, kv_caches)
        path = self._path(kv_caches, many)
        # loaded graphs are checked with unmarked inputs: a saved graph's guards do not keep
        # mark_dynamic's marking (and need not: its token count is symbolic, >= 2)
        if path.exists():
            # the graph under this key was compiled here, for this instruction set: inductor's
            # probe of it (compiling and loading test programs, ~1 s) has nothing to add
            _trust_vec_isa()
        fn = self._load(path, args)
        if fn is None:
            if many:
                torch._dynamo.mark_dynamic(input_ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
            fn = torch.compile(_step, fullgraph=True, dynamic=False).aot_compile((args, {}))
            self.compiled += 1
            self._save(fn, path)
        else:
            self.loaded += 1
        self._graphs[many] = fn
        return fn(*args)

    def finish_warm_up(self) -> None:
        for fn in self._graphs.values():
            fn.disable_guard_check()
        self.warmed_up = True

    @staticmethod
    def _load(path: Path, args: tuple) -> Callable | None:
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
            if fn.guard_check(*args):
                return fn
            logger.info("compiled step %s does not fit this model: compiling again", path.name)
        except Exception as e:  # another torch, a truncated file: compile again
            logger.info("compiled step %s unusable (%s: %s): compiling again", path.name,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None

    @staticmethod
    def _save(fn, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fn.save_compiled_function(str(path))
        except Exception as e:  # the step still runs compiled; only the next start pays again
            logger.warning("could not save the compiled step (%s: %s): the next start compiles "
                           "again", type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._graphs[input_ids.shape[0] > 1](self.backbone, input_ids, positions, kv_caches)
