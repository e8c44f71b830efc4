/* Unpack PyTorch's CPU int4 weight layout (aten::_convert_weight_to_int4pack_for_cpu with
 * inner_k_tiles = 1) into a bfloat16 weight [N, K]: w = (q - 8) * scale + zero, one (scale, zero)
 * pair per group of K inputs, as aten::_weight_int4pack_mm_for_cpu computes it.
 *
 * Used for prefill-sized batches: PyTorch's int4 kernel is built for a few rows, and a bfloat16
 * GEMM over the unpacked weight is faster once many rows share it. soarllm/quant/w4a16.py checks
 * this unpacking against the packing op once per process before it is used.
 *
 * The layout (observed on x86-64 builds; the check above guards it): output rows in tiles of 64,
 * each tile t a [K][32] byte array starting at byte t * 64 * K / 2, whose byte (k, j) holds row
 * j (low nibble) and row j + 32 (high nibble); a last tile of R < 64 rows (a multiple of 16) is a
 * [K][R / 2] byte array whose byte (k, j) holds rows 2j (low) and 2j + 1 (high).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* packed: N * K / 2 bytes; scale_zero: [K / group][N][2] bfloat16; out: [N][K] bfloat16. */
void int4pack_to_bf16(const uint8_t *packed, const uint16_t *scale_zero, int64_t n, int64_t k,
                      int64_t group, uint16_t *out) {
    int64_t tiles = (n + 63) / 64;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        int64_t t = row / 64, j = row % 64;
        int64_t rows = (t == tiles - 1 && n % 64) ? n % 64 : 64;
        const uint8_t *tile = packed + t * 64 * k / 2;
        int64_t width, col, shift;
        if (rows == 64) {
            width = 32, col = j % 32, shift = (j / 32) * 4;
        } else {
            width = rows / 2, col = j / 2, shift = (j % 2) * 4;
        }
        uint16_t *dst = out + row * k;
        for (int64_t g0 = 0; g0 < k; g0 += group) {
            const uint16_t *sz = scale_zero + ((g0 / group) * n + row) * 2;
            float scale = bf16_to_f32(sz[0]), zero = bf16_to_f32(sz[1]);
            for (int64_t kk = g0; kk < g0 + group; kk++) {
                int q = (tile[kk * width + col] >> shift) & 0xF;
                dst[kk] = f32_to_bf16(((float)q - 8.0f) * scale + zero);
            }
        }
    }
}
