"""Fused Triton kernels (RMSNorm, RMSNorm + residual add, gated activations, rotary embedding and
rotary + paged KV-cache write) against float64 math written here from the definitions.

On a machine without CUDA they run in Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1) with small shapes; on a GPU the same tests run on CUDA. The interpreter rounds
float32 -> bfloat16 by truncation (the GPU rounds to nearest), so 16-bit tolerances allow a couple
of units in the last place. The layer-level tests check that the CPU path of RMSNorm's residual form
is exactly the unfused arithmetic, and (GPU only) that the layers pick the kernels on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from soarllm.errors import ConfigError
from soarllm.kernels.triton_utils import interpreter_enabled, triton_available

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not triton_available() or not (CUDA or interpreter_enabled()),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative error allowed per rounding step (a few ulps: truncation in the interpreter)
ULP = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, steps: int = 3):
    got, want = got.double().cpu(), want.double().cpu()
    tol = steps * ULP[dtype]
    err = (got - want).abs()
    bound = tol * want.abs() + tol * want.abs().mean() + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def _rms_oracle(x, w, eps, offset):
    x64, w64 = x.double(), w.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * (offset + w64)


# ------------------------------------------------------------------------------------------ norm


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (3, 100), (17, 576)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(dtype, rows, hidden, offset):
    from soarllm.kernels.triton.norm import rms_norm

    g = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(hidden, generator=g) * 0.5).to(dtype).to(DEVICE)
    y = rms_norm(x, w, 1e-6, offset)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, _rms_oracle(x, w, 1e-6, offset), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_add_rms_norm(dtype, offset):
    from soarllm.kernels.triton.norm import fused_add_rms_norm

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 200, generator=g).to(dtype).to(DEVICE)  # leading dims flatten to rows
    r = (torch.randn(2, 5, 200, generator=g) * 4).to(dtype).to(DEVICE)
    w = torch.randn(200, generator=g).to(dtype).to(DEVICE)
    x_before, r_before = x.clone(), r.clone()
    normed, new_residual = fused_add_rms_norm(x, r, w, 1e-5, offset)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs must not change"
    sum64 = x.double() + r.double()
    _close(new_residual, sum64, dtype, steps=1)
    # the norm reads the stored (rounded) sum, as the unfused layer does
    _close(normed, _rms_oracle(new_residual, w, 1e-5, offset), dtype)


@needs_kernels
def test_rms_norm_over_heads_of_a_strided_view():
    """Gemma's q/k norms: [T, H, D] views of a fused projection, normalized per head."""
    from soarllm.kernels.triton.norm import rms_norm

    qkv = torch.randn(3, 5 * 32, device=DEVICE)
    q = qkv[:, : 4 * 32].view(3, 4, 32)
    w = torch.randn(32, device=DEVICE)
    _close(rms_norm(q, w, 1e-6, 1.0), _rms_oracle(q, w, 1e-6, 1.0), torch.float32)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_layer_residual_form_is_the_unfused_arithmetic_on_cpu(offset, dtype):
    from soarllm.model.layers.norm import RMSNorm

    norm = RMSNorm(48, 1e-6, dtype, offset=offset)
    norm.weight.data = torch.randn(48).to(dtype)
    x, r = torch.randn(4, 48).to(dtype), torch.randn(4, 48).to(dtype)
    normed, residual = norm(x, r)
    assert torch.equal(residual, x + r)
    assert torch.equal(normed, norm(x + r))


# ------------------------------------------------------------------------------------ activation


def _silu64(g):
    return g / (1 + torch.exp(-g))


def _gelu_tanh64(g):
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


@needs_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 200), (2, 3, 2 * 1100)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_and_mul(dtype, shape, act):
    from soarllm.kernels.triton import activation

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x.view(-1)[0] = 30.0  # saturated tails
    if x.numel() > 1:
        x.view(-1)[1] = -30.0
    fn = activation.silu_and_mul if act == "silu" else activation.gelu_tanh_and_mul
    y = fn(x.to(DEVICE))
    d = shape[-1] // 2
    x64 = x.double()
    gate, up = x64[..., :d], x64[..., d:]
    want = (_silu64(gate) if act == "silu" else _gelu_tanh64(gate)) * up
    assert y.shape == (*shape[:-1], d) and y.dtype == dtype
    _close(y, want, dtype)


# ---------------------------------------------------------------------------------------- rotary


def _rope_tables(tokens, rd, dtype, base=10000.0):
    """cos/sin rows [T, 1, rd] for some positions, as RotaryEmbedding.lookup gives them."""
    pos = torch.tensor([0, 5, 1, 900, 37, 2, 64][:tokens], dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype)[:, None, :], ang.sin().to(dtype)[:, None, :]


def _rope_oracle(x, cos, sin):
    """Rotate-half on the first rd dims, float64, from the tables as given."""
    x64, c, s = x.double(), cos.double(), sin.double()
    rd = c.shape[-1]
    h = rd // 2
    out = x64.clone()
    x1, x2 = x64[..., :h], x64[..., h:rd]
    out[..., :h] = x1 * c[..., :h] - x2 * s[..., :h]
    out[..., h:rd] = x2 * c[..., h:] + x1 * s[..., h:]
    return out


ROPE_CASES = [  # (heads q, heads kv, head_dim, rotary_dim)
    (9, 3, 64, 64),  # SmolLM2
    (4, 1, 128, 64),  # partial rotary
    (2, 1, 256, 256),  # Gemma 3
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,rd", ROPE_CASES)
def test_rotary_embedding_in_place_on_qkv_views(dtype, hq, hkv, d, rd):
    from soarllm.kernels.triton.rotary import rotary_embedding

    t = 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    cos, sin = (a.to(DEVICE) for a in _rope_tables(t, rd, dtype))
    want_q, want_k = _rope_oracle(q, cos, sin), _rope_oracle(k, cos, sin)
    out_q, out_k = rotary_embedding(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before), "values must not be touched"


@needs_kernels
def test_rotary_embedding_matches_the_layer_and_takes_no_k():
    from soarllm.kernels.triton.rotary import rotary_embedding
    from soarllm.model.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.tensor([3, 0, 127])
    cos_sin = rope.lookup(positions, torch.float32)
    x = torch.randn(3, 6, 64)
    want = rope.rotate(cos_sin, x.clone())  # the PyTorch path on the CPU tensors
    got, none = rotary_embedding(x.to(DEVICE), None, *(a.to(DEVICE) for a in cos_sin))
    assert none is None
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,rd", ROPE_CASES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_rotary_embedding_and_cache_write(dtype, hq, hkv, d, rd, block_size):
    from soarllm.kernels.triton.rotary import rotary_embedding_and_cache_write

    t, num_blocks = 6, 5
    q = torch.randn(t, hq, d).to(dtype).to(DEVICE)
    k = torch.randn(t, hkv, d).to(dtype).to(DEVICE)
    v = torch.randn(t, hkv, d).to(dtype).to(DEVICE)
    cos, sin = (a.to(DEVICE) for a in _rope_tables(t, rd, dtype))
    want_q, want_k = _rope_oracle(q, cos, sin), _rope_oracle(k, cos, sin)
    v_in = v.clone()
    sentinel = 7.0
    cache = torch.full((2, num_blocks, block_size, hkv, d), sentinel, dtype=dtype, device=DEVICE)
    total = num_blocks * block_size
    slots = torch.tensor([total - 1, -1, 2, block_size, -1, block_size + 1], device=DEVICE)
    rotary_embedding_and_cache_write(q, k, v, cos, sin, cache, slots)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    flat = cache.view(2, total, hkv, d).cpu()
    written = set()
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        written.add(s)
        assert torch.equal(flat[0, s], k[i].cpu()), f"key of token {i} at slot {s}"
        assert torch.equal(flat[1, s], v_in[i].cpu()), f"value of token {i} at slot {s}"
    untouched = [s for s in range(total) if s not in written]
    assert bool((flat[:, untouched] == sentinel).all()), "slots < 0 and unused slots stay as they were"


@needs_kernels
def test_rotary_cache_write_refuses_an_int8_cache():
    from soarllm.kernels.triton.rotary import rotary_embedding_and_cache_write

    q, k, v = torch.randn(2, 2, 32), torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    cos, sin = _rope_tables(2, 32, torch.float32)
    cache = torch.zeros(2, 2, 4, 1, 36, dtype=torch.int8)
    with pytest.raises(ConfigError, match="write_kv"):
        rotary_embedding_and_cache_write(q, k, v, cos, sin, cache, torch.tensor([0, 1]))


# ----------------------------------------------------------------------- layers pick the kernels


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs a CUDA GPU and triton")
def test_layers_use_the_kernels_on_cuda(monkeypatch):
    """On CUDA the layers call the Triton kernels and agree with their own CPU path."""
    from soarllm.kernels.triton import activation, norm, rotary
    from soarllm.model.layers import activation as act_layer
    from soarllm.model.layers.norm import RMSNorm
    from soarllm.model.layers.rotary import RotaryEmbedding

    calls = []
    for mod, name in [(norm, "rms_norm"), (norm, "fused_add_rms_norm"),
                      (activation, "silu_and_mul"), (rotary, "rotary_embedding")]:
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=fn, _n=name, **kw: (calls.append(_n), _f(*a, **kw))[1])
    layer = RMSNorm(256, 1e-6, torch.bfloat16)
    layer.weight.data = torch.randn(256).bfloat16()
    x, r = torch.randn(8, 256).bfloat16(), torch.randn(8, 256).bfloat16()
    want_n, want_r = layer(x, r)
    got_n, got_r = layer.cuda()(x.cuda(), r.cuda())
    torch.testing.assert_close(got_r.cpu(), want_r, rtol=0, atol=0)
    torch.testing.assert_close(got_n.cpu(), want_n, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer(x.cuda()).cpu(), layer.cpu()(x), rtol=2e-2, atol=2e-2)
    y = torch.randn(8, 512).bfloat16()
    torch.testing.assert_close(act_layer.silu_and_mul(y.cuda()).cpu(), act_layer.silu_and_mul(y),
                               rtol=2e-2, atol=2e-2)
    rope = RotaryEmbedding(64, 64, {"rope_type": "default", "rope_theta": 10000.0})
    cs = rope.lookup(torch.arange(8), torch.float32)
    qk = torch.randn(8, 5, 64)
    want = rope.rotate(cs, qk.clone())
    got = rope.cuda().rotate(tuple(a.cuda() for a in cs), qk.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert set(calls) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"}
