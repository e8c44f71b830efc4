"""Compiling Triton kernels for an H100 (sm_90) on a machine without a GPU: Triton's real compiler
(frontend, LLVM, the bundled ptxas) sees what the interpreter never does (layouts, shared memory,
inline PTX). Compiles run in a child process without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES = 227 * 1024  # shared memory per block


def compile_sm90(fn, types: dict, consts: dict, aligned=(), stages: int = 3,
                 warps: int = 4) -> tuple[str, int]:
    """Compile one configuration of ``fn`` (arguments not in ``types`` are i32; ``aligned``
    ones get the 16-divisibility the JIT infers for real tensors): (name, shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_stages": stages, "num_warps": warps})
    return f"{fn.__name__}{sorted(consts.items())}", k.metadata.shared


def compiled_in_child(function: str, tmp_path: Path) -> list[tuple[str, int]]:
    """Run ``function`` ("module:name", returning compile_sm90 results) in a child process with
    the real compiler and a fresh cache; skip where this triton bundles no ptxas."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas to compile for a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not reuse a cached binary
    module, name = function.split(":")
    code = f"import json; from {module} import {name}; print(json.dumps({name}()))"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [tuple(x) for x in json.loads(res.stdout.strip().splitlines()[-1])]
