// soarllm::w4a16_int4pack as a C++ operator: PyTorch's CPU int4 layout multiplied by the kernel a
// row count calls for, so that the compiled model step (inductor's C++ wrapper) calls it without
// entering Python (a 30-layer model makes ~120 of these calls per step; through the Python op
// soarllm::w4a16_linear_cpu each costs ~8 us more).
// Built and loaded by soarllm/kernels/cpu_native.py (load_torch_ops) once quant/w4a16.py has
// checked the C kernels of int4pack.c in this process; that Python op is the fallback.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

extern "C" void int4pack_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                                   const uint16_t *scale_zero, uint16_t *out, int64_t ldo,
                                   int64_t m, int64_t n, int64_t k, int64_t group);
extern "C" void int4pack_to_bf16(const uint8_t *packed, const uint16_t *scale_zero, int64_t n,
                                 int64_t k, int64_t group, int64_t tile_rows, uint16_t *out);

namespace {

// quant/w4a16.py's DEQUANT_MIN_ROWS, passed in at build time
constexpr int64_t kDequantMinRows = SOAR_DEQUANT_MIN_ROWS;

at::Tensor w4a16_int4pack(const at::Tensor &x, const at::Tensor &packed,
                          const at::Tensor &scale_and_zero, int64_t group_size) {
    const int64_t m = x.size(0), n = scale_and_zero.size(1), k = x.size(1);
    const bool bf16 = scale_and_zero.scalar_type() == at::kBFloat16 &&
                      x.scalar_type() == at::kBFloat16 && x.stride(1) == 1;
    auto *sz = reinterpret_cast<const uint16_t *>(scale_and_zero.data_ptr());
    auto *w4 = reinterpret_cast<const uint8_t *>(packed.data_ptr());
    if (bf16 && n % 64 == 0) {
        at::Tensor out = at::empty({m, n}, x.options());
        int4pack_gemm_bf16(reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0), w4, sz,
                           reinterpret_cast<uint16_t *>(out.data_ptr()), out.stride(0), m, n, k,
                           group_size);
        return out;
    }
    if (bf16 && m >= kDequantMinRows) {
        at::Tensor w = at::empty({n, k}, x.options());
        // built only where the GEMM above runs: PyTorch's AVX-512 layout, tiles of 64 rows
        int4pack_to_bf16(w4, sz, n, k, group_size, 64, reinterpret_cast<uint16_t *>(w.data_ptr()));
        return at::linear(x, w);
    }
    return at::_weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(soarllm, m) {
    m.def("w4a16_int4pack(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(soarllm, CPU, m) { m.impl("w4a16_int4pack", &w4a16_int4pack); }
