// soarllm::w4a16_soar4 as a C++ operator over the C kernel in int4_gemm.c, so that the compiled
// model step (inductor's C++ wrapper) calls it without entering Python: a 30-layer model makes
// ~120 of these calls per decode step, ~6 us each through a Python implementation.
// Built and loaded by soarllm/kernels/cpu_native.py (load_torch_ops); the same operator in Python
// (quant/w4a16.py) is the fallback where this cannot be built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

extern "C" void int4_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                               const uint16_t *sm, uint16_t *out, int64_t ldo, int M, int N, int K,
                               int G);
extern "C" void int4_dequant_bf16(const uint8_t *packed, const uint16_t *sm, uint16_t *out, int N,
                                  int K, int G);

namespace {

// From this many rows on: the weight dequantized to bfloat16, then one GEMM (quant/w4a16.py's
// DEQUANT_MIN_ROWS, passed in at build time)
constexpr int64_t kDequantMinRows = SOAR_DEQUANT_MIN_ROWS;

at::Tensor w4a16_soar4(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale_min,
                       int64_t group_size) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
                "w4a16_soar4: x must be bfloat16 [M, K] with contiguous rows");
    const int64_t m = x.size(0), n = packed.size(0), k = packed.size(1) * 2;
    TORCH_CHECK(x.size(1) == k, "w4a16_soar4: x has ", x.size(1), " inputs, the weight ", k);
    auto *sm = reinterpret_cast<const uint16_t *>(scale_min.data_ptr());
    auto *w4 = reinterpret_cast<const uint8_t *>(packed.data_ptr());
    if (m >= kDequantMinRows) {
        at::Tensor w = at::empty({n, k}, x.options());
        int4_dequant_bf16(w4, sm, reinterpret_cast<uint16_t *>(w.data_ptr()), n, k, group_size);
        return at::linear(x, w);
    }
    at::Tensor out = at::empty({m, n}, x.options());
    int4_gemm_bf16(reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0), w4, sm,
                   reinterpret_cast<uint16_t *>(out.data_ptr()), out.stride(0), m, n, k, group_size);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(soarllm, m) {
    m.def("w4a16_soar4(Tensor x, Tensor packed, Tensor scale_min, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(soarllm, CPU, m) { m.impl("w4a16_soar4", &w4a16_soar4); }
