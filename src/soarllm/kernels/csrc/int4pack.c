/* Unpack PyTorch's CPU int4 weight layout (aten::_convert_weight_to_int4pack_for_cpu with
 * inner_k_tiles = 1) into a bfloat16 weight [N, K]: w = (q - 8) * scale + zero, one (scale, zero)
 * pair per group of K inputs, as aten::_weight_int4pack_mm_for_cpu computes it.
 *
 * Used for prefill-sized batches: PyTorch's int4 kernel is built for a few rows, and a bfloat16
 * GEMM over the unpacked weight is faster once many rows share it. soarllm/quant/w4a16.py checks
 * this unpacking against the packing op once per process before it is used.
 *
 * int4pack_gemm_bf16 serves every smaller count (batch-1 decode, decode batches, verification
 * steps): PyTorch's kernel computes 4 rows at a time and dequantizes the weight again for every 4,
 * so 5 rows cost what 8 do and 32 what 8 x 4 do, and at 1 row it runs well below the memory
 * bandwidth. Here, up to 24 rows multiply the nibbles directly, as exact bfloat16 numbers, with
 * the scales applied per group in float32 (the direct path below: the same arithmetic for every
 * row count, and the same sums as PyTorch's kernel up to float rounding); more rows run over
 * each tile of 64 output rows dequantized once per call into a bfloat16 buffer (pairs of inputs
 * side by side per output row, the operand layout of vdpbf16ps; the weight rounded to bfloat16,
 * as the unpack + GEMM path does), 6 rows at a time. Products are summed in float32 (AVX-512 BF16; without
 * it the caller keeps PyTorch's kernel).
 *
 * The layout (observed on x86-64 builds; the check above guards it): output rows in tiles of T
 * (64 where PyTorch runs its AVX-512 kernels, 32 on AVX2), each tile t a [K][T / 2] byte array
 * starting at byte t * T * K / 2, whose byte (k, j) holds row j (low nibble) and row j + T / 2
 * (high nibble); a last tile of R < T rows (a multiple of 16) is a [K][R / 2] byte array whose
 * byte (k, j) holds rows 2j (low) and 2j + 1 (high). The GEMM below reads T = 64 only.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* packed: N * K / 2 bytes in tiles of `tile_rows` (64 or 32); scale_zero: [K / group][N][2]
 * bfloat16; out: [N][K] bfloat16. */
void int4pack_to_bf16(const uint8_t *packed, const uint16_t *scale_zero, int64_t n, int64_t k,
                      int64_t group, int64_t tile_rows, uint16_t *out) {
    const int64_t T = tile_rows, tiles = (n + T - 1) / T;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        int64_t t = row / T, j = row % T;
        int64_t rows = (t == tiles - 1 && n % T) ? n % T : T;
        const uint8_t *tile = packed + t * T * k / 2;
        int64_t width, col, shift;
        if (rows == T) {
            width = T / 2, col = j % (T / 2), shift = (j / (T / 2)) * 4;
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
#ifndef DIRECT_MAX_ROWS
#define DIRECT_MAX_ROWS 25 /* fewer rows than this: the direct path (below), exact as PyTorch's kernel */
#endif

/* 16 (scale, zero) bfloat16 pairs -> float32 scale s and c = zero - bias * scale (the weight is
 * (q - 8) * s + zero: the dequantized tile uses bias 8, the direct path, on 128 + q, 136) */
static inline void sz16(const uint16_t *pairs, float bias, __m512 *s, __m512 *c) {
    __m512i pr = _mm512_loadu_si512((const void *)pairs);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
    __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xFFFF0000u)));
    *c = _mm512_fnmadd_ps(_mm512_set1_ps(bias), *s, z);
}

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
            for (int c = 0; c < 4; c++) sz16(sz + 32 * c, 8.0f, &sc[c], &zb[c]);
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

/* Few rows: no dequantized buffer. Each pair of inputs of 16 output rows becomes the bfloat16
 * numbers 128 + q (bits 0x4300 | q: exact), multiplied with x's pair through vdpbf16ps into a
 * per-group sum (exact products); per group, out += scale * sum + (zero - 136 * scale) * sum(x),
 * since (q - 8) * scale + zero = (128 + q) * scale + zero - 136 * scale.
 *
 * Inputs k and k + 1 of a tile are 64 contiguous bytes (32 each); interleaving them bytewise puts
 * each row's pair of nibbles side by side, and unpacking those bytes with 0x43 as the high byte
 * makes the bfloat16 pairs in place. The unpack works within 128-bit lanes, so a vector's 16 lanes
 * hold the tile's rows in this order (c = 0..3):
 *   V0 = rows 0-3, 8-11, 16-19, 24-27 (low nibbles)   V1 = rows 4-7, 12-15, 20-23, 28-31
 *   V2, V3 = the same + 32 (high nibbles)
 * Scales are permuted into that order per group, sums back into row order at the end. Up to
 * DJ rows of x share each unpacked pair (a 64-row tile is <= 48 KiB for K <= 1536: the next DJ
 * rows read it from cache). */
#define DJ 4

static inline __attribute__((always_inline)) __m512i pair_bytes(const uint8_t *src) {
#if defined(__AVX512VBMI__)
    const __m512i ileave = _mm512_set_epi8(
        63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16,
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    return _mm512_permutexvar_epi8(ileave, _mm512_loadu_si512((const void *)src));
#else /* the same bytes without VBMI: a0 b0 .. a7 b7 | a8 b8 .. | a16 b16 .. | a24 b24 .. */
    __m256i a = _mm256_loadu_si256((const __m256i *)src), b = _mm256_loadu_si256((const __m256i *)(src + 32));
    __m512i lo = _mm512_castsi256_si512(_mm256_unpacklo_epi8(a, b));
    __m512i hi = _mm512_castsi256_si512(_mm256_unpackhi_epi8(a, b));
    return _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi);
#endif
}

static inline __attribute__((always_inline)) void direct_rows(
    const uint16_t *x, int64_t ldx, const uint8_t *tile, const uint16_t *scale_zero, int64_t n,
    int64_t t, const float *xsum, int64_t groups, int64_t group, uint16_t *out, int64_t ldo,
    const int MJ) {
    const __m512i nib = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
    /* lanes of V0 / V1 from the scales of rows 0-15 (a) and 16-31 (b) */
    const __m512i v0 = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
    const __m512i v1 = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
    __m512 acc[DJ][4];
    for (int j = 0; j < MJ; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
    const int64_t pairs = group / 2;
    for (int64_t g = 0; g < groups; g++) {
        __m512 part[DJ][4];
        for (int j = 0; j < MJ; j++)
            for (int c = 0; c < 4; c++) part[j][c] = _mm512_setzero_ps();
        const uint8_t *src = tile + g * group * 32;
        for (int64_t p = 0; p < pairs; p++) {
            __m512i r = pair_bytes(src + p * 64);
            __m512i lo = _mm512_and_si512(r, nib), hi = _mm512_and_si512(_mm512_srli_epi16(r, 4), nib);
            __m512bh w[4] = {(__m512bh)_mm512_unpacklo_epi8(lo, c43), (__m512bh)_mm512_unpackhi_epi8(lo, c43),
                             (__m512bh)_mm512_unpacklo_epi8(hi, c43), (__m512bh)_mm512_unpackhi_epi8(hi, c43)};
            for (int j = 0; j < MJ; j++) {
                uint32_t pair;
                memcpy(&pair, x + j * ldx + g * group + 2 * p, sizeof pair);
                __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int c = 0; c < 4; c++) part[j][c] = _mm512_dpbf16_ps(part[j][c], w[c], xv);
            }
        }
        const uint16_t *sz = scale_zero + (g * n + t * 64) * 2;
        __m512 s[4], z[4];
        for (int q = 0; q < 4; q++) sz16(sz + 32 * q, 136.0f, &s[q], &z[q]); /* rows 16q.. */
        const __m512 vs[4] = {_mm512_permutex2var_ps(s[0], v0, s[1]), _mm512_permutex2var_ps(s[0], v1, s[1]),
                              _mm512_permutex2var_ps(s[2], v0, s[3]), _mm512_permutex2var_ps(s[2], v1, s[3])};
        const __m512 vc[4] = {_mm512_permutex2var_ps(z[0], v0, z[1]), _mm512_permutex2var_ps(z[0], v1, z[1]),
                              _mm512_permutex2var_ps(z[2], v0, z[3]), _mm512_permutex2var_ps(z[2], v1, z[3])};
        for (int j = 0; j < MJ; j++) {
            const __m512 xs = _mm512_set1_ps(xsum[j * groups + g]);
            for (int c = 0; c < 4; c++)
                acc[j][c] = _mm512_fmadd_ps(vc[c], xs, _mm512_fmadd_ps(part[j][c], vs[c], acc[j][c]));
        }
    }
    /* back to row order: rows 0-15 = V0 lanes 0-3, V1 lanes 0-3, V0 lanes 4-7, V1 lanes 4-7 */
    const __m512i r0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i r1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int j = 0; j < MJ; j++) {
        const __m512 r[4] = {_mm512_permutex2var_ps(acc[j][0], r0, acc[j][1]),
                             _mm512_permutex2var_ps(acc[j][0], r1, acc[j][1]),
                             _mm512_permutex2var_ps(acc[j][2], r0, acc[j][3]),
                             _mm512_permutex2var_ps(acc[j][2], r1, acc[j][3])};
        for (int q = 0; q < 4; q++)
            _mm256_storeu_si256((__m256i *)(out + j * ldo + 16 * q), (__m256i)_mm512_cvtneps_pbh(r[q]));
    }
}

/* out [m, n] (rows ldo apart) = x [m, k] (rows ldx apart) @ W.T, W in the layout above with n a
 * multiple of 64 (callers check; the packing pads rows to 16 only). Fewer than DIRECT_MAX_ROWS
 * rows take the direct path, more the dequantized tile. */
void int4pack_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed,
                        const uint16_t *scale_zero, uint16_t *out, int64_t ldo, int64_t m, int64_t n,
                        int64_t k, int64_t group) {
    const int64_t tiles = n / 64, groups = k / group;
    if (m < DIRECT_MAX_ROWS) {
        float *xsum = (float *)malloc((size_t)m * groups * sizeof(float));
        for (int64_t j = 0; j < m; j++)
            for (int64_t g = 0; g < groups; g++) {
                float acc = 0.0f;
                for (int64_t i = g * group; i < (g + 1) * group; i++) acc += bf16_to_f32(x[j * ldx + i]);
                xsum[j * groups + g] = acc;
            }
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *tile = packed + t * 64 * k / 2;
            for (int64_t j0 = 0; j0 < m; j0 += DJ) {
                const uint16_t *xr = x + j0 * ldx;
                const float *xs = xsum + j0 * groups;
                uint16_t *o = out + j0 * ldo + t * 64;
                switch (m - j0 < DJ ? m - j0 : DJ) { /* the row count as a constant */
                case 1: direct_rows(xr, ldx, tile, scale_zero, n, t, xs, groups, group, o, ldo, 1); break;
                case 2: direct_rows(xr, ldx, tile, scale_zero, n, t, xs, groups, group, o, ldo, 2); break;
                case 3: direct_rows(xr, ldx, tile, scale_zero, n, t, xs, groups, group, o, ldo, 3); break;
                default: direct_rows(xr, ldx, tile, scale_zero, n, t, xs, groups, group, o, ldo, 4);
                }
            }
        }
        free(xsum);
        return;
    }
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
