/* W4A8 and W8A8 matrix multiplication for CPUs with AVX-512 VNNI: out = x @ W.T, 4-bit or 8-bit
 * unsigned weights multiplied with the activations quantized to int8 per 32 inputs (vpdpbusd: 64
 * byte products summed exactly into 16 int32 lanes per instruction, twice the products per
 * instruction of vdpbf16ps). The arithmetic of llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot
 * products, in another layout.
 *
 * Built at run time by soarllm/kernels/cpu_native.py and called through ctypes from
 * soarllm/quant/vnni.py (and from C++ by kernels/csrc/vnni_gemm_op.cpp), which also writes the
 * layouts (pack_vnni4, pack_vnni8):
 *   4-bit  [N/16, K/32, 4, 64] uint8: output rows in tiles of 16, inputs in chunks of 32; in chunk
 *          g of tile t, vector z (0..3) holds for each row l (lanes 4l .. 4l+3) the inputs
 *          32g + 4z + e (low nibbles) and 32g + 16 + 4z + e (high nibbles), e = 0..3: the operand
 *          layout of vpdpbusd with the 16 output rows in its 16 lanes
 *   8-bit  [N/16, K/32, 8, 64] uint8: the same with vector z (0..7) holding inputs 32g + 4z + e
 *   sm     [N/16, K/32, 2, 16] float16: per tile and chunk the 16 rows' scales, then their mins
 *          (w = q * scale + min)
 *   x      [M, K] bfloat16, rows ldx elements apart; out [M, N] bfloat16, rows ldo apart
 * N a multiple of 16 in the layout (the caller pads), K a multiple of 32.
 *
 * Each row of x is first quantized per chunk of 32 inputs: xs = max|x| / 127, xq = round(x / xs),
 * and then out = sum over chunks of scale * xs * (q . xq) + min * xs * sum(xq): exact integer sums
 * inside a chunk, float32 across chunks, in the same order for every row count (a row's result
 * does not depend on its batch).
 *
 * CPUs with AVX2 but not AVX-512 VNNI (most AMD Zen 2/3 and older Intel server parts, many cloud
 * VMs) run the same layouts 8 rows per 256-bit half with vpmaddubsw, as llama.cpp's AVX2 dot
 * products do: unsigned 4-bit weights times signed int8 activations in pairs, summed in int16
 * over a chunk (at most 4 x 2 x 2 x 15 x 127 = 30480: no saturation), then widened by vpmaddwd;
 * 8-bit weights are taken as signed q - 128 (|w| <= 128: a pair sums to at most 32512, widened
 * at once) through vpsignb, the 128 folded back into the mins. Same integer sums, so the same results up to the
 * float rounding of the chunk scaling.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#define INT8_GEMM_ISA 1 /* vnni_gemm_supported(): 1 AVX-512 VNNI, 2 AVX2 */
#ifndef MB
#define MB 4 /* rows of x per block */
#endif
#ifndef NT
#define NT 4 /* tiles of 16 output rows per block */
#endif

/* 16 floats to bfloat16, rounded to nearest even as PyTorch rounds; NaN stays a quiet NaN. */
static inline __m256i to_bf16(__m512 v) {
    __m512i x = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    x = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    x = _mm512_mask_mov_epi32(x, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(x);
}

/* Row x (bfloat16, k inputs) quantized per 32 inputs: xq, the scale xs and xs * sum(xq). */
static void quantize_row(const uint16_t *x, int k, int8_t *xq, float *xs, float *xmb) {
    for (int c = 0; c < k / 32; c++) {
        __m512i raw = _mm512_loadu_si512((const void *)(x + 32 * c));
        __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
        __m512 b = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
        __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + 32 * c), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + 32 * c + 16), _mm512_cvtsepi32_epi8(qb));
        xs[c] = scale;
        xmb[c] = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* NT tiles (16 NT output rows: weights w[v] of BITS bits, scales s[v]) for MJ <= MB quantized
 * rows: per 4 inputs of a chunk, each tile's nibbles unpacked once and multiplied with every row's 4 bytes
 * (broadcast once per row for all the tiles); the integer sums of each chunk then scaled into
 * float32 accumulators. */
static inline __attribute__((always_inline)) void tile_block(
    const int8_t *xq, const float *xs, const float *xmb, int k, const uint8_t *const *w,
    const uint16_t *const *s, uint16_t *out, int64_t ldo, const int *valid, const int MJ,
    const int BITS) {
    const int chunks = k / 32, chunk_bytes = 64 * BITS; /* 32 inputs x 16 rows */
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 facc[MB][NT];
    for (int j = 0; j < MJ; j++)
        for (int v = 0; v < NT; v++) facc[j][v] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; c++) {
        __m512i iacc[MB][NT];
        for (int j = 0; j < MJ; j++)
            for (int v = 0; v < NT; v++) iacc[j][v] = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            __m512i xl[MB], xh[MB];
            for (int j = 0; j < MJ; j++) {
                const int8_t *xr = xq + (size_t)j * k + 32 * c + 4 * z;
                int32_t lo, hi;
                memcpy(&lo, xr, 4);
                memcpy(&hi, xr + 16, 4);
                xl[j] = _mm512_set1_epi32(lo);
                xh[j] = _mm512_set1_epi32(hi);
            }
            for (int v = 0; v < NT; v++) {
                const uint8_t *wz = w[v] + (size_t)c * chunk_bytes + 64 * z;
                __m512i l, h;
                if (BITS == 4) {
                    __m512i p = _mm512_loadu_si512((const void *)wz);
                    l = _mm512_and_si512(p, nib);
                    h = _mm512_and_si512(_mm512_srli_epi16(p, 4), nib);
                } else { /* inputs 4z.. in vector z, 16 + 4z.. in vector z + 4 */
                    l = _mm512_loadu_si512((const void *)wz);
                    h = _mm512_loadu_si512((const void *)(wz + 256));
                }
                for (int j = 0; j < MJ; j++)
                    iacc[j][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iacc[j][v], l, xl[j]), h, xh[j]);
            }
        }
        for (int v = 0; v < NT; v++) {
            const uint16_t *sc = s[v] + (size_t)c * 32;
            __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
            __m512 wm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16)));
            for (int j = 0; j < MJ; j++) {
                __m512 a = _mm512_set1_ps(xs[(size_t)j * chunks + c]);
                __m512 b = _mm512_set1_ps(xmb[(size_t)j * chunks + c]);
                facc[j][v] = _mm512_fmadd_ps(wm, b, _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[j][v]),
                                                                   _mm512_mul_ps(ws, a), facc[j][v]));
            }
        }
    }
    for (int v = 0; v < NT; v++) {
        const __mmask16 m = (__mmask16)(valid[v] >= 16 ? 0xFFFF : valid[v] <= 0 ? 0 : (1u << valid[v]) - 1u);
        for (int j = 0; j < MJ; j++) _mm256_mask_storeu_epi16(out + (size_t)j * ldo + 16 * v, m, to_bf16(facc[j][v]));
    }
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define INT8_GEMM_ISA 2
#ifndef MB
#define MB 2 /* rows of x per block: 2 rows x 2 tiles x 2 halves of int16 sums + operands fit */
#endif
#ifndef NT
#define NT 2 /* in the 16 ymm registers */
#endif

/* 8 floats to bfloat16, rounded to nearest even as PyTorch rounds; NaN stays a quiet NaN. */
static inline __m128i to_bf16(__m256 v) {
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    x = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    x = _mm256_blendv_epi8(x, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

/* Row x (bfloat16, k inputs) quantized per 32 inputs: xq, the scale xs and xs * sum(xq). */
static void quantize_row(const uint16_t *x, int k, int8_t *xq, float *xs, float *xmb) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int c = 0; c < k / 32; c++) {
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(x + 32 * c + 8 * i));
            v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
        }
        float amax = hmax8(m);
        float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
        /* saturating packs work within 128-bit lanes: the dwords come out as q0[0:4] q1[0:4]
         * q2[0:4] q3[0:4] q0[4:8] ..., put back in input order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + 32 * c), p);
        xs[c] = scale;
        xmb[c] = scale * (float)hsum8(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    }
}

/* As the AVX-512 tile_block above, each 64-byte vector of a tile taken as two halves of 8 rows
 * (lanes 4l .. 4l+3 of half h: row 8h + l). */
static inline __attribute__((always_inline)) void tile_block(
    const int8_t *xq, const float *xs, const float *xmb, int k, const uint8_t *const *w,
    const uint16_t *const *s, uint16_t *out, int64_t ldo, const int *valid, const int MJ,
    const int BITS) {
    const int chunks = k / 32, chunk_bytes = 64 * BITS;
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 facc[MB][NT][2];
    for (int j = 0; j < MJ; j++)
        for (int v = 0; v < NT; v++) facc[j][v][0] = facc[j][v][1] = _mm256_setzero_ps();
    for (int c = 0; c < chunks; c++) {
        __m256i iacc[MB][NT][2]; /* 4-bit: int16 pair sums; 8-bit: int32 row sums */
        for (int j = 0; j < MJ; j++)
            for (int v = 0; v < NT; v++) iacc[j][v][0] = iacc[j][v][1] = _mm256_setzero_si256();
        for (int z = 0; z < 4; z++) {
            __m256i xl[MB], xh[MB];
            for (int j = 0; j < MJ; j++) {
                const int8_t *xr = xq + (size_t)j * k + 32 * c + 4 * z;
                int32_t lo, hi;
                memcpy(&lo, xr, 4);
                memcpy(&hi, xr + 16, 4);
                xl[j] = _mm256_set1_epi32(lo);
                xh[j] = _mm256_set1_epi32(hi);
            }
            for (int v = 0; v < NT; v++)
                for (int h = 0; h < 2; h++) {
                    const uint8_t *wz = w[v] + (size_t)c * chunk_bytes + 64 * z + 32 * h;
                    if (BITS == 4) {
                        __m256i p = _mm256_loadu_si256((const __m256i *)wz);
                        __m256i l = _mm256_and_si256(p, nib), u = _mm256_and_si256(_mm256_srli_epi16(p, 4), nib);
                        for (int j = 0; j < MJ; j++)
                            iacc[j][v][h] = _mm256_add_epi16(iacc[j][v][h],
                                _mm256_add_epi16(_mm256_maddubs_epi16(l, xl[j]), _mm256_maddubs_epi16(u, xh[j])));
                    } else { /* inputs 4z.. in vector z, 16 + 4z.. in vector z + 4; q - 128 signed */
                        __m256i l = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wz), flip);
                        __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wz + 256)), flip);
                        __m256i la = _mm256_abs_epi8(l), ua = _mm256_abs_epi8(u);
                        for (int j = 0; j < MJ; j++) {
                            __m256i pl = _mm256_maddubs_epi16(la, _mm256_sign_epi8(xl[j], l));
                            __m256i pu = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(xh[j], u));
                            iacc[j][v][h] = _mm256_add_epi32(iacc[j][v][h], _mm256_add_epi32(
                                _mm256_madd_epi16(pl, ones), _mm256_madd_epi16(pu, ones)));
                        }
                    }
                }
        }
        for (int v = 0; v < NT; v++)
            for (int h = 0; h < 2; h++) {
                const uint16_t *sc = s[v] + (size_t)c * 32 + 8 * h;
                __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
                __m256 wm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16)));
                if (BITS == 8) wm = _mm256_fmadd_ps(_mm256_set1_ps(128.0f), ws, wm); /* q = (q - 128) + 128 */
                for (int j = 0; j < MJ; j++) {
                    __m256 a = _mm256_set1_ps(xs[(size_t)j * chunks + c]);
                    __m256 b = _mm256_set1_ps(xmb[(size_t)j * chunks + c]);
                    __m256i dots = BITS == 4 ? _mm256_madd_epi16(iacc[j][v][h], ones) : iacc[j][v][h];
                    facc[j][v][h] = _mm256_fmadd_ps(wm, b, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots),
                                                                           _mm256_mul_ps(ws, a), facc[j][v][h]));
                }
            }
    }
    for (int v = 0; v < NT; v++)
        for (int j = 0; j < MJ; j++) {
            uint16_t row[16];
            _mm_storeu_si128((__m128i *)row, to_bf16(facc[j][v][0]));
            _mm_storeu_si128((__m128i *)(row + 8), to_bf16(facc[j][v][1]));
            const int n = valid[v] >= 16 ? 16 : valid[v] <= 0 ? 0 : valid[v];
            memcpy(out + (size_t)j * ldo + 16 * v, row, (size_t)n * sizeof(uint16_t));
        }
}
#endif

#if defined(INT8_GEMM_ISA)
int vnni_gemm_supported(void) { return INT8_GEMM_ISA; }

/* One call's shared state: the quantized rows of x and how the work is split. */
struct plan {
    int8_t *xq;
    float *xs, *xmb;
    int chunks, tiles, blocks, groups, per_group;
};

static int plan_init(struct plan *p, int M, int N, int K) {
    p->chunks = K / 32, p->tiles = (N + 15) / 16, p->blocks = (p->tiles + NT - 1) / NT;
    p->xq = (int8_t *)aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64 + 64);
    p->xs = (float *)malloc(((size_t)M * p->chunks * 2 + 1) * sizeof(float));
    if (p->xq == NULL || p->xs == NULL) {
        free(p->xq), free(p->xs);
        return -1;
    }
    p->xmb = p->xs + (size_t)M * p->chunks;
    /* Work items: (block of NT tiles, group of rows). Rows are split into groups only where the
     * blocks alone are too few to share evenly between the threads; consecutive items share a
     * block, so each thread reads mostly its own tiles. */
    const int threads = omp_get_max_threads();
    p->groups = 1;
    while (p->blocks * p->groups < 4 * threads && (M + 2 * p->groups - 1) / (2 * p->groups) >= 2 * MB)
        p->groups *= 2;
    /* A count of items the threads cannot share evenly leaves some idle at the end (9 blocks of
     * a 576-row projection over 2 threads: 5 / 4, a tenth of the call): split the rows further
     * while that leaves more than 3% idle and the groups keep at least MB rows. */
    for (;;) {
        const int items = p->blocks * p->groups, most = (items + threads - 1) / threads;
        if (100 * items >= 97 * most * threads || (M + 2 * p->groups - 1) / (2 * p->groups) < MB)
            break;
        p->groups *= 2;
    }
    p->per_group = ((M + p->groups - 1) / p->groups + MB - 1) / MB * MB;
    return 0;
}

/* The work of one thread of the parallel region (orphaned worksharing loops): inlined into each
 * exported function's own region, so BITS is a constant there. */
static inline __attribute__((always_inline)) void gemm_items(
    const struct plan *pl, const uint16_t *x, int64_t ldx, const uint8_t *packed,
    const uint16_t *sm, uint16_t *out, int64_t ldo, int M, int N, int K, const int BITS) {
    const int chunk_bytes = 64 * BITS, chunks = pl->chunks, tiles = pl->tiles;
    const int groups = pl->groups, per_group = pl->per_group;
    int8_t *xq = pl->xq;
    float *xs = pl->xs, *xmb = pl->xmb;
#pragma omp for schedule(static)
    for (int j = 0; j < M; j++)
        quantize_row(x + (size_t)j * ldx, K, xq + (size_t)j * K, xs + (size_t)j * chunks,
                     xmb + (size_t)j * chunks);
#pragma omp for schedule(static)
    for (int item = 0; item < pl->blocks * groups; item++) {
        const int p = item / groups, rg = item % groups;
        const uint8_t *w[NT];
        const uint16_t *s[NT];
        int valid[NT];
        for (int v = 0; v < NT; v++) { /* a short last block repeats its first tile, unstored */
            const int t = NT * p + v < tiles ? NT * p + v : NT * p;
            w[v] = packed + (size_t)t * chunks * chunk_bytes;
            s[v] = sm + (size_t)t * chunks * 32;
            valid[v] = NT * p + v < tiles ? N - 16 * t : 0;
        }
        const int r0 = rg * per_group, r1 = r0 + per_group < M ? r0 + per_group : M;
        for (int m0 = r0; m0 < r1; m0 += MB) {
            const int mj = r1 - m0 < MB ? r1 - m0 : MB;
            const int8_t *xr = xq + (size_t)m0 * K;
            const float *xsr = xs + (size_t)m0 * chunks, *xmr = xmb + (size_t)m0 * chunks;
            uint16_t *o = out + (size_t)m0 * ldo + 16 * NT * p;
#define ROWS(r)                                                                                    \
    case r:                                                                                        \
        tile_block(xr, xsr, xmr, K, w, s, o, ldo, valid, r < MB ? r : MB, BITS);                   \
        break;
            switch (mj) { /* the row count as a constant: accumulators stay in registers */
                ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7)
            default: tile_block(xr, xsr, xmr, K, w, s, o, ldo, valid, MB, BITS);
            }
#undef ROWS
        }
    }
}

/* Each width its own parallel region (GCC outlines a region once, before inlining: one region
 * shared by both widths would test BITS at run time in the inner loops). */
#define DEFINE_GEMM(name, bits)                                                                    \
    void name(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *sm,          \
              uint16_t *out, int64_t ldo, int M, int N, int K) {                                   \
        struct plan pl;                                                                            \
        if (M <= 0 || plan_init(&pl, M, N, K) != 0) return;                                          \
        _Pragma("omp parallel") gemm_items(&pl, x, ldx, packed, sm, out, ldo, M, N, K, bits);      \
        free(pl.xq);                                                                               \
        free(pl.xs);                                                                               \
    }

DEFINE_GEMM(int4_vnni_gemm, 4)
DEFINE_GEMM(int8_vnni_gemm, 8)

#else
/* Without AVX-512 VNNI or AVX2 the layer keeps the bfloat16 kernels (quant/w4a16.py asks first). */
int vnni_gemm_supported(void) { return 0; }
void int4_vnni_gemm(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *sm,
                    uint16_t *out, int64_t ldo, int M, int N, int K) {
    (void)x, (void)ldx, (void)packed, (void)sm, (void)out, (void)ldo, (void)M, (void)N, (void)K;
}
void int8_vnni_gemm(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *sm,
                    uint16_t *out, int64_t ldo, int M, int N, int K) {
    (void)x, (void)ldx, (void)packed, (void)sm, (void)out, (void)ldo, (void)M, (void)N, (void)K;
}
#endif
