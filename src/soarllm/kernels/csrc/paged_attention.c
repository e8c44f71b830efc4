/* Paged decode attention for CPUs: each query row reads its keys and values in place from the paged
 * KV cache through its block table (no gathered copy), with an online softmax in float32.
 *
 * Built at run time by soarllm/kernels/cpu_native.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes from soarllm/kernels/cpu_attention.py, or from C++ by kernels/csrc/attention_op.cpp
 * (compiled decode steps). The OpenMP runtime is the one PyTorch
 * already loaded (same soname), so this kernel shares PyTorch's threads instead of adding its own.
 *
 * Layouts (all contiguous):
 *   q           [n, hq, d], rows q_stride elements apart   float32 or bfloat16
 *   out         [n, hq, d] contiguous, q's type
 *   k/v planes  [num_blocks, block_size, hkv, stride]  float32, bfloat16, or int8 rows of d values
 *               followed by the 4 bytes of their float32 scale (stride = d + 4; value = q * scale)
 *   block_table [n, bt_stride] int64, seq_lens [n] int64: row r attends to positions
 *               [max(0, seq_lens[r] - window), seq_lens[r]) (window <= 0: from 0)
 *   k_new/v_new [n, hkv, d], rows k/v_new_stride elements apart, io type; slots [n] int64: when
 *               k_new is not NULL, row r's new key and value are first stored at slot slots[r]
 *               (float caches only: an int8 cache is written by the caller, which quantizes)
 * Scores are q . k * scale, then softcap * tanh(score / softcap) when softcap > 0.
 * Work is split over (row, KV head) pairs, and where those are too few for the threads (batch-1
 * decode), over splits of each pair's keys whose partial softmaxes are merged at the end.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

enum { F32 = 0, BF16 = 1, I8 = 2 };

#define MAX_D 256
#define MAX_G 32
#define CHUNK 32
#define MIN_SPLIT 64 /* fewest keys worth a split of their own */
#define MAX_SPLITS 64

/* exp(x) for the softmax's x = score - running max <= 0, vectorizable (the C library's expf is a
 * call per element): Cephes' range reduction x = n ln2 + r and degree-6 polynomial, ~1 ulp; below
 * -87 (and -inf, the first chunk's correction) it is 0. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return x < -87.0f ? 0.0f : p * two_n.f;
}

/* One cached token-head row as float32. */
static inline void load_row(const void *base, int64_t index, int stride, int d, int type, float *dst) {
    if (type == F32) {
        const float *src = (const float *)base + index * stride;
        memcpy(dst, src, (size_t)d * sizeof(float));
    } else if (type == BF16) {
        const uint16_t *src = (const uint16_t *)base + index * stride;
#pragma omp simd
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        const int8_t *src = (const int8_t *)base + index * stride;
        float scale;
        memcpy(&scale, src + d, sizeof scale);
#pragma omp simd
        for (int i = 0; i < d; i++) dst[i] = (float)src[i] * scale;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PATH 1

/* exp of 16 values <= 0 (scores minus their running max): Cephes' reduction and polynomial as in
 * exp_nonpositive, the power of two applied with vscalefps; below -87 (and -inf) 0. */
static inline __m512 exp16_nonpositive(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

/* The 16 sums of 16 vectors, as one vector (element c = the sum of v[c]), by a transposing tree of
 * adds instead of 16 horizontal reductions. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], x[4];
    /* w[k]: the 256-bit halves of v[2k] added (lanes 0-1), then those of v[2k+1] (lanes 2-3) */
    for (int k = 0; k < 8; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    /* x[m]: 128-bit lane L holds four partial sums of vector 4m + L */
    for (int m = 0; m < 4; m++)
        x[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0xDD));
    __m512 y01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    __m512 y23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    /* z: element 4L + e is the sum of vector 4e + L */
    __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y01, y23, 0x44), _mm512_shuffle_ps(y01, y23, 0xEE));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, z);
}

static inline __m512 bf16x16_to_f32(const uint16_t *src) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* The cache offsets of keys t0 .. t0+15 (fewer at the end) of head h, walking the block table from
 * (*bi, *bo); returns how many. */
static inline int next_slots(const int64_t *block_table, int64_t *bi, int64_t *bo, int64_t t0,
                             int64_t seq_len, int h, int hkv, int stride, int block_size,
                             int64_t slot[16]) {
    int n = t0 >= seq_len ? 0 : (int)((seq_len - t0) < 16 ? (seq_len - t0) : 16);
    for (int c = 0; c < n; c++) {
        slot[c] = ((block_table[*bi] * block_size + *bo) * hkv + h) * stride;
        if (++*bo == block_size) *bo = 0, ++*bi;
    }
    return n;
}

#define STAGE_MAX 1024 /* elements of one key's rows staged per call, at most */
#ifndef PREFETCH_CHUNKS
#define PREFETCH_CHUNKS 4
#endif

static inline void prefetch_rows(const uint16_t *k_cache, const uint16_t *v_cache,
                                 const int64_t *slot, int n, int span) {
    for (int c = 0; c < n; c++)
        for (int w = 0; w < span; w += 32) {
            _mm_prefetch((const char *)(k_cache + slot[c] + w), _MM_HINT_T0);
            _mm_prefetch((const char *)(v_cache + slot[c] + w), _MM_HINT_T0);
        }
}

/* attend() for bfloat16 queries over a bfloat16 cache with d a multiple of 32 (every head size in
 * use), for the g query heads of each of the nh KV heads h .. h+nh-1 (nh * g <= MAX_G): q . k with
 * vdpbf16ps (bfloat16 pairs multiplied exactly, summed in float32, as the float32 path computes
 * them), 16 keys' scores at a time through a vectorized softmax, and the values accumulated in
 * float32. Several KV heads in one call read each key's rows of those heads side by side (one
 * stretch of memory) instead of a third of it per call. */
static inline __attribute__((always_inline)) void attend_bf16(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
    const int64_t *block_table, int64_t start, int64_t seq_len, uint16_t *out, float *part, int h,
    int nh, int g, int hkv, int d, int stride, int block_size, float scale, float softcap) {
    __m512bh qv[MAX_G][MAX_D / 32];
    __m512 acc[MAX_G][MAX_D / 16];
    float m[MAX_G], l[MAX_G];
    float s[MAX_G][16];
    const int nw = d / 32, nv = d / 16, G = nh * g;
    for (int j = 0; j < G; j++) {
        for (int w = 0; w < nw; w++)
            qv[j][w] = (__m512bh)_mm512_loadu_si512((const void *)(q + (int64_t)j * d + w * 32));
        for (int w = 0; w < nv; w++) acc[j][w] = _mm512_setzero_ps();
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    int64_t bi = start / block_size, bo = start % block_size;
    int64_t slot[16], ahead[16];
    const int span = (nh - 1) * stride + d; /* elements of one key's rows of the nh heads */
    /* Several KV heads per call (large batches): each chunk's key and value rows are first
     * copied into two local buffers, a run of independent loads that keeps many cache misses in
     * flight at once (walking them inside the arithmetic leaves too few), and the arithmetic
     * reads them from L1. One head (batch-1 decode, split keys) reads the cache in place. */
    uint16_t kbuf[16 * STAGE_MAX], vbuf[16 * STAGE_MAX];
    const int stage = nh > 1 && span <= STAGE_MAX;
    const uint16_t *kb = stage ? kbuf : k_cache, *vb = stage ? vbuf : v_cache;
    int64_t off[16]; /* key c's row: kb + off[c] */
    /* The cache is read once per step, from memory, not from the CPU's caches: a second walker
     * PREFETCH_CHUNKS chunks ahead asks for those keys' rows, so their loads overlap the arithmetic
     * of the chunks before them. */
    int64_t pbi = bi, pbo = bo;
    for (int k = 0; k < PREFETCH_CHUNKS; k++)
        prefetch_rows(k_cache, v_cache, ahead,
                      next_slots(block_table, &pbi, &pbo, start + 16 * k, seq_len, h, hkv, stride,
                                 block_size, ahead), span);
    for (int64_t t0 = start; t0 < seq_len; t0 += 16) {
        const int n = next_slots(block_table, &bi, &bo, t0, seq_len, h, hkv, stride, block_size, slot);
        if (stage)
            for (int c = 0; c < n; c++) {
                memcpy(kbuf + c * span, k_cache + slot[c], (size_t)span * 2);
                memcpy(vbuf + c * span, v_cache + slot[c], (size_t)span * 2);
                off[c] = (int64_t)c * span;
            }
        else
            for (int c = 0; c < n; c++) off[c] = slot[c];
        prefetch_rows(k_cache, v_cache, ahead,
                      next_slots(block_table, &pbi, &pbo, t0 + 16 * PREFETCH_CHUNKS, seq_len, h,
                                 hkv, stride, block_size, ahead), span);
        for (int j = 0; j < G; j++) {
            const int64_t head = (int64_t)(j / g) * stride;
            __m512 dots[16];
            for (int c = 0; c < 16; c++) {
                __m512 dot = _mm512_setzero_ps();
                if (c < n) {
                    const uint16_t *kr = kb + off[c] + head;
                    for (int w = 0; w < nw; w++)
                        dot = _mm512_dpbf16_ps(
                            dot, qv[j][w], (__m512bh)_mm512_loadu_si512((const void *)(kr + w * 32)));
                }
                dots[c] = dot;
            }
            _mm512_storeu_ps(s[j], _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
        }
        __mmask16 valid = (__mmask16)((1u << n) - 1u);
        for (int j = 0; j < G; j++) {
            if (softcap > 0.0f)
                for (int c = 0; c < n; c++) s[j][c] = softcap * tanhf(s[j][c] / softcap);
            __m512 sc = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, s[j]);
            float cmax = _mm512_reduce_max_ps(sc);
            float mnew = m[j] > cmax ? m[j] : cmax;
            float corr = exp_nonpositive(m[j] - mnew);
            m[j] = mnew;
            __m512 pj = exp16_nonpositive(_mm512_sub_ps(sc, _mm512_set1_ps(mnew)));
            l[j] = l[j] * corr + _mm512_reduce_add_ps(pj);
            __m512 cv = _mm512_set1_ps(corr);
            for (int w = 0; w < nv; w++) acc[j][w] = _mm512_mul_ps(acc[j][w], cv);
            _mm512_storeu_ps(s[j], pj);
        }
        /* The values: a tile of up to four query heads x four 16-value stretches held in
         * registers over the chunk's keys (up to 16 independent accumulations, so the FMAs
         * overlap instead of waiting on each other), each key's stretch converted once. */
        for (int hh = 0; hh < nh; hh++) {
            const uint16_t *vh = vb + (int64_t)hh * stride;
            for (int j0 = hh * g; j0 < (hh + 1) * g; j0 += 4) {
                const int gj = (hh + 1) * g - j0 < 4 ? (hh + 1) * g - j0 : 4;
                for (int w0 = 0; w0 < nv; w0 += 4) {
                    const int gw = nv - w0 < 4 ? nv - w0 : 4;
                    __m512 a[4][4];
                    for (int jj = 0; jj < 4; jj++)
                        for (int ww = 0; ww < 4; ww++)
                            a[jj][ww] = jj < gj && ww < gw ? acc[j0 + jj][w0 + ww] : _mm512_setzero_ps();
                    for (int c = 0; c < n; c++) {
                        const uint16_t *vr = vh + off[c] + w0 * 16;
                        __m512 p[4];
                        for (int jj = 0; jj < 4; jj++)
                            p[jj] = _mm512_set1_ps(jj < gj ? s[j0 + jj][c] : 0.0f);
                        for (int ww = 0; ww < 4; ww++) {
                            if (ww >= gw) break;
                            __m512 vf = bf16x16_to_f32(vr + ww * 16);
                            for (int jj = 0; jj < 4; jj++)
                                a[jj][ww] = _mm512_fmadd_ps(p[jj], vf, a[jj][ww]);
                        }
                    }
                    for (int jj = 0; jj < gj; jj++)
                        for (int ww = 0; ww < gw; ww++) acc[j0 + jj][w0 + ww] = a[jj][ww];
                }
            }
        }
    }
    if (part != NULL) { /* a split of the keys: its (max, sum, unnormalized values) per head */
        for (int j = 0; j < G; j++) {
            float *pj = part + (int64_t)j * (d + 2);
            pj[0] = m[j];
            pj[1] = l[j];
            for (int w = 0; w < nv; w++) _mm512_storeu_ps(pj + 2 + w * 16, acc[j][w]);
        }
        return;
    }
    for (int j = 0; j < G; j++) {
        float inv = 1.0f / l[j];
        for (int w = 0; w < nv; w++) {
            __m512 o = _mm512_mul_ps(acc[j][w], _mm512_set1_ps(inv));
            __m256bh b = _mm512_cvtneps_pbh(o);
            _mm256_storeu_si256((__m256i *)(out + (int64_t)j * d + w * 16), (__m256i)b);
        }
    }
}
#endif

/* One (query row, KV head) pair: its g query heads over the row's keys, a chunk at a time. Always
 * inlined, so each call site with a constant head size gets its own unrolled copy. */
static inline __attribute__((always_inline)) void attend(
    const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
    const int64_t *block_table, int64_t start, int64_t seq_len, void *out, float *part, int io_type,
    int kv_type, int r, int h, int hq, int hkv, int d, int stride, int block_size, float scale,
    float softcap) {
    const int g = hq / hkv;
    float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    float kf[CHUNK][MAX_D], vf[MAX_D];
    float s[MAX_G][CHUNK];

    for (int j = 0; j < g; j++) {
        int64_t at = (int64_t)r * q_stride + ((int64_t)h * g + j) * d;
        if (io_type == F32) {
            for (int i = 0; i < d; i++) qf[j][i] = ((const float *)q)[at + i] * scale;
        } else {
            for (int i = 0; i < d; i++) qf[j][i] = bf16_to_f32(((const uint16_t *)q)[at + i]) * scale;
        }
        memset(acc[j], 0, (size_t)d * sizeof(float));
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    int64_t bi = start / block_size, bo = start % block_size; /* walk the table, no division */
    for (int64_t t0 = start; t0 < seq_len; t0 += CHUNK) {
        int n = (int)((seq_len - t0) < CHUNK ? (seq_len - t0) : CHUNK);
        int64_t slot[CHUNK];
        for (int c = 0; c < n; c++) {
            slot[c] = (block_table[bi] * block_size + bo) * hkv + h;
            if (++bo == block_size) bo = 0, bi++;
        }
        for (int c = 0; c < n; c++) load_row(k_cache, slot[c], stride, d, kv_type, kf[c]);
        for (int j = 0; j < g; j++) {
            float cmax = -INFINITY;
            for (int c = 0; c < n; c++) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int i = 0; i < d; i++) dot += qf[j][i] * kf[c][i];
                if (softcap > 0.0f) dot = softcap * tanhf(dot / softcap);
                s[j][c] = dot;
                if (dot > cmax) cmax = dot;
            }
            float mnew = m[j] > cmax ? m[j] : cmax;
            float corr = exp_nonpositive(m[j] - mnew); /* m = -inf at first: corr = 0 */
            m[j] = mnew;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int c = 0; c < n; c++) {
                s[j][c] = exp_nonpositive(s[j][c] - mnew);
                sum += s[j][c];
            }
            l[j] = l[j] * corr + sum;
#pragma omp simd
            for (int i = 0; i < d; i++) acc[j][i] *= corr;
        }
        for (int c = 0; c < n; c++) {
            load_row(v_cache, slot[c], stride, d, kv_type, vf);
            for (int j = 0; j < g; j++) {
                float p = s[j][c];
#pragma omp simd
                for (int i = 0; i < d; i++) acc[j][i] += p * vf[i];
            }
        }
    }
    if (part != NULL) { /* a split of the keys: its (max, sum, unnormalized values) per head */
        for (int j = 0; j < g; j++) {
            float *pj = part + (int64_t)j * (d + 2);
            pj[0] = m[j];
            pj[1] = l[j];
            memcpy(pj + 2, acc[j], (size_t)d * sizeof(float));
        }
        return;
    }
    for (int j = 0; j < g; j++) {
        int64_t at = ((int64_t)r * hq + (int64_t)h * g + j) * d;
        float inv = 1.0f / l[j];
        if (io_type == F32) {
            for (int i = 0; i < d; i++) ((float *)out)[at + i] = acc[j][i] * inv;
        } else {
            for (int i = 0; i < d; i++) ((uint16_t *)out)[at + i] = f32_to_bf16(acc[j][i] * inv);
        }
    }
}

/* Returns 0, or -1 when a size is beyond this kernel's fixed buffers (the caller falls back). */
int paged_decode_attention(const void *q, int64_t q_stride, const void *k_new, int64_t k_new_stride,
                           const void *v_new, int64_t v_new_stride, const int64_t *slots, void *k_cache, void *v_cache,
                           const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                           void *out, int io_type, int kv_type, int n, int hq, int hkv, int d,
                           int stride, int block_size, float scale, float softcap, int window) {
    if (d > MAX_D || hkv <= 0 || hq % hkv != 0 || hq / hkv > MAX_G) return -1;
    if (k_new != NULL) {
        if (kv_type != io_type) return -1;
        size_t es = io_type == F32 ? 4 : 2, row = (size_t)d * es;
        for (int r = 0; r < n; r++) {
            for (int h = 0; h < hkv; h++) {
                size_t dst = ((size_t)slots[r] * hkv + h) * stride * es;
                memcpy((char *)k_cache + dst,
                       (const char *)k_new + ((size_t)r * k_new_stride + (size_t)h * d) * es, row);
                memcpy((char *)v_cache + dst,
                       (const char *)v_new + ((size_t)r * v_new_stride + (size_t)h * d) * es, row);
            }
        }
    }
    /* Work items: (row, KV head(s), split of its keys). Few rows x heads (batch-1 decode: 3 KV heads on
     * 2 threads) would leave threads idle or unbalanced, so long contexts are then cut into splits
     * of at least MIN_SPLIT keys, each attended on its own (flash-decoding) and merged below. */
    const int g = hq / hkv, want = 4 * omp_get_max_threads();
    /* With rows enough to keep every thread busy, the bfloat16 path takes several KV heads of a
     * row per item (nh), reading each key's heads side by side. */
    int nh = 1;
#ifdef HAVE_BF16_PATH
    if (io_type == BF16 && kv_type == BF16 && d % 32 == 0)
        for (int c = hkv; c > 1; c--)
            if (hkv % c == 0 && c * g <= MAX_G && n * (hkv / c) >= want) {
                nh = c;
                break;
            }
#endif
    const int groups = hkv / nh, pairs = n * groups;
    int splits = 1;
    if (pairs < want) {
        int64_t longest = 0;
        for (int r = 0; r < n; r++) {
            int64_t len = window > 0 && seq_lens[r] > window ? window : seq_lens[r];
            if (len > longest) longest = len;
        }
        splits = (want + pairs - 1) / pairs;
        if (splits > longest / MIN_SPLIT) splits = (int)(longest / MIN_SPLIT);
        if (splits > MAX_SPLITS) splits = MAX_SPLITS;
        if (splits < 1) splits = 1;
    }
    float *parts = NULL;
    if (splits > 1) {
        parts = (float *)malloc((size_t)pairs * splits * g * (d + 2) * sizeof(float));
        if (parts == NULL) splits = 1;
    }
#pragma omp parallel for schedule(static)
    for (int item = 0; item < pairs * splits; item++) {
        const int r = item / (groups * splits), h = (item / splits) % groups * nh, sp = item % splits;
        const int64_t *bt = block_tables + (int64_t)r * bt_stride;
        const int64_t end = seq_lens[r];
        const int64_t first = window > 0 && end > window ? end - window : 0;
        /* split sp of `splits` near-equal key ranges, on 16-key boundaries */
        int64_t len = end - first, per = ((len + splits - 1) / splits + 15) / 16 * 16;
        int64_t lo = first + per * sp, hi = lo + per < end ? lo + per : end;
        float *part = NULL;
        if (splits > 1) {
            part = parts + ((int64_t)(r * hkv + h) * splits + sp) * g * (d + 2); /* nh = 1 */
            if (lo >= hi) { /* nothing left for this split: an empty softmax */
                for (int j = 0; j < g; j++) part[j * (d + 2)] = -INFINITY, part[j * (d + 2) + 1] = 0.0f;
                continue;
            }
        } else {
            lo = first, hi = end;
        }
#ifdef HAVE_BF16_PATH
        if (io_type == BF16 && kv_type == BF16 && d % 32 == 0) {
            attend_bf16((const uint16_t *)q + (int64_t)r * q_stride + (int64_t)h * g * d,
                        (const uint16_t *)k_cache, (const uint16_t *)v_cache, bt, lo, hi,
                        (uint16_t *)out + ((int64_t)r * hq + (int64_t)h * g) * d, part, h, nh, g,
                        hkv, d, stride, block_size, scale, softcap);
            continue;
        }
#endif
        /* the usual head sizes as constants, so the compiler unrolls the row loops */
        switch (d) {
        case 64:
            attend(q, q_stride, k_cache, v_cache, bt, lo, hi, out, part, io_type, kv_type, r, h,
                   hq, hkv, 64, stride, block_size, scale, softcap);
            break;
        case 128:
            attend(q, q_stride, k_cache, v_cache, bt, lo, hi, out, part, io_type, kv_type, r, h,
                   hq, hkv, 128, stride, block_size, scale, softcap);
            break;
        default:
            attend(q, q_stride, k_cache, v_cache, bt, lo, hi, out, part, io_type, kv_type, r, h,
                   hq, hkv, d, stride, block_size, scale, softcap);
        }
    }
    if (splits > 1) { /* merge each head's splits: rescale to the common max, normalize */
#pragma omp parallel for schedule(static)
        for (int rh = 0; rh < pairs; rh++) {
            for (int j = 0; j < g; j++) {
                const float *p0 = parts + (int64_t)rh * splits * g * (d + 2) + (int64_t)j * (d + 2);
                const int64_t step = (int64_t)g * (d + 2);
                float mx = -INFINITY, total = 0.0f, acc[MAX_D], w[64];
                for (int sp = 0; sp < splits; sp++) mx = p0[sp * step] > mx ? p0[sp * step] : mx;
                for (int i = 0; i < d; i++) acc[i] = 0.0f;
                for (int sp = 0; sp < splits; sp++) {
                    const float *ps = p0 + sp * step;
                    if (!(ps[1] > 0.0f)) continue; /* an empty split (its values unwritten) */
                    w[sp] = exp_nonpositive(ps[0] - mx);
                    total += w[sp] * ps[1];
                    for (int i = 0; i < d; i++) acc[i] += w[sp] * ps[2 + i];
                }
                const int r = rh / hkv, h = rh % hkv;
                int64_t at = ((int64_t)r * hq + (int64_t)h * g + j) * d;
                float inv = 1.0f / total;
                if (io_type == F32) {
                    for (int i = 0; i < d; i++) ((float *)out)[at + i] = acc[i] * inv;
                } else {
                    for (int i = 0; i < d; i++) ((uint16_t *)out)[at + i] = f32_to_bf16(acc[i] * inv);
                }
            }
        }
        free(parts);
    }
    return 0;
}
