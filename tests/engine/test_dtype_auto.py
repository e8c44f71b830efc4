"""dtype="auto": bfloat16 where the hardware computes it natively, float32 elsewhere on CPU."""

import shutil
import subprocess

import pytest
import torch

from soarllm.config import parse_dtype


def _lscpu_flags() -> set[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Flags:"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu (util-linux) is not installed")
def test_auto_dtype_follows_the_cpu_flags():
    flags = _lscpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert parse_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_auto_dtype_on_gpu_and_explicit_names():
    assert parse_dtype("auto", "cuda") == torch.bfloat16
    assert parse_dtype("float32", "cpu") == torch.float32
    assert parse_dtype("bfloat16", "cpu") == torch.bfloat16
