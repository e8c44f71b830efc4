/* W4A16 matrix multiplication for CPUs with AVX-512 BF16: out = x @ W.T with W stored as 4-bit
 * integers and multiplied with vdpbf16ps (pairs of bfloat16 products summed in float32).
 *
 * Built at run time by soarllm/kernels/cpu_native.py and called through ctypes from
 * soarllm/quant/w4a16.py, which also writes the layout (pack_soar4):
 *   packed [N, K/2] uint8: for output row n and the 64 inputs 64p .. 64p+63, 32 bytes where byte j
 *          holds input 64p+j in its low nibble and input 64p+32+j in its high nibble
 *   sm     [N, K/G, 2] float16: (scale, min) of each group of G inputs; w = q * scale + min
 *   x      [M, K] bfloat16, rows ldx elements apart; out [M, N] bfloat16, rows ldo apart
 * G is 32, 64 or 128; K a multiple of 64 and of G.
 *
 * Up to 4 rows of x (decode steps), exactly: a nibble q becomes the bfloat16 number 128 + q (its
 * bits are 0x4300 | q), so x . (128 + q) over a group of 32 is one vdpbf16ps with every product
 * exact; then sum over groups of scale * (that - 128 * sum(x)) + min * sum(x). Each 64-input block
 * of 4 output rows is expanded once and used for every x row.
 * More rows (prefill chunks, large batches): 4 output rows are dequantized once into a bfloat16
 * buffer (w = q * scale + min rounded to bfloat16, as the bfloat16 GEMM of the dequantized weight
 * multiplies it), then every block of 4 x rows runs over it with 16 accumulators in registers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

int int4_gemm_supported(void) { return 1; }

#define NT 4 /* output rows per tile */
#define MB 4 /* x rows per block */

/* A row's scales and mins per 32 inputs as float32 (a group of 64 or 128 repeats its pair), and
 * min - 128 * scale (the exact path's correction per unit of sum(x)). */
static inline void row_scales(const uint16_t *sm_row, int chunks, int G, float *s, float *m,
                              float *corr) {
    int c = 0;
    if (G == 32) { /* 16 (scale, min) pairs at a time */
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (; c + 16 <= chunks; c += 16) {
            __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm_row + 2 * c)));
            __m512 b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm_row + 2 * c + 16)));
            __m512 vs = _mm512_permutex2var_ps(a, even, b), vm = _mm512_permutex2var_ps(a, odd, b);
            _mm512_storeu_ps(s + c, vs);
            _mm512_storeu_ps(m + c, vm);
            _mm512_storeu_ps(corr + c, _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), vs, vm));
        }
    }
    const int shift = G == 32 ? 0 : G == 64 ? 1 : 2; /* chunk -> group without a division */
    for (; c < chunks; c++) {
        int g = c >> shift;
        s[c] = _cvtsh_ss(sm_row[2 * g]);
        m[c] = _cvtsh_ss(sm_row[2 * g + 1]);
        corr[c] = m[c] - 128.0f * s[c];
    }
}

static inline __m512bh load_bh(const uint16_t *p) {
    return (__m512bh)_mm512_loadu_si512((const void *)p);
}

/* 64 weights of a row as the bfloat16 numbers 128 + q: inputs 64p .. +31 in *lo, +32 .. +63 in *hi */
static inline void expand64(const uint8_t *row, int p, __m512bh *lo, __m512bh *hi) {
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + 32 * p)));
    const __m512i nib = _mm512_set1_epi16(0xF), base = _mm512_set1_epi16(0x4300);
    *lo = (__m512bh)_mm512_ternarylogic_epi32(b, nib, base, 0xEA); /* (b & nib) | base */
    *hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), base);
}

/* The same 64 weights dequantized to bfloat16 (w = q * scale + min per 32 inputs). */
static inline void dequant64(const uint8_t *row, int p, const float *s, const float *m,
                             uint16_t *dst) {
    for (int h = 0; h < 2; h++) { /* bytes 16h .. 16h+15: inputs 16h.. (low) and 32+16h.. (high) */
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 32 * p + 16 * h)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        __m512 wl = _mm512_fmadd_ps(lo, _mm512_set1_ps(s[2 * p]), _mm512_set1_ps(m[2 * p]));
        __m512 wh = _mm512_fmadd_ps(hi, _mm512_set1_ps(s[2 * p + 1]), _mm512_set1_ps(m[2 * p + 1]));
        __m256bh bl = _mm512_cvtneps_pbh(wl), bh = _mm512_cvtneps_pbh(wh);
        _mm256_storeu_si256((__m256i *)(dst + 64 * p + 16 * h), (__m256i)bl);
        _mm256_storeu_si256((__m256i *)(dst + 64 * p + 32 + 16 * h), (__m256i)bh);
    }
}

/* sum(x) over each 32 inputs of a bfloat16 row, in float32 */
static inline void chunk_sums(const uint16_t *x, int chunks, float *dst) {
    for (int c = 0; c < chunks; c++) {
        __m512 a = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(x + 32 * c)));
        __m512 b = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(x + 32 * c + 16)));
        dst[c] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
}

/* One tile of NT output rows for MJ (<= MB) rows of x, on the exact path. */
static inline __attribute__((always_inline)) void exact_tile(
    const uint16_t *x, int64_t ldx, const uint8_t *const *rows, float *const *s,
    float *const *corr, const float *xsum, uint16_t *out, int64_t ldo, int t, int N, int blocks,
    int chunks, const int MJ) {
    __m512 acc[NT][MB];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MJ; j++) acc[i][j] = _mm512_setzero_ps();
    for (int p = 0; p < blocks; p++) {
        for (int i = 0; i < NT; i++) {
            __m512bh lo, hi;
            expand64(rows[i], p, &lo, &hi);
            __m512 sl = _mm512_set1_ps(s[i][2 * p]), sh = _mm512_set1_ps(s[i][2 * p + 1]);
            for (int j = 0; j < MJ; j++) {
                const uint16_t *xr = x + (size_t)j * ldx + 64 * p;
                __m512 dl = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, load_bh(xr));
                __m512 dh = _mm512_dpbf16_ps(_mm512_setzero_ps(), hi, load_bh(xr + 32));
                acc[i][j] = _mm512_fmadd_ps(dh, sh, _mm512_fmadd_ps(dl, sl, acc[i][j]));
            }
        }
    }
    for (int j = 0; j < MJ; j++) {
        const float *xs = xsum + (size_t)j * chunks;
        for (int i = 0; i < NT && t * NT + i < N; i++) {
            __m512 c = acc[i][j]; /* + sum over chunks of corr * sum(x), 16 chunks at a time */
            for (int k = 0; k < chunks; k += 16) {
                __mmask16 k16 = chunks - k >= 16 ? (__mmask16)0xFFFF
                                                 : (__mmask16)((1u << (chunks - k)) - 1u);
                c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k16, corr[i] + k),
                                    _mm512_maskz_loadu_ps(k16, xs + k), c);
            }
            out[(size_t)j * ldo + t * NT + i] = f32_to_bf16(_mm512_reduce_add_ps(c));
        }
    }
}

void int4_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *sm,
                    uint16_t *out, int64_t ldo, int M, int N, int K, int G) {
    const int chunks = K / 32, blocks = K / 64, groups = K / G;
    const int tiles = (N + NT - 1) / NT;
    const int exact = M <= MB;
    float *xsum = NULL;
    if (exact) {
        xsum = (float *)malloc((size_t)M * chunks * sizeof(float));
        for (int j = 0; j < M; j++) chunk_sums(x + (size_t)j * ldx, chunks, xsum + (size_t)j * chunks);
    }
#pragma omp parallel
    {
        uint16_t *wbuf = exact ? NULL : (uint16_t *)aligned_alloc(64, (size_t)NT * K * 2);
        float *sc = (float *)malloc((size_t)NT * chunks * 3 * sizeof(float));
#pragma omp for schedule(static)
        for (int t = 0; t < tiles; t++) {
            const uint8_t *rows[NT];
            float *s[NT], *m[NT], *corr[NT];
            for (int i = 0; i < NT; i++) {
                int n = t * NT + i < N ? t * NT + i : N - 1; /* a short last tile repeats its row */
                rows[i] = packed + (size_t)n * (K / 2);
                s[i] = sc + (size_t)i * chunks * 3;
                m[i] = s[i] + chunks;
                corr[i] = m[i] + chunks;
                row_scales(sm + (size_t)n * groups * 2, chunks, G, s[i], m[i], corr[i]);
            }
            if (exact) {
                switch (M) { /* the row count as a constant: accumulators stay in registers */
                case 1: exact_tile(x, ldx, rows, s, corr, xsum, out, ldo, t, N, blocks, chunks, 1); break;
                case 2: exact_tile(x, ldx, rows, s, corr, xsum, out, ldo, t, N, blocks, chunks, 2); break;
                case 3: exact_tile(x, ldx, rows, s, corr, xsum, out, ldo, t, N, blocks, chunks, 3); break;
                default: exact_tile(x, ldx, rows, s, corr, xsum, out, ldo, t, N, blocks, chunks, 4);
                }
                continue;
            }
            for (int i = 0; i < NT; i++)
                for (int p = 0; p < blocks; p++) dequant64(rows[i], p, s[i], m[i], wbuf + (size_t)i * K);
            for (int m0 = 0; m0 < M; m0 += MB) {
                const int mb = M - m0 < MB ? M - m0 : MB;
                const uint16_t *xr[MB];
                for (int j = 0; j < MB; j++) xr[j] = x + (size_t)(m0 + (j < mb ? j : 0)) * ldx;
                __m512 acc[NT][MB];
                for (int i = 0; i < NT; i++)
                    for (int j = 0; j < MB; j++) acc[i][j] = _mm512_setzero_ps();
                for (int c = 0; c < chunks; c++) {
                    __m512bh w[NT];
                    for (int i = 0; i < NT; i++) w[i] = load_bh(wbuf + (size_t)i * K + 32 * c);
                    for (int j = 0; j < MB; j++) {
                        __m512bh xv = load_bh(xr[j] + 32 * c);
                        for (int i = 0; i < NT; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], xv);
                    }
                }
                for (int j = 0; j < mb; j++)
                    for (int i = 0; i < NT && t * NT + i < N; i++)
                        out[(size_t)(m0 + j) * ldo + t * NT + i] =
                            f32_to_bf16(_mm512_reduce_add_ps(acc[i][j]));
            }
        }
        free(wbuf);
        free(sc);
    }
    free(xsum);
}

/* The whole weight as bfloat16 [N, K] (for a GEMM over many rows). */
void int4_dequant_bf16(const uint8_t *packed, const uint16_t *sm, uint16_t *out, int N, int K,
                       int G) {
    const int chunks = K / 32, blocks = K / 64, groups = K / G;
#pragma omp parallel
    {
        float *sc = (float *)malloc((size_t)chunks * 3 * sizeof(float));
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            row_scales(sm + (size_t)n * groups * 2, chunks, G, sc, sc + chunks, sc + 2 * chunks);
            for (int p = 0; p < blocks; p++)
                dequant64(packed + (size_t)n * (K / 2), p, sc, sc + chunks, out + (size_t)n * K);
        }
        free(sc);
    }
}

#else
/* Without AVX-512 BF16 the layer keeps PyTorch's int4 kernel (quant/w4a16.py asks first). */
int int4_gemm_supported(void) { return 0; }
void int4_gemm_bf16(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *sm,
                    uint16_t *out, int64_t ldo, int M, int N, int K, int G) {
    (void)x, (void)ldx, (void)packed, (void)sm, (void)out, (void)ldo, (void)M, (void)N, (void)K,
        (void)G;
}
void int4_dequant_bf16(const uint8_t *packed, const uint16_t *sm, uint16_t *out, int N, int K,
                       int G) {
    (void)packed, (void)sm, (void)out, (void)N, (void)K, (void)G;
}
#endif
