// The CPU kernel of soarllm::attention for compiled model steps: a step of decode rows only (the
// usual one) over a float KV cache calls the native paged-attention kernel (paged_attention.c)
// straight from inductor's C++ wrapper, without entering Python once per layer (~15 us each on a
// 2-core CPU, half of the layer's attention at batch 1). Anything else goes to the Python
// implementation, registered as soarllm::attention_ref (model/layers/attention.py).
//
// The step's decode rows (block tables, context lengths, new tokens' slots) are not arguments of
// the operator (compiled graphs take tensors the model computes, not the scheduler's): the CPU
// backend announces them once per step through soarllm::cpu_decode_rows, kept per thread like the
// forward context they come from. Built and loaded by soarllm/kernels/cpu_native.py
// (load_torch_ops), asked for by kernels/cpu_attention.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

extern "C" int paged_decode_attention(
    const void *q, int64_t q_stride, const void *k_new, int64_t k_new_stride, const void *v_new,
    int64_t v_new_stride, const int64_t *slots, void *k_cache, void *v_cache,
    const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens, void *out,
    int io_type, int kv_type, int n, int hq, int hkv, int d, int stride, int block_size,
    float scale, float softcap, int window);

namespace {

struct DecodeRows {
    at::Tensor tables, lens, slots;  // int64, contiguous: [n, max_blocks], [n], [n]
    bool active = false;
};
thread_local DecodeRows step_rows;

void cpu_decode_rows(const std::optional<at::Tensor> &tables, const std::optional<at::Tensor> &lens,
                     const std::optional<at::Tensor> &slots) {
    if (tables && lens && slots) {
        TORCH_CHECK(tables->scalar_type() == at::kLong && lens->scalar_type() == at::kLong &&
                        slots->scalar_type() == at::kLong && tables->is_contiguous() &&
                        lens->is_contiguous() && slots->is_contiguous(),
                    "cpu_decode_rows: tables, lens and slots must be contiguous int64");
        step_rows = DecodeRows{*tables, *lens, *slots, true};
    } else {
        step_rows = DecodeRows{};
    }
}

// [T, H, D] with each row's heads back to back (rows may be strided)
bool rows_of_heads(const at::Tensor &x) {
    return x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2);
}

at::Tensor reference(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                     at::Tensor &kv_cache, double scale, std::optional<int64_t> window,
                     std::optional<double> softcap) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("soarllm::attention_ref", "")
                         .typed<at::Tensor(const at::Tensor &, const at::Tensor &,
                                           const at::Tensor &, at::Tensor &, double,
                                           std::optional<int64_t>, std::optional<double>)>();
    return op.call(q, k, v, kv_cache, scale, window, softcap);
}

at::Tensor attention_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                         at::Tensor &kv_cache, double scale, std::optional<int64_t> window,
                         std::optional<double> softcap) {
    const DecodeRows &rows = step_rows;
    const auto dtype = q.scalar_type();
    const int io = dtype == at::kFloat ? 0 : dtype == at::kBFloat16 ? 1 : -1;
    if (rows.active && io >= 0 && rows_of_heads(q) && rows_of_heads(k) && rows_of_heads(v) &&
        q.size(0) == rows.slots.size(0) && kv_cache.dim() == 5 && kv_cache.size(0) == 2 &&
        kv_cache.scalar_type() == dtype && kv_cache.is_contiguous() && k.scalar_type() == dtype &&
        v.scalar_type() == dtype && k.size(1) == kv_cache.size(3) && k.size(2) == q.size(2) &&
        kv_cache.size(4) == q.size(2)) {
        const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
        at::Tensor out = at::empty({n, hq, d}, q.options());
        char *base = static_cast<char *>(kv_cache.data_ptr());
        char *v_plane = base + kv_cache.stride(0) * kv_cache.element_size();
        int rc = paged_decode_attention(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            rows.slots.data_ptr<int64_t>(), base, v_plane, rows.tables.data_ptr<int64_t>(),
            rows.tables.stride(0), rows.lens.data_ptr<int64_t>(), out.data_ptr(), io, io, n, hq,
            kv_cache.size(3), d, kv_cache.size(4), kv_cache.size(2), static_cast<float>(scale),
            softcap ? static_cast<float>(*softcap) : 0.0f, window ? static_cast<int>(*window) : 0);
        if (rc == 0) return out;
    }
    return reference(q, k, v, kv_cache, scale, window, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(soarllm, m) {
    m.def("cpu_decode_rows(Tensor? tables, Tensor? lens, Tensor? slots) -> ()", &cpu_decode_rows);
}

TORCH_LIBRARY_IMPL(soarllm, CPU, m) { m.impl("attention", &attention_cpu); }
