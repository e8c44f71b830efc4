"""The native row-wise argmax (kernels/argmax.py) against torch.argmax: random rows, ties, rows
of -inf (a grammar that allows nothing left), NaN, odd lengths below and above the vector width,
rows with a stride, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from soarllm.kernels import argmax


@pytest.fixture(scope="module", autouse=True)
def native():
    if argmax._lib() is None:
        pytest.skip("no C compiler: argmax_rows is torch.argmax")


SHAPES = [(1, 49152), (32, 49152), (3, 7), (5, 31), (4, 32), (4, 33), (2, 151936), (8, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_argmax_rows_equals_torch_argmax(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    rows, n = shape
    cases = {
        "random": torch.randn(rows, n, generator=g),
        "ties": torch.randint(0, 3, (rows, n), generator=g).float(),  # many equal largest values
        "all -inf": torch.full((rows, n), float("-inf")),
        "a late maximum": torch.arange(n).float().repeat(rows, 1),
    }
    nan = torch.randn(rows, n, generator=g)
    nan[0, n // 2] = float("nan")
    nan[-1, n - 1] = float("nan")
    cases["NaN"] = nan
    for name, x in cases.items():
        x = x.to(dtype)
        assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1)), name


def test_strided_rows_and_what_the_kernel_leaves_to_torch():
    x = torch.randn(6, 200)
    view = x[:, 10:150]  # rows 200 apart
    assert torch.equal(argmax.argmax_rows(view), view.argmax(dim=-1))
    for other in (x.double(), x.half(), x.t()):  # another dtype; columns not contiguous
        assert torch.equal(argmax.argmax_rows(other), other.argmax(dim=-1))
    assert argmax.argmax_rows(torch.empty(0, 5)).shape == (0,)
