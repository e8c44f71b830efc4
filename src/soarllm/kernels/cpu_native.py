"""Native CPU kernels: C sources under kernels/csrc built once with the system's C compiler.

PyTorch has no paged attention for CPUs, and its small-shape ops pay a dispatch each; a few
kernels are plain C (no PyTorch headers, so a build takes about a second) compiled with
``-O3 -march=native -fopenmp`` and called through ctypes on tensors' data pointers. They link the
OpenMP runtime by its soname, ``libgomp.so.1``, which is the copy PyTorch has already loaded: the
kernels run on PyTorch's threads, never on a second pool competing for the same cores.

A built library is cached under ``$SOARLLM_HOME/kernels/<hash>/`` (the hash covers the source and
the shared headers, the compiler's version and flags, and this CPU's model and instruction-set flags), written to a temporary
name and renamed, so ranks that build it at the same time never load a half-written file. No
compiler, a failed build, or ``SOARLLM_NATIVE_KERNELS=0``: ``load`` returns None (one warning line)
and callers keep the pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno")


def find_program(env_var: str, names: tuple[str, ...]) -> str | None:
    """The program named by ``$env_var``, else the first of ``names`` on PATH, or None."""
    for name in (os.environ.get(env_var), *names):
        if name and shutil.which(name):
            return name
    return None


def c_compiler() -> str | None:
    """The C compiler to build with ($CC, else cc / gcc / clang), or None."""
    return find_program("CC", ("cc", "gcc", "clang"))


@cache
def cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its instruction-set flags (also what
    inductor's compiled code depends on, model/compilation.py)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


@cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cache_dir() -> Path:
    from soarllm.paths import home

    return home() / "kernels"


def build(name: str) -> Path:
    """Build ``csrc/<name>.c`` (or reuse the cached build) and return the library's path.

    Raises RuntimeError with the compiler's message when there is no compiler or the build fails.
    """
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc/gcc/clang; set CC)")
    source = (SOURCES / f"{name}.c").read_bytes()
    headers = b"".join(p.read_bytes() for p in sorted(SOURCES.glob("*.h")))
    key = hashlib.sha256(b"\0".join([source, headers, " ".join(FLAGS).encode(),
                                      _compiler_version(cc).encode(),
                                      cpu_identity().encode()])).hexdigest()[:16]
    out_dir = _cache_dir() / key
    lib = out_dir / f"lib{name}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".lib{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, f"-I{SOURCES}", str(SOURCES / f"{name}.c"), "-o", tmp,
                               "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {name}.c: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The built library ``name`` loaded in this process, or None (with one warning) when native
    kernels are turned off or cannot be built here."""
    if os.environ.get("SOARLLM_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import torch  # noqa: F401  (its OpenMP runtime must be loaded first: the library reuses it)

    try:
        return ctypes.CDLL(str(build(name)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        logger.warning("native CPU kernel %s unavailable, using the PyTorch path: %s", name, err)
        return None


@cache
def load_torch_ops(name: str, library: str, defines: tuple[tuple[str, int], ...] = ()) -> bool:
    """Build (once per source, library, PyTorch version and CPU; ~40 s on 2 cores, then cached
    beside the C library) and load ``csrc/<name>.cpp``, a C++ file that registers operators with
    PyTorch's dispatcher and calls the C library ``library`` (built by ``build``). Compiled code
    (inductor's C++ wrapper) then calls those operators without entering Python. False, with one
    warning, where it cannot be built (no C++ compiler or ninja, no PyTorch headers): the caller
    registers a Python implementation of the same operators instead."""
    import torch
    from torch.utils import cpp_extension

    c_lib = build(library)
    source = (SOURCES / f"{name}.cpp").read_bytes()
    key = hashlib.sha256(b"\0".join([source, str(c_lib).encode(), torch.__version__.encode(),
                                      repr(defines).encode()])).hexdigest()[:16]
    out_dir = c_lib.parent / f"{name}-{key}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=f"soarllm_{name}_{key}", sources=[str(SOURCES / f"{name}.cpp")],
            extra_cflags=["-O2", *(f"-D{k}={v}" for k, v in defines)],
            extra_ldflags=[str(c_lib), f"-Wl,-rpath,{c_lib.parent}"],
            build_directory=str(out_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, subprocess.SubprocessError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        logger.warning("native CPU operators %s unavailable, calling the kernel from Python: %s",
                       name, first)
        return False
    return True
