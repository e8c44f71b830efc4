// soarllm::w4a8_vnni4 as a C++ operator over the C kernel in int4_vnni.c, so that the compiled
// model step (inductor's C++ wrapper) calls it without entering Python.
// Built and loaded by soarllm/kernels/cpu_native.py (load_torch_ops); the same operator in Python
// (quant/w4a16.py) is the fallback where this cannot be built.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

extern "C" void int4_vnni_gemm(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                               const uint16_t *sm, uint16_t *out, int64_t ldo, int M, int N, int K);

namespace {

at::Tensor w4a8_vnni4(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale_min,
                      int64_t out_features) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
                "w4a8_vnni4: x must be bfloat16 [M, K] with contiguous rows");
    const int64_t m = x.size(0), k = packed.size(1) * 32;
    TORCH_CHECK(x.size(1) == k, "w4a8_vnni4: x has ", x.size(1), " inputs, the weight ", k);
    TORCH_CHECK(out_features <= packed.size(0) * 16, "w4a8_vnni4: ", out_features,
                " outputs, the weight ", packed.size(0) * 16);
    at::Tensor out = at::empty({m, out_features}, x.options());
    if (m == 0) return out;
    int4_vnni_gemm(reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0),
                   reinterpret_cast<const uint8_t *>(packed.data_ptr()),
                   reinterpret_cast<const uint16_t *>(scale_min.data_ptr()),
                   reinterpret_cast<uint16_t *>(out.data_ptr()), out.stride(0), m, out_features, k);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(soarllm, m) {
    m.def("w4a8_vnni4(Tensor x, Tensor packed, Tensor scale_min, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(soarllm, CPU, m) { m.impl("w4a8_vnni4", &w4a8_vnni4); }
