/* Unpack PyTorch's CPU int4 weight layout (aten::_convert_weight_to_int4pack_for_cpu with
 * inner_k_tiles = 1) into a bfloat16 weight [N, K]: w = (q - 8) * scale + zero, one (scale, zero)
 * pair per group of K inputs, as aten::_weight_int4pack_mm_for_cpu computes it.
 *
 * Used for prefill-sized batches: PyTorch's int4 kernel is built for a few rows, and a bfloat16
 * GEMM over the unpacked weight is faster once many rows share it. soarllm/quant/w4a16.py checks
 * this unpacking against the packing op once per process before it is used.
 *
 * int4pack_gemm_bf16 serves the rows in between (5 to ~80: decode batches, verification steps):
 * PyTorch's kernel computes 4 rows at a time and dequantizes the weight again for every 4, so 5
 * rows cost what 8 do and 32 what 8 x 4 do. Here each tile of 64 output rows is dequantized once
 * per call into a bfloat16 buffer (pairs of inputs side by side per output row, the operand
 * layout of vdpbf16ps), and every row of x runs over it, 6 at a time, with the products summed in
 * float32 (AVX-512 BF16; without it the caller keeps PyTorch's kernel).
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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <stdlib.h>

int int4pack_gemm_supported(void) { return 1; }

#define MB 6 /* rows of x per pass over a dequantized tile: 6 x 4 accumulators in registers */

/* Tile t (64 output rows) of the weight as bfloat16 pairs: buf[(p * 64 + r) * 2 + i] holds row r
 * at input 2p + i, w = (q - 8) * scale + zero rounded to bfloat16. */
static void dequant_tile(const uint8_t *tile, const uint16_t *scale_zero, int64_t n, int64_t t,
                         int64_t k, int64_t group, uint16_t *buf) {
    /* interleave two vectors of 16 bfloat16 (a: input 2p, b: input 2p+1) as a0 b0 a1 b1 ... */
    const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i nib = _mm512_set1_epi32(0xF);
    __m512 sc[4], zb[4];
    for (int64_t p = 0; p < k / 2; p++) {
        const int64_t k0 = 2 * p;
        if (k0 % group == 0) { /* this group's scales and zeros of the tile's 64 rows */
            const uint16_t *sz = scale_zero + ((k0 / group) * n + t * 64) * 2;
            for (int c = 0; c < 4; c++) {
                /* 16 (scale, zero) bfloat16 pairs -> float32 scale and zero - 8 * scale */
                __m512i pr = _mm512_loadu_si512((const void *)(sz + 32 * c));
                __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
                __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xFFFF0000u)));
                sc[c] = s;
                zb[c] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);
            }
        }
        const uint8_t *b0 = tile + k0 * 32, *b1 = b0 + 32;
        for (int c = 0; c < 4; c++) { /* rows 16c..16c+15: low nibbles of bytes 0-31, then high */
            const int off = 16 * (c & 1), shift = 4 * (c >> 1);
            __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b0 + off)));
            __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b1 + off)));
            q0 = _mm512_and_si512(_mm512_srli_epi32(q0, shift), nib);
            q1 = _mm512_and_si512(_mm512_srli_epi32(q1, shift), nib);
            __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), sc[c], zb[c]);
            __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), sc[c], zb[c]);
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(w1, w0); /* w0 low half, w1 high half */
            _mm512_storeu_si512((void *)(buf + (p * 64 + 16 * c) * 2), _mm512_permutexvar_epi16(mix, both));
        }
    }
}

/* MJ (<= MB) rows of x over a dequantized tile: out[j][t * 64 .. +63]. */
static inline __attribute__((always_inline)) void tile_rows(const uint16_t *x, int64_t ldx,
                                                            const uint16_t *buf, int64_t k,
                                                            uint16_t *out, int64_t ldo, const int MJ) {
    __m512 acc[MB][4];
    for (int j = 0; j < MJ; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k / 2; p++) {
        __m512bh w[4];
        for (int c = 0; c < 4; c++) w[c] = (__m512bh)_mm512_loadu_si512((const void *)(buf + (p * 64 + 16 * c) * 2));
        for (int j = 0; j < MJ; j++) {
            uint32_t pair;
            memcpy(&pair, x + j * ldx + 2 * p, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], w[c], xv);
        }
    }
    for (int j = 0; j < MJ; j++)
        for (int c = 0; c < 4; c++)
            _mm256_storeu_si256((__m256i *)(out + j * ldo + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[j][c]));
}

/* out [m, n] (rows ldo apart) = x [m, k] (rows ldx apart) @ W.T, W in the layout above with n a
 * multiple of 64 (callers check; the packing pads rows to 16 only). */
void int4pack_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                        const uint16_t *scale_zero, uint16_t *out, int64_t ldo, int64_t m, int64_t n,
                        int64_t k, int64_t group) {
    const int64_t tiles = n / 64;
#pragma omp parallel
    {
        uint16_t *buf = (uint16_t *)aligned_alloc(64, (size_t)k * 64 * 2);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            dequant_tile(packed + t * 64 * k / 2, scale_zero, n, t, k, group, buf);
            for (int64_t j0 = 0; j0 < m; j0 += MB) {
                const uint16_t *xr = x + j0 * ldx;
                uint16_t *o = out + j0 * ldo + t * 64;
                switch (m - j0 < MB ? m - j0 : MB) { /* the row count as a constant */
                case 1: tile_rows(xr, ldx, buf, k, o, ldo, 1); break;
                case 2: tile_rows(xr, ldx, buf, k, o, ldo, 2); break;
                case 3: tile_rows(xr, ldx, buf, k, o, ldo, 3); break;
                case 4: tile_rows(xr, ldx, buf, k, o, ldo, 4); break;
                case 5: tile_rows(xr, ldx, buf, k, o, ldo, 5); break;
                default: tile_rows(xr, ldx, buf, k, o, ldo, 6);
                }
            }
        }
        free(buf);
    }
}
#else
int int4pack_gemm_supported(void) { return 0; }
void int4pack_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                        const uint16_t *scale_zero, uint16_t *out, int64_t ldo, int64_t m, int64_t n,
                        int64_t k, int64_t group) {
    (void)x, (void)ldx, (void)packed, (void)scale_zero, (void)out, (void)ldo, (void)m, (void)n,
        (void)k, (void)group;
}
#endif
