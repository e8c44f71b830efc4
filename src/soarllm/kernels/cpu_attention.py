"""The CPU attention backend: decode rows read the paged KV cache in place, in a native kernel.

The reference backend gathers (copies) each decode's whole context every layer and runs a chain of
small PyTorch ops on it (~145 us per layer for one decode at 200 tokens on a 2-core CPU, most of it
dispatch). Here one C call (kernels/csrc/paged_attention.c) walks each row's block table and
attends over its keys and values where they lie, with an online softmax in float32, every (row,
KV head) pair a task on PyTorch's OpenMP threads. It serves float32 and bfloat16 activations over
float32, bfloat16 and int8 (kernels/kv_quant.py) caches, sliding windows, softcaps and speculative
verification rows (each row its own context length). Prefill chunks (several query tokens of one
request, and custom masks) keep the reference path: PyTorch's flash kernel is the fast one there.

Anything the kernel does not cover (another dtype, a latent one-plane cache, a head size over 256
or more than 32 query heads per KV head) goes through the reference backend, the oracle this one is
tested against.
"""

from __future__ import annotations

import ctypes

import torch

from soarllm.kernels import cpu_native, kv_quant
from soarllm.kernels.attention import AttentionMetadata, ReferenceAttentionBackend

_IO_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_INT8 = 2


def load_kernel():
    """The ctypes function ``paged_decode_attention``, or None where it cannot be built."""
    lib = cpu_native.load("paged_attention")
    if lib is None:
        return None
    fn = lib.paged_decode_attention
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32, i32, i32,
                   i32, i32, i32, i32, i32, f32, f32, i32]
    fn.restype = ctypes.c_int
    return fn


class CpuAttentionBackend(ReferenceAttentionBackend):
    """The reference backend with its decode path in a native, gather-free kernel."""

    name = "cpu"

    def __init__(self, kernel=None):
        self._kernel = kernel if kernel is not None else load_kernel()
        if self._kernel is None:
            raise RuntimeError("the native paged-attention kernel could not be built")
        self._compiled_op = False  # the C++ kernel of soarllm::attention is loaded and in use

    def prepare_compiled(self) -> None:
        """Before the model step is compiled: load (building once per machine, ~40 s) the C++
        kernel of ``soarllm::attention`` (kernels/csrc/attention_op.cpp), so that compiled decode
        steps call the native kernel without Python in between. Where it cannot be built, the
        op's Python implementation serves (one warning)."""
        self._compiled_op = cpu_native.load_torch_ops("attention_op", "paged_attention")

    def announce_step(self, meta: AttentionMetadata | None) -> None:
        """Called by ``set_forward_context`` as a step's context begins (``meta``) and ends
        (None): hands a decode-only step's rows to the C++ kernel, which attends those steps."""
        if not self._compiled_op:
            return
        if meta is not None and meta.num_decodes == meta.slot_mapping.shape[0] > 0:
            torch.ops.soarllm.cpu_decode_rows(*_decode_rows(meta, meta.num_decodes))
        else:
            torch.ops.soarllm.cpu_decode_rows(None, None, None)

    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window=None, softcap=None):
        """A step of decode rows only (the usual one) over a float cache: one native call stores
        the new keys and values and attends; anything else takes the reference path, with its
        decode rows through ``_decode`` below."""
        types = _kernel_types(q, kv_cache) if meta.num_decodes == q.shape[0] else None
        if (types is not None and kv_cache.dtype == q.dtype and _rows_of_heads(k)
                and _rows_of_heads(v)):
            out = self._call(types, q, kv_cache, meta, q.shape[0], scale, sliding_window, softcap,
                             k, v)
            if out is not None:
                return out
        return super().forward(q, k, v, kv_cache, meta, scale, sliding_window, softcap)

    def _decode(self, q, kv_cache, meta, nd, scale, sliding_window, softcap, gqa, out):
        types = _kernel_types(q, kv_cache)
        res = None
        if types is not None:
            res = self._call(types, q, kv_cache, meta, nd, scale, sliding_window, softcap, None,
                             None, out)
        if res is None:
            return super()._decode(q, kv_cache, meta, nd, scale, sliding_window, softcap, gqa, out)
        return res

    def _call(self, types, q, kv_cache, meta, nd, scale, sliding_window, softcap, k_new, v_new,
              out=None):
        """The kernel (``types``: its activation and cache type codes) over the first ``nd``
        rows, storing ``k_new``/``v_new`` first when given; None where a size is beyond the
        kernel's buffers (the caller falls back)."""
        _, _, block_size, hkv, stride = kv_cache.shape
        hq, d = q.shape[1], q.shape[2]
        io_type, kv_type = types
        qd = q[:nd]
        if not _rows_of_heads(qd):
            qd = qd.contiguous()
        res = out[:nd] if out is not None else torch.empty((nd, hq, d), dtype=q.dtype)
        tables, lens, slots = _decode_rows(meta, nd)
        plane = kv_cache.stride(0) * kv_cache.element_size()  # bytes from the K to the V plane
        base = kv_cache.data_ptr()
        if k_new is None:
            new = (0, 0, 0, 0)
        else:
            new = (k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(), v_new.stride(0))
        rc = self._kernel(qd.data_ptr(), qd.stride(0), *new, slots.data_ptr(), base, base + plane,
                          tables.data_ptr(), tables.stride(0), lens.data_ptr(), res.data_ptr(),
                          io_type, kv_type, nd,
                          hq, hkv, d, stride, block_size, float(scale), float(softcap or 0.0),
                          int(sliding_window or 0))
        if rc != 0:
            return None
        return res if out is None else out


def _kernel_types(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int] | None:
    """(activation type, cache type) codes of the kernel, or None where it does not apply."""
    io_type = _IO_TYPES.get(q.dtype)
    kv_type = _INT8 if kv_quant.is_quantized(kv_cache) else _IO_TYPES.get(kv_cache.dtype)
    if (kv_cache.shape[0] != 2 or io_type is None or kv_type is None
            or (kv_type != _INT8 and kv_cache.dtype != q.dtype)
            or q.device.type != "cpu" or not kv_cache.is_contiguous()):
        return None
    return io_type, kv_type


def _rows_of_heads(x: torch.Tensor) -> bool:
    """[T, H, D] with each row's heads back to back (rows may be strided)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _decode_rows(meta: AttentionMetadata, nd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode rows' block tables [nd, max_blocks], context lengths [nd] and new tokens' slots
    [nd] as contiguous int64, once per step (every layer reuses them)."""
    got = meta.cache.get("cpu_decode_rows")
    if got is None:
        tables = meta.block_tables[:nd].to(torch.int64).contiguous()
        lens = meta.seq_lens[:nd].to(torch.int64).contiguous()
        slots = meta.slot_mapping[:nd].to(torch.int64).contiguous()
        got = meta.cache["cpu_decode_rows"] = (tables, lens, slots)
    return got
