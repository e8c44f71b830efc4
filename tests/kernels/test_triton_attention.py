"""The Triton paged-attention backend against a naive float64 oracle written here (per request, keys
and values position by position, softmax(q k^T * scale) v with the causal offset, sliding window,
softcap or custom mask) and against the reference backend.

On a machine without CUDA the kernels run in Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1), with small shapes; on a GPU the same tests run on CUDA. Batches mix decodes of
spread-out lengths (verification groups among them), prefill chunks on cached context and fresh
prompts, CUDA-graph padding rows (slot -1, length 0), block tables wider than needed, int8 caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from soarllm.kernels import kv_quant
from soarllm.kernels.attention import AttentionMetadata, ReferenceAttentionBackend
from soarllm.kernels.triton_utils import interpreter_enabled, triton_available

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or not (CUDA or interpreter_enabled()),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)",
)


def _int8_round_trip(x: np.ndarray) -> np.ndarray:
    """What an int8 cache gives back for x [..., D], computed here in numpy (symmetric, one scale
    per token and head: max |x| / 127)."""
    x = x.astype(np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    return np.clip(np.round(x / scale), -127, 127).astype(np.float32) * scale


def _oracle(q, keys, values, scale, window=None, softcap=None, mask=None):
    """q [Lq, Hq, D]; keys/values [ctx, Hkv, D] (float64); causal over the last Lq positions, or
    ``mask`` [Lq, ctx] (True = may attend) instead. A query row that may attend nothing gives 0."""
    ctx, lq, hq, hkv = keys.shape[0], q.shape[0], q.shape[1], keys.shape[1]
    g = hq // hkv
    out = np.zeros(q.shape)
    for i in range(lq):
        pos = ctx - lq + i
        if mask is not None:
            allowed = mask[i].copy()
        else:
            allowed = np.arange(ctx) <= pos
            if window is not None:
                allowed &= np.arange(ctx) > pos - window
        if not allowed.any():
            continue
        for h in range(hq):
            s = keys[:, h // g] @ q[i, h] * scale
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ values[:, h // g]
    return out


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache: torch.Tensor
    meta: AttentionMetadata
    # per attention row: (first flat row, last flat row + 1, keys, values as the cache holds them,
    # custom mask or None); None for a padding row
    rows: list
    written: list  # (slot, key, value) of every new token


def _make_batch(*, decodes=(), prefills=(), hq=6, hkv=2, d=64, bs=4, dtype=torch.float32,
                int8=False, pad_rows=0, extra_width=0, seed=0):
    """decodes: (cached tokens, rows) per request, rows > 1 a verification group (rows decode rows
    at consecutive lengths); prefills: (new tokens, cached tokens, custom mask?) per request."""
    g = torch.Generator().manual_seed(seed)
    reqs = [(n, c, False, True) for c, n in decodes] + [(n, c, m, False) for n, c, m in prefills]
    num_blocks = sum(math.ceil((n + c) / bs) for n, c, _, _ in reqs) + 5
    width = max(math.ceil((n + c) / bs) for n, c, _, _ in reqs) + extra_width
    if int8:
        cache = torch.zeros(2, num_blocks, bs, hkv, d + kv_quant.SCALE_BYTES, dtype=torch.int8)
    else:
        cache = torch.randn(2, num_blocks, bs, hkv, d, generator=g).to(dtype)  # garbage in unused
    store = kv_quant.quantize if int8 else (lambda x: x)
    seen = _int8_round_trip if int8 else (lambda x: x)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, qsl, seq_lens, new_k, new_v, rows, customs, written = [], [], [0], [], [], [], [], [], []
    groups = []
    for n, cached, with_mask, is_decode in reqs:
        total = n + cached
        blocks = [perm.pop() for _ in range(math.ceil(total / bs))]
        keys = torch.randn(total, hkv, d, generator=g).to(dtype)
        vals = torch.randn(total, hkv, d, generator=g).to(dtype)
        for p in range(cached):  # earlier steps wrote these
            cache[0, blocks[p // bs], p % bs] = store(keys[p])
            cache[1, blocks[p // bs], p % bs] = store(vals[p])
        for p in range(cached, total):
            slot = blocks[p // bs] * bs + p % bs
            slots.append(slot)
            written.append((slot, keys[p], vals[p]))
        new_k.append(keys[cached:])
        new_v.append(vals[cached:])
        kk = seen(keys.float().numpy()).astype(np.float64)
        vv = seen(vals.float().numpy()).astype(np.float64)
        row = blocks + [int(torch.randint(num_blocks, (1,), generator=g))] * (width - len(blocks))
        if is_decode:
            groups.append(n)
            for j in range(n):
                ctx = cached + j + 1
                tables.append(row)
                rows.append((qsl[-1], qsl[-1] + 1, kk[:ctx], vv[:ctx], None))
                qsl.append(qsl[-1] + 1)
                seq_lens.append(ctx)
                customs.append(None)
        else:
            mask = None
            if with_mask:  # a random tree-like mask: the cached prefix, random links, itself
                mask = torch.rand(n, total, generator=g) < 0.5
                mask[:, :cached] = True
                mask[torch.arange(n), cached + torch.arange(n)] = True
                mask[:, cached:] &= torch.ones(n, n, dtype=torch.bool).tril()
            tables.append(row)
            rows.append((qsl[-1], qsl[-1] + n, kk, vv, None if mask is None else mask.numpy()))
            qsl.append(qsl[-1] + n)
            seq_lens.append(total)
            customs.append(mask)
    nd = sum(n for n, _, _, dec in reqs if dec)
    for _ in range(pad_rows):  # CUDA-graph padding decodes: slot -1, length 0, block table of 0s
        at = nd
        tables.insert(at, [0] * width)
        rows.insert(at, None)
        qsl.insert(at + 1, qsl[at] + 1)
        qsl[at + 2:] = [x + 1 for x in qsl[at + 2:]]
        seq_lens.insert(at, 0)
        customs.insert(at, None)
        nd += 1
    ks = torch.cat(new_k)
    vs = torch.cat(new_v)
    if pad_rows:
        nd_tok = nd - pad_rows
        pad_k = torch.randn(pad_rows, hkv, d, generator=g).to(dtype)
        pad_v = torch.randn(pad_rows, hkv, d, generator=g).to(dtype)
        ks = torch.cat((ks[:nd_tok], pad_k, ks[nd_tok:]))
        vs = torch.cat((vs[:nd_tok], pad_v, vs[nd_tok:]))
        slots = slots[:nd_tok] + [-1] * pad_rows + slots[nd_tok:]
    q = torch.randn(qsl[-1], hq, d, generator=g).to(dtype)
    # rows after the padding moved by pad_rows in the flat batch: recompute from qsl
    rows = [None if r is None else (qsl[i], qsl[i + 1], *r[2:]) for i, r in enumerate(rows)]
    dev = DEVICE
    meta = AttentionMetadata(
        positions=torch.zeros(qsl[-1], dtype=torch.long, device=dev),
        query_start_loc=torch.tensor(qsl, device=dev),
        seq_lens=torch.tensor(seq_lens, device=dev),
        slot_mapping=torch.tensor(slots, device=dev),
        block_tables=torch.tensor(tables, device=dev),
        logits_indices=torch.tensor([0], device=dev),
        num_decodes=nd,
        query_lens_cpu=[qsl[i + 1] - qsl[i] for i in range(len(seq_lens))],
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        custom_masks=customs if any(c is not None for c in customs) else None,
        decode_group_sizes_cpu=None if pad_rows else groups,
    )
    return Batch(q.to(dev), ks.to(dev), vs.to(dev), cache.to(dev), meta, rows, written)


def _backend():
    from soarllm.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend()


def _tol(dtype):
    return {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


def _check_against_oracle(b: Batch, out, scale, window=None, softcap=None):
    q = b.q.float().cpu().numpy().astype(np.float64)
    got = out.float().cpu().numpy()
    tol = _tol(b.q.dtype) * (2 if b.cache.dtype == torch.int8 else 1)
    for i, r in enumerate(b.rows):
        if r is None:  # padding row: zeros, not NaN
            np.testing.assert_array_equal(got[b.meta.query_start_loc_cpu[i]], 0.0)
            continue
        s, e, kk, vv, mask = r
        want = _oracle(q[s:e], kk, vv, scale, window, softcap, mask)
        np.testing.assert_allclose(got[s:e], want, atol=tol, rtol=tol, err_msg=f"row {i}")


def _run(b: Batch, scale, window=None, softcap=None, layers=2):
    backend = _backend()
    for _ in range(layers):  # a second layer reuses the per-step prefill plan
        out = backend.forward(b.q, b.k, b.v, b.cache, b.meta, scale, window, softcap)
    assert out.dtype == b.q.dtype and out.shape == b.q.shape
    assert torch.isfinite(out.float()).all()
    return out


MIXED = dict(
    decodes=[(2, 1), (5, 1), (9, 3), (17, 1), (40, 1), (70, 2)],
    prefills=[(7, 0, False), (5, 13, False), (20, 9, False)],
)


# every shape in float32 and bfloat16, float16 on two (each case compiles its own kernels on a GPU)
SHAPES = [(4, 4, 64), (6, 2, 64), (8, 2, 128), (3, 1, 48), (2, 1, 256)]
CASES = ([(dt, *shape) for dt in (torch.float32, torch.bfloat16) for shape in SHAPES]
         + [(torch.float16, 6, 2, 64), (torch.float16, 8, 2, 128)])


@pytest.mark.parametrize("dtype,hq,hkv,d", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_mixed_batch_matches_oracle(dtype, hq, hkv, d):
    b = _make_batch(**MIXED, hq=hq, hkv=hkv, d=d, dtype=dtype, extra_width=3, pad_rows=2)
    out = _run(b, d**-0.5)
    _check_against_oracle(b, out, d**-0.5)


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 3.0), (11, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sliding_window_and_softcap(dtype, window, softcap):
    b = _make_batch(**MIXED, hq=6, hkv=2, d=64, dtype=dtype)
    scale = 0.3  # large enough scores that the softcap matters
    out = _run(b, scale, window, softcap)
    _check_against_oracle(b, out, scale, window, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_custom_masks(dtype):
    b = _make_batch(decodes=[(6, 1), (12, 3)],
                    prefills=[(5, 11, True), (9, 0, False), (4, 30, True)], dtype=dtype)
    out = _run(b, 64**-0.5)
    _check_against_oracle(b, out, 64**-0.5)


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (23, 2.5)])
def test_long_prefills_span_several_query_and_key_tiles(d, window, softcap):
    """Query rows beyond one tile (64 rows, 32 at D=256): per-tile causal bounds, window starts,
    a custom mask over several tiles, and the chunk of a long prompt on its cached part."""
    b = _make_batch(decodes=[(90, 1)], prefills=[(150, 0, False), (100, 70, False), (70, 5, True)],
                    hq=4, hkv=2, d=d, bs=16, dtype=torch.bfloat16)
    out = _run(b, 0.1, window, softcap, layers=1)
    _check_against_oracle(b, out, 0.1, window, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 6])
def test_int8_kv_cache(dtype, window):
    b = _make_batch(**MIXED, dtype=dtype, int8=True, pad_rows=1)
    out = _run(b, 64**-0.5, window)
    _check_against_oracle(b, out, 64**-0.5, window)


@pytest.mark.parametrize("num_splits", [1, 2, 4, 8, None])
@pytest.mark.parametrize("window", [None, 100])
def test_decode_splits_on_long_context(num_splits, window):
    from soarllm.kernels.triton import paged_attention as pa

    b = _make_batch(decodes=[(300, 1), (37, 1), (517, 2)], hq=8, hkv=2, d=64, bs=16,
                    dtype=torch.float32, pad_rows=1, extra_width=4)
    pa.write_kv_cache(b.k, b.v, b.cache, b.meta.slot_mapping)
    m = b.meta
    out = pa.decode_attention(b.q, b.cache, m.seq_lens, m.block_tables, 0.125, window,
                              num_splits=num_splits)
    _check_against_oracle(b, out, 0.125, window)


def test_split_count_depends_on_shapes_only():
    from soarllm.kernels.triton.paged_attention import MAX_SPLITS, num_decode_splits

    assert num_decode_splits(1, 8, 8192) == MAX_SPLITS  # one long decode: many splits
    assert num_decode_splits(256, 8, 8192) == 1  # a full batch fills the GPU already
    assert num_decode_splits(1, 8, 64) == 1  # short contexts are not split
    for rows in (1, 3, 64):
        s = num_decode_splits(rows, 2, 4096)
        assert s & (s - 1) == 0 and 1 <= s <= MAX_SPLITS


@pytest.mark.parametrize("int8", [False, True])
def test_write_kv_cache_skips_padding_slots(int8):
    from soarllm.kernels.triton import paged_attention as pa

    b = _make_batch(decodes=[(3, 1), (8, 2)], prefills=[(6, 2, False)], dtype=torch.bfloat16,
                    int8=int8, pad_rows=3)
    before = b.cache.clone()
    pa.write_kv_cache(b.k, b.v, b.cache, b.meta.slot_mapping)
    want = before.clone()
    flat = want.view(2, -1, *want.shape[3:])
    for slot, key, val in b.written:
        flat[0, slot] = (kv_quant.quantize(key) if int8 else key).to(DEVICE)
        flat[1, slot] = (kv_quant.quantize(val) if int8 else val).to(DEVICE)
    if not int8:
        torch.testing.assert_close(b.cache, want, atol=0, rtol=0)
        return
    # values may differ by one step where the float32 division lands on a rounding tie
    d = b.cache.shape[-1] - kv_quant.SCALE_BYTES
    assert (b.cache[..., :d].int() - want[..., :d].int()).abs().max() <= 1
    torch.testing.assert_close(b.cache[..., d:].contiguous().view(torch.float32),
                               want[..., d:].contiguous().view(torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_matches_reference_backend(dtype):
    """Same batch, same cache contents: the reference backend is the oracle for the engine."""
    b = _make_batch(decodes=[(3, 1), (20, 1), (33, 4)], prefills=[(12, 0, False), (6, 21, False)],
                    hq=9, hkv=3, d=64, dtype=dtype)
    ref_cache = b.cache.clone()
    want = ReferenceAttentionBackend().forward(b.q, b.k, b.v, ref_cache, b.meta, 0.125)
    got = _run(b, 0.125, layers=1)
    torch.testing.assert_close(b.cache, ref_cache, atol=0, rtol=0)
    tol = _tol(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rope_fused_into_the_cache_write(dtype):
    """forward(rope=...) on unrotated q, k = the layer's own rotation, then the reference backend
    (the cache holds the rotated keys, the output attends with them)."""
    from soarllm.model.layers.rotary import RotaryEmbedding

    b = _make_batch(decodes=[(3, 1), (20, 1)], prefills=[(12, 0, False), (6, 21, False)],
                    hq=6, hkv=2, d=64, dtype=dtype)
    rotary = RotaryEmbedding(64, 128, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    positions = torch.randint(0, 128, (b.q.shape[0],), generator=torch.Generator().manual_seed(1))
    cos_sin = rotary.lookup(positions.to(b.q.device), dtype)
    q, k = b.q.clone(), b.k.clone()
    ref_cache = b.cache.clone()
    want = ReferenceAttentionBackend().forward(
        rotary.rotate(cos_sin, b.q.clone()), rotary.rotate(cos_sin, b.k.clone()), b.v, ref_cache,
        b.meta, 0.125)
    got = _backend().forward(q, k, b.v, b.cache, b.meta, 0.125, rope=cos_sin)
    tol = _tol(dtype)
    torch.testing.assert_close(b.cache.float(), ref_cache.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-triton"), "llama")


def test_engine_greedy_tokens_match_reference_backend(tiny_llama, monkeypatch):
    """The whole engine with attention_backend="triton" (interpreted on CPU): the same greedy tokens
    as the reference backend, over chunked prefills (later chunks attend to cached context), decodes,
    and the verification of a predicted output."""
    from soarllm import LLM, SamplingParams
    from soarllm.kernels.triton_attention import TritonAttentionBackend

    seen = {"verify": 0, "extend": 0, "decode": 0}
    forward = TritonAttentionBackend.forward

    def spy(self, q, k, v, kv_cache, meta, *args):
        nd = meta.num_decodes
        seen["decode"] += nd > 0
        seen["verify"] += any(n > 1 for n in meta.decode_group_sizes_cpu or [])
        seen["extend"] += any(meta.seq_lens_cpu[i] > meta.query_lens_cpu[i]
                              for i in range(nd, meta.num_reqs))
        return forward(self, q, k, v, kv_cache, meta, *args)

    monkeypatch.setattr(TritonAttentionBackend, "forward", spy)
    prompts = [
        "def parse(self, args):\n    return self.parse(args)\n    return self.parse(",
        "import json\nimport os\n",
        "def parse(self, args):\n    return self.parse(args)\n    return",
    ]
    def run(name, predictions):
        llm = LLM(str(tiny_llama), device=DEVICE, dtype="float32", attention_backend=name,
                  max_num_seqs=4, max_num_batched_tokens=16, block_size=8)
        assert llm.llm_engine.executor.runner.backend.name == name
        sps = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prediction=p)
               for p in predictions]
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sps)]

    plain = run("reference", [None] * len(prompts))
    # a prediction (Predicted Outputs) makes the engine verify drafts: 1 + k decode rows of one
    # request; one wrong token in it makes a verification reject some
    predicted = list(plain[1])
    predicted[4] = (predicted[4] + 1) % 100
    predictions = [None, predicted, None]
    outs = {name: run(name, predictions) for name in ("reference", "triton")}
    assert outs["reference"] == plain
    assert outs["triton"] == outs["reference"]
    assert seen["decode"] and seen["extend"] and seen["verify"], seen


def test_backend_selection(monkeypatch):
    from soarllm.errors import ConfigError
    from soarllm.kernels.attention import get_attention_backend

    # auto on CPU: the native kernel where it builds (tests/kernels/test_cpu_attention.py covers
    # the fallback), never Triton
    assert get_attention_backend("cpu").name == "cpu"
    assert get_attention_backend("cpu", "auto").name == "cpu"
    assert get_attention_backend("cpu", "Reference").name == "reference"
    with pytest.raises(ConfigError, match="reference"):
        get_attention_backend("cpu", "flash")
    assert get_attention_backend("cuda", "reference").name == "reference"
    assert get_attention_backend("cuda").name == "triton"  # auto on CUDA where triton imports
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_attention_backend("cpu", "triton").name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        get_attention_backend("cpu", "triton")


def test_engine_args_and_flag(monkeypatch):
    from soarllm.cli.engine_args import engine_args_from
    from soarllm.cli.main import build_parser
    from soarllm.config import EngineArgs

    monkeypatch.delenv("SOARLLM_ATTENTION_BACKEND", raising=False)
    assert EngineArgs().attention_backend is None
    monkeypatch.setenv("SOARLLM_ATTENTION_BACKEND", "reference")
    assert EngineArgs().attention_backend == "reference"
    ns = build_parser().parse_args(["generate", "m", "--attention-backend", "triton"])
    assert engine_args_from(ns).attention_backend == "triton"
    ns = build_parser().parse_args(["generate", "m"])
    assert engine_args_from(ns).attention_backend == "reference"  # the environment's


def _compile_for_hopper() -> list[tuple[str, int]]:
    """Compile one configuration of every kernel for sm_90 with Triton's real compiler (frontend,
    LLVM, ptxas), without a GPU: (kernel, shared memory bytes). Run in a process without
    TRITON_INTERPRET (the interpreter accepts programs the compiler refuses)."""
    from soarllm.kernels.triton import paged_attention as pa
    from tests.kernels.sm90 import compile_sm90

    def build(fn, types, consts, stages=3):
        return compile_sm90(fn, types, consts, stages=stages)

    d, dt = 128, "bf16"
    _, block_n, stages = pa._tiles(d, torch.bfloat16)
    out = []
    for quant in (False, True):
        cache, scales = ("*i8", "*fp32") if quant else (f"*{dt}", f"*{dt}")
        common = dict(q_ptr=f"*{dt}", kc_ptr=cache, vc_ptr=cache, ks_ptr=scales, vs_ptr=scales,
                      out_ptr=f"*{dt}", bt_ptr="*i64", scale="fp32", softcap="fp32")
        out.append(build(pa._decode_kernel, dict(common, seq_lens_ptr="*i64", part_ptr="*fp32",
                                                 lse_ptr="*fp32"),
                         dict(GROUP=4, HEAD_DIM=d, BLOCK_G=16, BLOCK_D=d, BLOCK_N=block_n,
                              NUM_SPLITS=8, QUANT=quant, SOFTCAP=True, WINDOW=True, IEEE=False),
                         stages))
        if quant:
            out.append(build(pa._write_kv_kernel, dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}",
                                                       kc_ptr=cache, vc_ptr=cache, ks_ptr=scales,
                                                       vs_ptr=scales, slot_ptr="*i64"),
                             dict(HEAD_DIM=d, BLOCK_D=d, QUANT=True)))
    ptrs = {n: "*i64" for n in ("bt_rows_ptr", "q_starts_ptr", "q_lens_ptr", "ctx_lens_ptr",
                                "mask_offs_ptr")}
    out.append(build(pa._prefill_kernel,
                     dict(common, **ptrs, kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", ks_ptr=f"*{dt}",
                          vs_ptr=f"*{dt}", masks_ptr="*u8"),
                     dict(GROUP=4, HEAD_DIM=d, BLOCK_M=64, BLOCK_D=d, BLOCK_N=block_n,
                          QUANT=False, SOFTCAP=True, WINDOW=True, HAS_MASKS=True, IEEE=False),
                     stages))
    out.append(build(pa._combine_splits_kernel,
                     dict(out_ptr=f"*{dt}", part_ptr="*fp32", lse_ptr="*fp32"),
                     dict(HEAD_DIM=d, BLOCK_D=d, NUM_SPLITS=8)))
    return out


def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter runs programs the GPU compiler may refuse: compile each kernel for an H100
    (sm_90) with the real compiler, on this machine, and check its shared memory fits."""
    from tests.kernels.sm90 import H100_SHARED_BYTES, compiled_in_child

    built = compiled_in_child("tests.kernels.test_triton_attention:_compile_for_hopper", tmp_path)
    assert len(built) == 5
    for name, shared in built:
        assert shared <= H100_SHARED_BYTES, (name, shared)
