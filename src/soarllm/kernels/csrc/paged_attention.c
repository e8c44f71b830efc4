/* Paged decode attention for CPUs: each query row reads its keys and values in place from the paged
 * KV cache through its block table (no gathered copy), with an online softmax in float32.
 *
 * Built at run time by soarllm/kernels/cpu_native.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes from soarllm/kernels/cpu_attention.py. The OpenMP runtime is the one PyTorch
 * already loaded (same soname), so this kernel shares PyTorch's threads instead of adding its own.
 *
 * Layouts (all contiguous):
 *   q           [n, hq, d], rows q_stride elements apart   float32 or bfloat16
 *   out         [n, hq, d] contiguous, q's type
 *   k/v planes  [num_blocks, block_size, hkv, stride]  float32, bfloat16, or int8 rows of d values
 *               followed by the 4 bytes of their float32 scale (stride = d + 4; value = q * scale)
 *   block_table [n, bt_stride] int64, seq_lens [n] int64: row r attends to positions
 *               [max(0, seq_lens[r] - window), seq_lens[r]) (window <= 0: from 0)
 * Scores are q . k * scale, then softcap * tanh(score / softcap) when softcap > 0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

enum { F32 = 0, BF16 = 1, I8 = 2 };

#define MAX_D 256
#define MAX_G 32
#define CHUNK 32

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

/* One (query row, KV head) pair: its g query heads over the row's keys, a chunk at a time. Always
 * inlined, so each call site with a constant head size gets its own unrolled copy. */
static inline __attribute__((always_inline)) void attend(
    const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
    const int64_t *block_table, int64_t seq_len, void *out, int io_type, int kv_type, int r, int h,
    int hq, int hkv, int d, int stride, int block_size, float scale, float softcap, int window) {
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
    int64_t start = (window > 0 && seq_len > window) ? seq_len - window : 0;
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
            float corr = expf(m[j] - mnew); /* m = -inf at first: corr = 0, acc and l are 0 */
            m[j] = mnew;
            l[j] *= corr;
            for (int c = 0; c < n; c++) {
                s[j][c] = expf(s[j][c] - mnew);
                l[j] += s[j][c];
            }
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
int paged_decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                           void *out, int io_type, int kv_type, int n, int hq, int hkv, int d,
                           int stride, int block_size, float scale, float softcap, int window) {
    if (d > MAX_D || hkv <= 0 || hq % hkv != 0 || hq / hkv > MAX_G) return -1;
#pragma omp parallel for collapse(2) schedule(static)
    for (int r = 0; r < n; r++) {
        for (int h = 0; h < hkv; h++) {
            const int64_t *bt = block_tables + (int64_t)r * bt_stride;
            /* the usual head sizes as constants, so the compiler unrolls the row loops */
            switch (d) {
            case 64:
                attend(q, q_stride, k_cache, v_cache, bt, seq_lens[r], out, io_type, kv_type, r, h,
                       hq, hkv, 64, stride, block_size, scale, softcap, window);
                break;
            case 128:
                attend(q, q_stride, k_cache, v_cache, bt, seq_lens[r], out, io_type, kv_type, r, h,
                       hq, hkv, 128, stride, block_size, scale, softcap, window);
                break;
            default:
                attend(q, q_stride, k_cache, v_cache, bt, seq_lens[r], out, io_type, kv_type, r, h,
                       hq, hkv, d, stride, block_size, scale, softcap, window);
            }
        }
    }
    return 0;
}
