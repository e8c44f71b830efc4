// soarllm::w4a8_vnni4 and soarllm::w8a8_vnni8 as C++ operators over the C kernels in
// vnni_gemm.c, so that the compiled model step (inductor's C++ wrapper) calls them without
// entering Python. Built and loaded by soarllm/kernels/cpu_native.py (load_torch_ops); the same
// operators in Python (quant/vnni.py) are the fallback where this cannot be built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

extern "C" void int4_vnni_gemm(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                               const uint16_t *sm, uint16_t *out, int64_t ldo, int M, int N, int K);
extern "C" void int8_vnni_gemm(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                               const uint16_t *sm, uint16_t *out, int64_t ldo, int M, int N, int K);

namespace {

using Gemm = void (*)(const uint16_t *, int64_t, const uint8_t *, const uint16_t *, uint16_t *,
                     int64_t, int, int, int);

// packed [N/16, K/32, bits, 64] bytes, scale_min [N/16, K/32, 2, 16] float16
at::Tensor vnni_linear(const char *name, Gemm gemm, int64_t bits, const at::Tensor &x,
                       const at::Tensor &packed, const at::Tensor &scale_min, int64_t out_features) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1, name,
                ": x must be bfloat16 [M, K] with contiguous rows");
    TORCH_CHECK(packed.dim() == 4 && packed.size(2) == bits && packed.is_contiguous(), name,
                ": not a ", bits, "-bit VNNI layout");
    TORCH_CHECK(scale_min.scalar_type() == at::kHalf && scale_min.is_contiguous() &&
                    scale_min.dim() == 4 && scale_min.size(0) == packed.size(0) &&
                    scale_min.size(1) == packed.size(1) && scale_min.size(2) == 2 &&
                    scale_min.size(3) == 16,
                name, ": scale_min must be float16 [N/16, K/32, 2, 16] beside the weight");
    const int64_t m = x.size(0), k = packed.size(1) * 32;
    TORCH_CHECK(x.size(1) == k, name, ": x has ", x.size(1), " inputs, the weight ", k);
    TORCH_CHECK(out_features <= packed.size(0) * 16, name, ": ", out_features,
                " outputs, the weight ", packed.size(0) * 16);
    at::Tensor out = at::empty({m, out_features}, x.options());
    if (m == 0) return out;
    gemm(reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0),
         reinterpret_cast<const uint8_t *>(packed.data_ptr()),
         reinterpret_cast<const uint16_t *>(scale_min.data_ptr()),
         reinterpret_cast<uint16_t *>(out.data_ptr()), out.stride(0), m, out_features, k);
    return out;
}

at::Tensor w4a8_vnni4(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale_min,
                      int64_t out_features) {
    return vnni_linear("w4a8_vnni4", int4_vnni_gemm, 4, x, packed, scale_min, out_features);
}

at::Tensor w8a8_vnni8(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale_min,
                      int64_t out_features) {
    return vnni_linear("w8a8_vnni8", int8_vnni_gemm, 8, x, packed, scale_min, out_features);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(soarllm, m) {
    m.def("w4a8_vnni4(Tensor x, Tensor packed, Tensor scale_min, int out_features) -> Tensor");
    m.def("w8a8_vnni8(Tensor x, Tensor packed, Tensor scale_min, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(soarllm, CPU, m) {
    m.impl("w4a8_vnni4", &w4a8_vnni4);
    m.impl("w8a8_vnni8", &w8a8_vnni8);
}
