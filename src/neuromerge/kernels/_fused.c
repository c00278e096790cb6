/* Fused CPU kernels of the merge engine: read bf16/fp32 inputs, compute in fp32, write bf16/fp32, one pass.
 *
 * Each kernel does, in one sweep over memory, what the torch path (src/neuromerge/methods, tensors) does in ~10
 * elementwise passes with fp32 temporaries. For nm_linear, nm_ties and the histograms the arithmetic is the torch
 * path's, operation by operation and in the same order (no FMA contraction: compiled with -ffp-contract=off), so
 * results are bitwise identical to it; NeuroMerging's kernels (nm_neuro_*, nm_orthogonal_mix) sum in float64 and
 * use Jacobi eigenpairs, so they agree with it to rounding. The table in docs/engine.md ("Fused kernels: bitwise or
 * to rounding") gives each kernel's status; the tests in tests/engine/test_native_kernels.py check it. Called
 * through ctypes (which releases the GIL), so the engine's thread pool runs them in parallel. Work is done in
 * blocks of BLOCK entries converted to fp32 on the stack, which the compiler vectorizes.
 *
 * dtype codes: 0 = float32, 1 = bfloat16. bf16 -> fp32 is exact (a 16-bit shift); fp32 -> bf16 rounds to nearest
 * even, NaN -> 0x7FC0 (c10::BFloat16's rule).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 1024
/* GCC vector extensions: four float64 lanes, compiled to the target's vector instructions (AVX in the AVX2 clone) */
typedef double nm_v4d __attribute__((vector_size(32)));
typedef float nm_v4f __attribute__((vector_size(16)));
/* TIES keeps ~10 + n_models arrays of a block: a smaller one stays in L1 */
#define TB 128
#define NM_F32 0
#define NM_BF16 1
#define MAX_MODELS 256

/* x86-64: an AVX2 build of each kernel chosen at load time when the CPU has it, the baseline (SSE2) one otherwise.
 * -ffp-contract=off forbids fused multiply-adds in both builds, so they round identically. (An AVX-512 clone measured
 * no faster on this project's machine: the kernels are bound by memory traffic.) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NM_CLONES
#endif

static inline __attribute__((always_inline)) float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* the 24-bit significand of a non-negative fp32 bit pattern k (the value is significand * 2^(max(e, 1) - 150)) */
static inline __attribute__((always_inline)) int64_t sig24(uint32_t k) {
    return (int64_t)((k & 0x7FFFFFu) | (k >= 0x800000u ? 0x800000u : 0u));
}

/* fp32 copy of entries [start, start + m) of p; returns how many of them are NaN/Inf */
static inline __attribute__((always_inline)) int64_t load_block(const void *p, int dtype, int64_t start, int64_t m, float *out) {
    int32_t bad = 0;
    if (dtype == NM_BF16) {
        const uint16_t *s = (const uint16_t *)p + start;
        for (int64_t j = 0; j < m; j++) {
            uint32_t u = (uint32_t)s[j];
            bad += (u & 0x7F80u) == 0x7F80u;
            out[j] = bits_to_f32(u << 16);
        }
    } else {
        const uint32_t *s = (const uint32_t *)p + start;
        for (int64_t j = 0; j < m; j++) {
            uint32_t u = s[j];
            bad += (u & 0x7F800000u) == 0x7F800000u;
            out[j] = bits_to_f32(u);
        }
    }
    return bad;
}

/* store fp32 values; returns how many are NaN/Inf as stored (in bf16, after rounding) */
static inline __attribute__((always_inline)) int64_t store_block(void *p, int dtype, int64_t start, int64_t m, const float *in) {
    int32_t bad = 0;
    if (dtype == NM_BF16) {
        uint16_t *d = (uint16_t *)p + start;
        for (int64_t j = 0; j < m; j++) {
            uint32_t u = f32_to_bits(in[j]);
            uint32_t nonfinite = (u & 0x7F800000u) == 0x7F800000u;
            uint32_t nan = nonfinite & ((u & 0x007FFFFFu) != 0);
            uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            uint16_t v = (uint16_t)(nan ? 0x7FC0u : rounded);
            /* counted after rounding: a finite fp32 value above bf16's largest (3.3895e38) rounds to Inf */
            bad += (int32_t)((v & 0x7F80u) == 0x7F80u);
            d[j] = v;
        }
    } else {
        float *d = (float *)p + start;
        for (int64_t j = 0; j < m; j++) {
            bad += (f32_to_bits(in[j]) & 0x7F800000u) == 0x7F800000u;
            d[j] = in[j];
        }
    }
    return bad;
}

/* The entries of [start, start + m) that lie in sampled rows (row r = i / row_len is sampled when r >= first and
 * (r - first) % stride == 0), as (lo, hi) pairs relative to start written into seg; returns the number of pairs. */
static inline __attribute__((always_inline)) int sampled_segments(int64_t start, int64_t m, int64_t row_len, int64_t first, int64_t stride, int64_t *seg) {
    int n = 0;
    int64_t i = start, end = start + m;
    while (i < end) {
        int64_t r = i / row_len;
        int64_t row_end = (r + 1) * row_len;
        if (row_end > end) row_end = end;
        if (r >= first && (r - first) % stride == 0) {
            if (n > 0 && seg[2 * n - 1] == i - start) {
                seg[2 * n - 1] = row_end - start;
            } else {
                seg[2 * n] = i - start;
                seg[2 * n + 1] = row_end - start;
                n++;
            }
        }
        i = row_end;
    }
    return n;
}

/* Linear combination (Task Arithmetic): theta = b + lam * acc, acc = ((x_0 - b) w_0 + (x_1 - b) w_1 + ...)
 * [/ wsum when normalize]. stats[0]: sign conflicts in sampled rows (max_t tau_t > 0 and min_t tau_t < 0),
 * stats[1]: entries in sampled rows, stats[2]: NaN/Inf inputs, stats[3]: NaN/Inf outputs. */
NM_CLONES int64_t nm_linear(int64_t n, int n_models, const void *base, const void *const *models, int in_dtype, void *out,
                  int out_dtype, const float *weights, float lam, int normalize, float wsum, int64_t row_len,
                  int64_t sample_first, int64_t sample_stride, int64_t *stats) {
    float b[BLOCK], x[BLOCK], acc[BLOCK], hi[BLOCK], lo[BLOCK];
    int64_t seg[2 * (BLOCK + 2)];
    int64_t conflicts = 0, sampled = 0, bad_in = 0, bad_out = 0;
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        bad_in += load_block(base, in_dtype, start, m, b);
        for (int t = 0; t < n_models; t++) {
            bad_in += load_block(models[t], in_dtype, start, m, x);
            float w = weights[t];
            if (t == 0) {
                for (int64_t j = 0; j < m; j++) {
                    float tau = x[j] - b[j];
                    acc[j] = tau * w;
                    hi[j] = tau;
                    lo[j] = tau;
                }
            } else {
                for (int64_t j = 0; j < m; j++) {
                    float tau = x[j] - b[j];
                    acc[j] = acc[j] + tau * w;
                    hi[j] = tau > hi[j] ? tau : hi[j];
                    lo[j] = tau < lo[j] ? tau : lo[j];
                }
            }
        }
        if (n_models > 1) {
            int ns = sampled_segments(start, m, row_len, sample_first, sample_stride, seg);
            for (int s = 0; s < ns; s++) {
                for (int64_t j = seg[2 * s]; j < seg[2 * s + 1]; j++) conflicts += (hi[j] > 0.0f) & (lo[j] < 0.0f);
                sampled += seg[2 * s + 1] - seg[2 * s];
            }
        }
        if (normalize)
            for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / wsum;
        for (int64_t j = 0; j < m; j++) acc[j] = b[j] + acc[j] * lam;
        bad_out += store_block(out, out_dtype, start, m, acc);
    }
    stats[0] = conflicts;
    stats[1] = sampled;
    stats[2] = bad_in;
    stats[3] = bad_out;
    return 0;
}

/* The positions j < m with flag[j] != 0 appended to idx, *n counting them. With SSE2: a mask per 16 entries from
 * vector comparisons, then only its set bits are visited (the flags are rare); elsewhere a plain scan. */
static inline __attribute__((always_inline)) void nonzero_positions(const int32_t *flag, int64_t m, int32_t *idx,
                                                                    int32_t *n) {
    int32_t c = *n;
    int64_t j = 0;
#if defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    for (; j + 16 <= m; j += 16) {
        uint32_t mask = 0;
        for (int g = 0; g < 4; g++) {
            __m128i f = _mm_loadu_si128((const __m128i *)(flag + j + 4 * g));
            mask |= (uint32_t)(~_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(f, zero))) & 0xF) << (4 * g);
        }
        while (mask) {
            idx[c++] = (int32_t)j + __builtin_ctz(mask);
            mask &= mask - 1;
        }
    }
#endif
    for (; j < m; j++)
        if (flag[j]) idx[c++] = (int32_t)j;
    *n = c;
}

/* TIES on one chunk: trim tau_t = x_t - b to |tau_t| >= thr_t, weight tau'_t = w_t tau^_t, elect
 * gamma = sign(score) with score = tau'_0 + tau'_1 + ... (sign_count: sum of sign(tau'_t)), a zero election taking
 * the fill sign; disjoint merge with p_t = tau'_t gamma: tot = 0 + relu(p_0) + relu(p_1) + ...,
 * div = 0 + sign(relu(p_0)) w_0 + ...; dis-mean: tm = (tot gamma) / clamp(div); dis-sum: tm = tot gamma;
 * theta = b + tm * lam.
 *
 * fill: +1 or -1, or 0 for the majority rule: sign(sum of the elections over the chunk), +1 when that is >= 0,
 * known only at the end. The chunk is then computed with +1; the entries where the fill can matter (a zero election
 * with a non-zero tau'_t, or a -0 base entry, whose output is -0 or +0 as the merged update is) are also computed
 * with -1 and kept aside, and written over out when the majority turns out negative.
 * div_mode: 0 = dis-sum, 1 = dis-mean with div clamped to min_w (all weights > 0), 2 = dis-mean with div 0 -> 1.
 * stats: [0] conflicts (min_t p_t < 0), [1] NaN/Inf inputs, [2] NaN/Inf in out, [3] entries computed with -1,
 * [4] unused, [5] sum of sign(score), [6 + t] nonzero entries of tau^_t. */
NM_CLONES int64_t nm_ties(int64_t n, int n_models, const void *base, const void *const *models, int in_dtype, void *out,
                          int out_dtype, const float *weights, const float *thresholds, float lam,
                          int sign_count, int fill, int div_mode, float min_w, int64_t *stats) {
    float b[TB], x[TB], score[TB], res[TB], anynz[TB];
    float g[TB], tot[TB], div[TB], lowest[TB];
    int32_t matters[TB];
    int64_t conflicts = 0, bad_in = 0, election = 0;
    int64_t kept[MAX_MODELS];
    int64_t n_blocks = (n + TB - 1) / TB;
    float *tp, *alt_val = NULL;
    int64_t *alt_pos = NULL, n_alt = 0, cap_alt = 0, bad_out = 0;
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    tp = (float *)malloc(sizeof(float) * TB * (size_t)n_models);
    if (tp == NULL) return -2;
    for (int t = 0; t < n_models; t++) kept[t] = 0;
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        int64_t start = blk * TB;
        int64_t m = n - start < TB ? n - start : TB;
        bad_in += load_block(base, in_dtype, start, m, b);
        for (int64_t j = 0; j < m; j++) anynz[j] = 0.0f;
        for (int t = 0; t < n_models; t++) {
            float *y = tp + (size_t)t * TB;
            float w = weights[t], thr = thresholds[t];
            int32_t k = 0;
            bad_in += load_block(models[t], in_dtype, start, m, x);
            for (int64_t j = 0; j < m; j++) {
                float tau = x[j] - b[j];
                float trimmed = fabsf(tau) >= thr ? tau : 0.0f;
                k += trimmed != 0.0f;
                y[j] = trimmed * w;
                anynz[j] = y[j] != 0.0f ? 1.0f : anynz[j];
            }
            kept[t] += k;
            if (sign_count) {
                for (int64_t j = 0; j < m; j++) {
                    float s = y[j] > 0.0f ? 1.0f : (y[j] < 0.0f ? -1.0f : 0.0f);
                    score[j] = t == 0 ? s : score[j] + s;
                }
            } else if (t == 0) {
                for (int64_t j = 0; j < m; j++) score[j] = y[j];
            } else {
                for (int64_t j = 0; j < m; j++) score[j] = score[j] + y[j];
            }
        }
        int32_t fill_matters = 0;
        {
            int32_t e = 0;
            for (int64_t j = 0; j < m; j++) {
                e += (score[j] > 0.0f) - (score[j] < 0.0f);
                /* a zero election over a non-zero tau'_t, or over a -0 base (the output's sign of zero: b + (+-0)
                 * is +0 unless both are -0) */
                matters[j] = (score[j] == 0.0f) & ((anynz[j] != 0.0f) | (f32_to_bits(b[j]) == 0x80000000u));
                fill_matters |= matters[j];
            }
            election += e;
        }
        float zero_sign = fill == 0 ? 1.0f : (float)fill;
        for (int64_t j = 0; j < m; j++) {
            g[j] = score[j] > 0.0f ? 1.0f : (score[j] < 0.0f ? -1.0f : zero_sign);
            tot[j] = 0.0f;
            div[j] = 0.0f;
        }
        for (int t = 0; t < n_models; t++) {
            const float *y = tp + (size_t)t * TB;
            float w = weights[t];
            if (t == 0)
                for (int64_t j = 0; j < m; j++) lowest[j] = y[j] * g[j];
            for (int64_t j = 0; j < m; j++) {
                float p = y[j] * g[j];
                lowest[j] = p < lowest[j] ? p : lowest[j];
                float a = p <= 0.0f ? 0.0f : p; /* relu that keeps NaN, as torch.relu: never a finite 0 */
                tot[j] = tot[j] + a;
                div[j] = div[j] + (a > 0.0f ? w : 0.0f);
            }
        }
        {
            int32_t c = 0;
            for (int64_t j = 0; j < m; j++) c += lowest[j] < 0.0f;
            conflicts += c;
        }
        for (int64_t j = 0; j < m; j++) tot[j] = tot[j] * g[j];
        if (div_mode == 1)
            for (int64_t j = 0; j < m; j++) tot[j] = tot[j] / (div[j] < min_w ? min_w : div[j]);
        else if (div_mode == 2)
            for (int64_t j = 0; j < m; j++) tot[j] = tot[j] / (div[j] == 0.0f ? div[j] + 1.0f : div[j]);
        for (int64_t j = 0; j < m; j++) res[j] = b[j] + tot[j] * lam;
        bad_out += store_block(out, out_dtype, start, m, res);
        if (fill == 0 && fill_matters) {
            /* the same operations with the fill -1, only where it can change the result (a few entries per block),
             * kept as (position, value) until the chunk's majority is known */
            int32_t idx[TB], n_idx = 0;
            nonzero_positions(matters, m, idx, &n_idx);
            if (n_alt + n_idx > cap_alt) {
                int64_t cap = 2 * (n_alt + n_idx) + TB;
                int64_t *pos = (int64_t *)realloc(alt_pos, sizeof(int64_t) * (size_t)cap);
                if (pos != NULL) alt_pos = pos;
                float *val = (float *)realloc(alt_val, sizeof(float) * (size_t)cap);
                if (val != NULL) alt_val = val;
                if (pos == NULL || val == NULL) {
                    free(tp);
                    free(alt_pos);
                    free(alt_val);
                    return -2;
                }
                cap_alt = cap;
            }
            for (int32_t q = 0; q < n_idx; q++) {
                int32_t j = idx[q];
                float t_sum = 0.0f, d_sum = 0.0f;
                for (int t = 0; t < n_models; t++) {
                    float p = tp[(size_t)t * TB + j] * -1.0f;
                    float a = p <= 0.0f ? 0.0f : p;
                    t_sum = t_sum + a;
                    d_sum = d_sum + (a > 0.0f ? weights[t] : 0.0f);
                }
                float tm = t_sum * -1.0f;
                if (div_mode == 1) tm = tm / (d_sum < min_w ? min_w : d_sum);
                else if (div_mode == 2) tm = tm / (d_sum == 0.0f ? d_sum + 1.0f : d_sum);
                alt_pos[n_alt] = start + j;
                alt_val[n_alt] = b[j] + tm * lam;
                n_alt++;
            }
        }
    }
    if (fill == 0 && election < 0) {
        for (int64_t q = 0; q < n_alt; q++) {
            float before;
            int64_t i = alt_pos[q];
            float v = alt_val[q];
            if (out_dtype == NM_BF16) before = bits_to_f32((uint32_t)((uint16_t *)out)[i] << 16);
            else before = ((float *)out)[i];
            bad_out -= (f32_to_bits(before) & 0x7F800000u) == 0x7F800000u;
            bad_out += store_block(out, out_dtype, i, 1, &v);
        }
    }
    free(tp);
    free(alt_pos);
    free(alt_val);
    stats[0] = conflicts;
    stats[1] = bad_in;
    stats[2] = bad_out;
    stats[3] = n_alt;
    stats[4] = 0;
    stats[5] = election;
    for (int t = 0; t < n_models; t++) stats[6 + t] = kept[t];
    return 0;
}

/* four fp32 entries as float64 lanes (exact) */
static inline __attribute__((always_inline)) nm_v4d load4(const float *p) {
    nm_v4f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, nm_v4d);
}

/* sum_i a_i b_i in float64 over 4 interleaved partial sums (lane l takes i = l mod 4; the products of fp32 values are
 * exact), combined (l0 + l1) + (l2 + l3): a fixed order. row_dots computes several at once, in the same order. */
static inline __attribute__((always_inline)) double dot64(const float *a, const float *b, int64_t n) {
    nm_v4d acc = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) acc += load4(a + i) * load4(b + i);
    for (int l = 0; i < n; i++, l++) acc[l] += (double)a[i] * (double)b[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* The inner products of a row: nb = <b, b>, q[t] = <y_t, b>, gy[s * T + t] = <y_s, y_t> (s <= t; y_t = y + t d), each
 * as dot64 computes it. For T <= 4 (a constant after inlining) in one pass that converts each entry once and keeps
 * the 1 + T + T(T+1)/2 accumulators in registers; otherwise dot by dot. */
static inline __attribute__((always_inline)) void row_dots_fixed(const int n_models, int64_t d, const float *b,
                                                                 const float *y, double *nb, double *q, double *gy) {
    nm_v4d anb = {0.0, 0.0, 0.0, 0.0}, aq[4], ag[4][4], vy[4];
    for (int t = 0; t < n_models; t++) {
        aq[t] = anb;
        for (int u = t; u < n_models; u++) ag[t][u] = anb;
    }
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
        nm_v4d vb = load4(b + i);
        anb += vb * vb;
        for (int t = 0; t < n_models; t++) {
            vy[t] = load4(y + (size_t)t * (size_t)d + i);
            aq[t] += vy[t] * vb;
        }
        for (int t = 0; t < n_models; t++)
            for (int u = t; u < n_models; u++) ag[t][u] += vy[t] * vy[u];
    }
    for (int l = 0; i < d; i++, l++) {
        double bi = (double)b[i];
        anb[l] += bi * bi;
        for (int t = 0; t < n_models; t++) {
            double yi = (double)y[(size_t)t * (size_t)d + i];
            aq[t][l] += yi * bi;
            for (int u = t; u < n_models; u++) ag[t][u][l] += yi * (double)y[(size_t)u * (size_t)d + i];
        }
    }
    *nb = (anb[0] + anb[1]) + (anb[2] + anb[3]);
    for (int t = 0; t < n_models; t++) {
        q[t] = (aq[t][0] + aq[t][1]) + (aq[t][2] + aq[t][3]);
        for (int u = t; u < n_models; u++)
            gy[t * n_models + u] = (ag[t][u][0] + ag[t][u][1]) + (ag[t][u][2] + ag[t][u][3]);
    }
}

static inline __attribute__((always_inline)) void row_dots(int n_models, int64_t d, const float *b, const float *y,
                                                           double *nb, double *q, double *gy) {
    switch (n_models) {
    case 1: row_dots_fixed(1, d, b, y, nb, q, gy); return;
    case 2: row_dots_fixed(2, d, b, y, nb, q, gy); return;
    case 3: row_dots_fixed(3, d, b, y, nb, q, gy); return;
    case 4: row_dots_fixed(4, d, b, y, nb, q, gy); return;
    default: break;
    }
    *nb = dot64(b, b, d);
    for (int t = 0; t < n_models; t++) {
        const float *yt = y + (size_t)t * (size_t)d;
        q[t] = dot64(yt, b, d);
        for (int u = t; u < n_models; u++) gy[t * n_models + u] = dot64(yt, y + (size_t)u * (size_t)d, d);
    }
}

/* NeuroMerging rows: the weighted trimmed task vectors tau'_t = w_t (x_t - b) [|x_t - b| >= thr_t] of row k of a
 * (rows x d) chunk, written into y (T x d fp32). Returns NaN/Inf inputs. */
static inline __attribute__((always_inline)) int64_t neuro_row(int64_t k, int64_t d, int n_models, const void *base,
                                                                const void *const *models, int in_dtype,
                                                                const float *weights, const float *thresholds,
                                                                float *b, float *x, float *y) {
    int64_t bad = 0;
    for (int64_t s0 = 0; s0 < d; s0 += BLOCK) {
        int64_t m = d - s0 < BLOCK ? d - s0 : BLOCK;
        bad += load_block(base, in_dtype, k * d + s0, m, b + s0);
    }
    for (int t = 0; t < n_models; t++) {
        float *yt = y + (size_t)t * (size_t)d;
        float w = weights[t], thr = thresholds[t];
        for (int64_t s0 = 0; s0 < d; s0 += BLOCK) {
            int64_t m = d - s0 < BLOCK ? d - s0 : BLOCK;
            bad += load_block(models[t], in_dtype, k * d + s0, m, x);
            for (int64_t j = 0; j < m; j++) {
                float tau = x[j] - b[s0 + j];
                yt[s0 + j] = (fabsf(tau) >= thr ? tau : 0.0f) * w;
            }
        }
    }
    return bad;
}

/* One row k of NeuroMerging's split, with tau'_t as in neuro_row (left in y): c[t] = c_t = <tau'_t, b> / ||b||^2 (0 when
 * ||b|| = 0; c rounded to fp32), the Gram matrix g[s * T + t] = <o_s, o_t> of the orthogonal parts o_t = tau'_t - c_t b
 * and *nb = ||b||^2 (float64); energy[0] += sum ||tau'_t||^2, energy[1] += sum c_t^2 ||b||^2. The Gram matrix is
 * expanded, <o_s, o_t> = <tau'_s, tau'_t> - c_s <tau'_t, b> - c_t <tau'_s, b> + c_s c_t ||b||^2, from the inner
 * products of one pass (row_dots; products of fp32 values are exact in float64, so the cancellation when tau' is
 * nearly parallel to b costs only float64 rounding). Returns the number of NaN/Inf inputs. */
static inline __attribute__((always_inline)) int64_t neuro_split_row(int64_t k, int64_t d, int n_models,
                                                                      const void *base, const void *const *models,
                                                                      int in_dtype, const float *weights,
                                                                      const float *thresholds, float *b, float *x,
                                                                      float *y, float *c, double *g, double *nb,
                                                                      double *energy) {
    int64_t bad = neuro_row(k, d, n_models, base, models, in_dtype, weights, thresholds, b, x, y);
    double n2, q[MAX_MODELS];
    row_dots(n_models, d, b, y, &n2, q, g);
    *nb = n2;
    for (int t = 0; t < n_models; t++) {
        float ct = n2 > 0.0 ? (float)(q[t] / n2) : 0.0f;
        c[t] = ct;
        energy[0] += g[t * n_models + t];
        energy[1] += (double)ct * (double)ct * n2;
    }
    for (int s = 0; s < n_models; s++)
        for (int t = s; t < n_models; t++) {
            double cs = (double)c[s], ct = (double)c[t];
            double acc = ((g[s * n_models + t] - cs * q[t]) - ct * q[s]) + (cs * ct) * n2;
            g[s * n_models + t] = acc;
            g[t * n_models + s] = acc;
        }
    return bad;
}

/* Per-row work buffers of the NeuroMerging kernels: the base row b (d), the task vectors y (T x d), the output row acc
 * (d). row_buffers_alloc returns 0 when an allocation failed (everything is then freed). */
typedef struct {
    float *b, *y, *acc;
} row_buffers;

static int row_buffers_alloc(row_buffers *r, int64_t d, int n_models) {
    r->b = (float *)malloc(sizeof(float) * (size_t)d);
    r->y = (float *)malloc(sizeof(float) * (size_t)d * (size_t)n_models);
    r->acc = (float *)malloc(sizeof(float) * (size_t)d);
    if (r->b == NULL || r->y == NULL || r->acc == NULL) {
        free(r->b);
        free(r->y);
        free(r->acc);
        return 0;
    }
    return 1;
}

static void row_buffers_free(row_buffers *r) {
    free(r->b);
    free(r->y);
    free(r->acc);
}

/* acc = b + lam2 (a_0 o_0 + a_1 o_1 + ...) for one row, with o_t = y_t - c_t b recomputed as nm_neuro_first forms it
 * (fp32, in model order) */
static inline __attribute__((always_inline)) void orthogonal_output(int64_t d, int n_models, const float *b,
                                                                    const float *y, const float *c, const float *a,
                                                                    float lam2, float *acc) {
    for (int t = 0; t < n_models; t++) {
        const float *yt = y + (size_t)t * (size_t)d;
        float at = a[t], ct = c[t];
        if (t == 0)
            for (int64_t i = 0; i < d; i++) acc[i] = at * (yt[i] - ct * b[i]);
        else
            for (int64_t i = 0; i < d; i++) acc[i] = acc[i] + at * (yt[i] - ct * b[i]);
    }
    for (int64_t i = 0; i < d; i++) acc[i] = b[i] + lam2 * acc[i];
}

/* NeuroMerging, first sweep over a (rows x d) chunk: per row k, neuro_split_row, with c_t at coef[t * rows + k] and the
 * Gram matrix at gram[(k * T + s) * T + t], sq_norm[k] = ||b||^2; energy[0..1] as there. Returns the number of
 * NaN/Inf inputs (negative on a failed allocation). */
NM_CLONES int64_t nm_neuro_first(int64_t rows, int64_t d, int n_models, const void *base, const void *const *models,
                                 int in_dtype, const float *weights, const float *thresholds, float *coef,
                                 double *gram, double *sq_norm, double *energy) {
    float x[BLOCK], c[MAX_MODELS];
    int64_t bad = 0;
    double sums[2] = {0.0, 0.0};
    row_buffers r;
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    if (!row_buffers_alloc(&r, d, n_models)) return -2;
    for (int64_t k = 0; k < rows; k++) {
        double *g = gram + (size_t)k * (size_t)n_models * (size_t)n_models;
        bad += neuro_split_row(k, d, n_models, base, models, in_dtype, weights, thresholds, r.b, x, r.y, c, g,
                               sq_norm + k, sums);
        for (int t = 0; t < n_models; t++) coef[(size_t)t * (size_t)rows + (size_t)k] = c[t];
    }
    row_buffers_free(&r);
    energy[0] += sums[0];
    energy[1] += sums[1];
    return bad;
}

/* The mix a_t = sum_j U_tj w_j of one row (tensors/neurons.py, orthogonal_mix, the reference) from its Gram matrix g of
 * the orthogonal parts (T x T, float64, T <= MIX_MAX): G = U S^2 U^T by cyclic Jacobi rotations (Golub & Van Loan
 * 8.5; an off-diagonal entry below rounding against both diagonal ones is set to 0 without a rotation, the rule of
 * Numerical Recipes' jacobi), eigenpairs in descending order, S^2 clamped at 0 and those at
 * or below GRAM_RTOL * s_1^2 set to 0, rows t of U with g_tt = 0 set to 0, each column's sign fixed so that its first
 * largest-magnitude entry is positive; coordinates U_tj of live j TIES-merged per j (elected sign of their sum, or of
 * their signs' sum with sign_count; zero -> the majority over j, +1 on a tie; disjoint mean w_j), w_j kept for the
 * first min(#{j: cv_j < eta} + 1, T) coordinates (cv: cumulative share of S^2) when eta < 1. */
#define MIX_MAX 16
#define GRAM_RTOL 1e-12
static void orthogonal_mix_row(int n, const double *g, double eta, int sign_count, double *a) {
    double A[MIX_MAX * MIX_MAX], V[MIX_MAX * MIX_MAX], ev[MIX_MAX], U[MIX_MAX * MIX_MAX], w[MIX_MAX];
    int order[MIX_MAX];
    for (int i = 0; i < n * n; i++) A[i] = g[i];
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) V[i * n + j] = i == j ? 1.0 : 0.0;
    for (int sweep = 0; sweep < 64; sweep++) {
        double off = 0.0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) off += fabs(A[p * n + q]);
        if (off == 0.0) break;
        for (int p = 0; p < n; p++) {
            for (int q = p + 1; q < n; q++) {
                double apq = A[p * n + q], app = A[p * n + p], aqq = A[q * n + q];
                double big = 100.0 * fabs(apq);
                if (fabs(app) + big == fabs(app) && fabs(aqq) + big == fabs(aqq)) {
                    A[p * n + q] = A[q * n + p] = 0.0;
                    continue;
                }
                if (apq == 0.0) continue;
                double h = aqq - app, t;
                if (fabs(h) + big == fabs(h)) {
                    t = apq / h;
                } else {
                    double theta = 0.5 * h / apq;
                    t = 1.0 / (fabs(theta) + sqrt(1.0 + theta * theta));
                    if (theta < 0.0) t = -t;
                }
                double cs = 1.0 / sqrt(t * t + 1.0), sn = t * cs, tau = sn / (1.0 + cs);
                A[p * n + p] = app - t * apq;
                A[q * n + q] = aqq + t * apq;
                A[p * n + q] = A[q * n + p] = 0.0;
                for (int r = 0; r < n; r++) {
                    if (r != p && r != q) {
                        double arp = A[r * n + p], arq = A[r * n + q];
                        A[r * n + p] = A[p * n + r] = arp - sn * (arq + tau * arp);
                        A[r * n + q] = A[q * n + r] = arq + sn * (arp - tau * arq);
                    }
                    double vrp = V[r * n + p], vrq = V[r * n + q];
                    V[r * n + p] = vrp - sn * (vrq + tau * vrp);
                    V[r * n + q] = vrq + sn * (vrp - tau * vrq);
                }
            }
        }
    }
    for (int j = 0; j < n; j++) order[j] = j;
    for (int j = 1; j < n; j++) /* descending eigenvalues, stable */
        for (int i = j; i > 0 && A[order[i] * n + order[i]] > A[order[i - 1] * n + order[i - 1]]; i--) {
            int tmp = order[i];
            order[i] = order[i - 1];
            order[i - 1] = tmp;
        }
    for (int j = 0; j < n; j++) {
        double e = A[order[j] * n + order[j]];
        ev[j] = e > 0.0 ? e : 0.0;
    }
    double top = ev[0];
    for (int j = 0; j < n; j++) {
        if (!(ev[j] > GRAM_RTOL * top)) ev[j] = 0.0;
        int pivot = 0;
        double most = -1.0;
        for (int t = 0; t < n; t++) {
            double u = g[t * n + t] > 0.0 ? V[t * n + order[j]] : 0.0;
            U[t * n + j] = u;
            if (fabs(u) > most) {
                most = fabs(u);
                pivot = t;
            }
        }
        if (U[pivot * n + j] < 0.0)
            for (int t = 0; t < n; t++) U[t * n + j] = -U[t * n + j];
    }
    double votes = 0.0, elected[MIX_MAX];
    for (int j = 0; j < n; j++) {
        double score = 0.0;
        if (ev[j] > 0.0)
            for (int t = 0; t < n; t++) {
                double u = U[t * n + j];
                score += sign_count ? (double)((u > 0.0) - (u < 0.0)) : u;
            }
        elected[j] = (double)((score > 0.0) - (score < 0.0));
        votes += elected[j];
    }
    double majority = votes >= 0.0 ? 1.0 : -1.0;
    int rank = n;
    if (eta < 1.0) {
        double total = 0.0, cum = 0.0;
        int below = 0;
        for (int j = 0; j < n; j++) total += ev[j];
        for (int j = 0; j < n; j++) {
            cum += ev[j];
            below += total > 0.0 && cum / total < eta;
        }
        rank = below + 1 < n ? below + 1 : n;
    }
    for (int j = 0; j < n; j++) {
        double sign = elected[j] != 0.0 ? elected[j] : majority, sum = 0.0;
        int agree = 0;
        if (ev[j] > 0.0 && j < rank)
            for (int t = 0; t < n; t++) {
                double u = U[t * n + j];
                if (u != 0.0 && (u > 0.0) == (sign > 0.0)) {
                    sum += u;
                    agree++;
                }
            }
        w[j] = agree > 0 ? sum / (double)agree : 0.0;
    }
    for (int t = 0; t < n; t++) {
        double acc = 0.0;
        for (int j = 0; j < n; j++) acc += U[t * n + j] * w[j];
        a[t] = acc;
    }
}

/* orthogonal_mix_row for each of `rows` Gram matrices gram[(k * T + s) * T + t]; mix[t * rows + k] = a_t (float64).
 * -1 when T is outside 1..MIX_MAX. */
NM_CLONES int64_t nm_orthogonal_mix(int64_t rows, int n_models, const double *gram, double eta, int sign_count,
                                    double *mix) {
    double a[MIX_MAX];
    if (n_models < 1 || n_models > MIX_MAX) return -1;
    for (int64_t k = 0; k < rows; k++) {
        orthogonal_mix_row(n_models, gram + (size_t)k * (size_t)n_models * (size_t)n_models, eta, sign_count, a);
        for (int t = 0; t < n_models; t++) mix[(size_t)t * (size_t)rows + (size_t)k] = a[t];
    }
    return 0;
}

/* NeuroMerging with lambda1 = 0 in one sweep: per row k, neuro_split_row, orthogonal_mix_row (mix rounded to fp32) and
 * theta = b + lam2 (a_0 o_0 + a_1 o_1 + ...) written in out_dtype, while the row is still in cache: the arithmetic of
 * nm_neuro_first + nm_orthogonal_mix + nm_neuro_second, without reading the inputs twice. stats[0]: NaN/Inf inputs
 * (the output is then to be discarded), stats[1]: NaN/Inf outputs; energy[0..1] as in neuro_split_row. -1 when T is
 * outside 1..MIX_MAX, -2 on a failed allocation. */
NM_CLONES int64_t nm_neuro_rows(int64_t rows, int64_t d, int n_models, const void *base, const void *const *models,
                                int in_dtype, const float *weights, const float *thresholds, double eta,
                                int sign_count, float lam2, void *out, int out_dtype, double *energy, int64_t *stats) {
    float x[BLOCK], c[MIX_MAX], a32[MIX_MAX];
    double g[MIX_MAX * MIX_MAX], a[MIX_MAX], nb, sums[2] = {0.0, 0.0};
    int64_t bad_in = 0, bad_out = 0;
    row_buffers r;
    if (n_models < 1 || n_models > MIX_MAX) return -1;
    if (!row_buffers_alloc(&r, d, n_models)) return -2;
    for (int64_t k = 0; k < rows; k++) {
        bad_in += neuro_split_row(k, d, n_models, base, models, in_dtype, weights, thresholds, r.b, x, r.y, c, g, &nb,
                                  sums);
        orthogonal_mix_row(n_models, g, eta, sign_count, a);
        for (int t = 0; t < n_models; t++) a32[t] = (float)a[t];
        orthogonal_output(d, n_models, r.b, r.y, c, a32, lam2, r.acc);
        for (int64_t s0 = 0; s0 < d; s0 += BLOCK) {
            int64_t m = d - s0 < BLOCK ? d - s0 : BLOCK;
            bad_out += store_block(out, out_dtype, k * d + s0, m, r.acc + s0);
        }
    }
    row_buffers_free(&r);
    energy[0] += sums[0];
    energy[1] += sums[1];
    stats[0] = bad_in;
    stats[1] = bad_out;
    return 0;
}

/* NeuroMerging, second sweep: per row k, o_t = tau'_t - coef_t b as in nm_neuro_first, and
 * theta = b + lam2 (mix_0 o_0 + mix_1 o_1 + ...) [+ lam1 (par[k] b)], written in out_dtype. Returns NaN/Inf outputs
 * (negative on a failed allocation). */
NM_CLONES int64_t nm_neuro_second(int64_t rows, int64_t d, int n_models, const void *base, const void *const *models,
                                  int in_dtype, const float *weights, const float *thresholds, const float *coef,
                                  const float *mix, const float *par, float lam1, float lam2, void *out,
                                  int out_dtype) {
    float x[BLOCK], c[MAX_MODELS], a[MAX_MODELS];
    int64_t bad = 0;
    row_buffers r;
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    if (!row_buffers_alloc(&r, d, n_models)) return -2;
    for (int64_t k = 0; k < rows; k++) {
        neuro_row(k, d, n_models, base, models, in_dtype, weights, thresholds, r.b, x, r.y);
        for (int t = 0; t < n_models; t++) {
            c[t] = coef[(size_t)t * (size_t)rows + (size_t)k];
            a[t] = mix[(size_t)t * (size_t)rows + (size_t)k];
        }
        orthogonal_output(d, n_models, r.b, r.y, c, a, lam2, r.acc);
        if (lam1 != 0.0f) {
            float p = par[k];
            for (int64_t i = 0; i < d; i++) r.acc[i] = r.acc[i] + lam1 * (p * r.b[i]);
        }
        for (int64_t s0 = 0; s0 < d; s0 += BLOCK) {
            int64_t m = d - s0 < BLOCK ? d - s0 : BLOCK;
            bad += store_block(out, out_dtype, k * d + s0, m, r.acc + s0);
        }
    }
    row_buffers_free(&r);
    return bad;
}

/* The statistics pass's histograms (neuromerge/engine/stats.py) of key = the fp32 bits of |x - b|, an int32 monotone
 * in the magnitude, added into the given arrays. They return the number of NaN/Inf inputs (their entries are counted
 * too: the caller then discards the arrays).
 *
 * A window is the high bins [lo_key >> 16, hi_key >> 16): its entries are counted by their key at
 * low_counts[key - lo_key] (their L1 mass is count * value). A window holds a few percent of the entries, so they are
 * found with vector comparisons and only they are scattered.
 *
 * L1 masses are exact integers: a significand sum S in slot s stands for S * 2^(max(s, 1) - 150) (an entry is its
 * 24-bit significand in the slot of its exponent e = key >> 23). */

/* The smallest non-zero and the largest exponent slot max(e, 1) of a block's keys, and the float64 sums of the entries
 * below / above the window; the sums are exact when the exponents span at most 19 (see block_mass). Portable code. */
static inline __attribute__((always_inline)) void block_mass_sums(const int32_t *key, int64_t m, int32_t lo,
                                                                  int32_t hi, double *sums, int32_t *range) {
    int32_t emax = 1, emin = 255;
    for (int64_t j = 0; j < m; j++) {
        int32_t e = key[j] >> 23;
        e = e > 1 ? e : 1;
        emax = e > emax ? e : emax;
        int32_t nz = key[j] != 0 ? e : 255;
        emin = nz < emin ? nz : emin;
    }
    range[0] = emin;
    range[1] = emax;
    if (emin == 255 || emax - emin > 19 || emax >= 200) return;
    /* integer sums of the significands shifted by their exponent's distance from emin (< 2^43 each): exact in int64 */
    int64_t below = 0, above = 0;
    for (int64_t j = 0; j < m; j++) {
        uint32_t k = (uint32_t)key[j];
        int32_t e = (int32_t)(k >> 23);
        int32_t shift = (e > 1 ? e : 1) - emin;
        int64_t v = sig24(k) << (shift > 0 ? shift : 0); /* a zero entry (shift < 0) is 0 */
        below += key[j] < lo ? v : 0;
        above += key[j] >= hi ? v : 0;
    }
    sums[0] = ldexp((double)below, emin - 150);
    sums[1] = ldexp((double)above, emin - 150);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define NM_AVX2_PATHS 1
/* block_mass_sums with AVX2: each fp32 entry (its key) masked by the window comparisons and converted to float64
 * exactly, four lanes per sum; when the span condition holds every partial sum is exact, so the lane order does not
 * matter and the result equals the portable one (tested both ways, nm_set_portable). */
__attribute__((target("avx2"))) static void block_mass_sums_avx2(const int32_t *key, int64_t m, int32_t lo, int32_t hi,
                                                                  double *sums, int32_t *range) {
    __m256d b0 = _mm256_setzero_pd(), b1 = b0, a0 = b0, a1 = b0;
    const __m256i vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi), one = _mm256_set1_epi32(1);
    const __m256i zero = _mm256_setzero_si256(), none = _mm256_set1_epi32(255);
    __m256i vmax = one, vmin = none;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(key + j));
        __m256i e = _mm256_max_epi32(_mm256_srli_epi32(k, 23), one);
        vmax = _mm256_max_epi32(vmax, e);
        vmin = _mm256_min_epi32(vmin, _mm256_or_si256(e, _mm256_and_si256(_mm256_cmpeq_epi32(k, zero), none)));
        __m256 below = _mm256_castsi256_ps(_mm256_and_si256(k, _mm256_cmpgt_epi32(vlo, k)));
        __m256 above = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(vhi, k), k));
        b0 = _mm256_add_pd(b0, _mm256_cvtps_pd(_mm256_castps256_ps128(below)));
        b1 = _mm256_add_pd(b1, _mm256_cvtps_pd(_mm256_extractf128_ps(below, 1)));
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(above)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(above, 1)));
    }
    int32_t lanes[8], emax = 1, emin = 255;
    _mm256_storeu_si256((__m256i *)lanes, vmax);
    for (int l = 0; l < 8; l++) emax = lanes[l] > emax ? lanes[l] : emax;
    _mm256_storeu_si256((__m256i *)lanes, vmin);
    for (int l = 0; l < 8; l++) emin = lanes[l] < emin ? lanes[l] : emin;
    double sb[4], sa[4];
    _mm256_storeu_pd(sb, _mm256_add_pd(b0, b1));
    _mm256_storeu_pd(sa, _mm256_add_pd(a0, a1));
    double below = (sb[0] + sb[1]) + (sb[2] + sb[3]), above = (sa[0] + sa[1]) + (sa[2] + sa[3]);
    for (; j < m; j++) {
        int32_t k = key[j];
        int32_t e = k >> 23;
        e = e > 1 ? e : 1;
        emax = e > emax ? e : emax;
        if (k != 0) emin = e < emin ? e : emin;
        below += k < lo ? (double)bits_to_f32((uint32_t)k) : 0.0;
        above += k >= hi ? (double)bits_to_f32((uint32_t)k) : 0.0;
    }
    range[0] = emin;
    range[1] = emax;
    sums[0] = below;
    sums[1] = above;
}
#endif

#ifdef NM_AVX2_PATHS
/* The window's entries counted by their key (low_counts[key - lo]++), found 8 at a time with a comparison mask; returns
 * the number of entries above the window (key >= hi). The portable code in nm_abs_window does the same. */
__attribute__((target("avx2"))) static int64_t window_counts_avx2(const int32_t *key, int64_t m, int32_t lo,
                                                                   int32_t hi, int64_t *low_counts) {
    const __m256i below_lo = _mm256_set1_epi32(lo - 1), vhi = _mm256_set1_epi32(hi);
    __m256i above = _mm256_setzero_si256();
    int64_t j = 0, n_above = 0;
    for (; j + 8 <= m; j += 8) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(key + j));
        __m256i under_hi = _mm256_cmpgt_epi32(vhi, k);
        above = _mm256_sub_epi32(above, _mm256_xor_si256(under_hi, _mm256_set1_epi32(-1)));
        uint32_t mask = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_and_si256(_mm256_cmpgt_epi32(k, below_lo), under_hi)));
        while (mask) {
            low_counts[key[j + __builtin_ctz(mask)] - lo]++;
            mask &= mask - 1;
        }
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, above);
    for (int l = 0; l < 8; l++) n_above += lanes[l];
    for (; j < m; j++) {
        n_above += key[j] >= hi;
        if (key[j] >= lo && key[j] < hi) low_counts[key[j] - lo]++;
    }
    return n_above;
}
#endif

/* tests: nm_set_portable(1) makes the window pass take its portable code on any CPU */
static int nm_portable = 0;
void nm_set_portable(int on) { nm_portable = on; }

/* whether the window pass takes its AVX2 code: decided once per call, for the counts and the masses alike */
static int window_avx2(void) {
#ifdef NM_AVX2_PATHS
    return !nm_portable && __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* The exact L1 masses of a block's entries below (key < lo) and above (key >= hi) the window, added to
 * mass[s] and mass[256 + s]. When the block's non-zero exponents span at most 19 (and stay below 200), every entry
 * is a multiple of 2^(e0 - 150) below 2^(e0 - 150 + 43), e0 the smallest one, so the block's two sums (at most 1024
 * entries) are exact in any order (block_mass_sums); each, an integer in units of 2^(e0 - 150), is split over the
 * slots e0 and e0 + 24. Other blocks (tiny and large values together) add each entry to its own slot. */
static inline __attribute__((always_inline)) void block_mass(const int32_t *key, int64_t m, int32_t lo, int32_t hi,
                                                             int avx2, int64_t *mass) {
    double sums[2];
    int32_t range[2];
#ifdef NM_AVX2_PATHS
    if (avx2)
        block_mass_sums_avx2(key, m, lo, hi, sums, range);
    else
#endif
        block_mass_sums(key, m, lo, hi, sums, range);
    int32_t emin = range[0], emax = range[1];
    if (emin == 255) return; /* all zero */
    if (emax - emin <= 19 && emax < 200) {
        /* the sums are exact: integers in units of 2^(emin - 150), below 2^53, split over the slots emin, emin + 24 */
        int64_t below = (int64_t)ldexp(sums[0], 150 - emin), above = (int64_t)ldexp(sums[1], 150 - emin);
        mass[emin] += below & 0xFFFFFF;
        mass[emin + 24] += below >> 24;
        mass[256 + emin] += above & 0xFFFFFF;
        mass[256 + emin + 24] += above >> 24;
        return;
    }
    for (int64_t j = 0; j < m; j++) {
        uint32_t k = (uint32_t)key[j];
        int32_t e = (int32_t)(k >> 23);
        if (key[j] < lo) mass[e > 1 ? e : 1] += sig24(k);
        else if (key[j] >= hi) mass[256 + (e > 1 ? e : 1)] += sig24(k);
    }
}

/* By the high 16 bits (2^15 bins): high_counts, and (when not NULL) high_mass, the int64 sum of the entries'
 * significands per bin (an exact L1 mass: every entry of a high bin has the same exponent). */
NM_CLONES int64_t nm_abs_hist(int64_t n, const void *base, const void *model, int in_dtype, int64_t *high_counts,
                              int64_t *high_mass) {
    float b[BLOCK], x[BLOCK];
    int32_t key[BLOCK];
    int64_t bad = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        bad += load_block(base, in_dtype, start, m, b);
        bad += load_block(model, in_dtype, start, m, x);
        for (int64_t j = 0; j < m; j++) key[j] = (int32_t)f32_to_bits(fabsf(x[j] - b[j]));
        if (high_mass) {
            for (int64_t j = 0; j < m; j++) {
                uint32_t h = (uint32_t)key[j] >> 16;
                high_counts[h]++;
                high_mass[h] += sig24((uint32_t)key[j]);
            }
        } else {
            for (int64_t j = 0; j < m; j++) high_counts[(uint32_t)key[j] >> 16]++;
        }
    }
    return bad;
}

/* Around a predicted threshold, without the full histogram: the window's counts, counts[0] += the entries above the
 * window (key >= hi_key, a vectorized comparison), counts[1] += all entries, and (when not NULL) the exact L1
 * masses of the entries below and above the window in mass (2 x 256 slots). */
NM_CLONES int64_t nm_abs_window(int64_t n, const void *base, const void *model, int in_dtype, int64_t lo_key,
                                int64_t hi_key, int64_t *low_counts, int64_t *counts, int64_t *mass) {
    float b[BLOCK], x[BLOCK];
    int32_t key[BLOCK], inside[BLOCK], idx[BLOCK];
    int64_t bad = 0, above = 0;
    const int32_t lo = (int32_t)lo_key, hi = (int32_t)hi_key;
    const int avx2 = window_avx2();
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        bad += load_block(base, in_dtype, start, m, b);
        bad += load_block(model, in_dtype, start, m, x);
#ifdef NM_AVX2_PATHS
        if (avx2) {
            for (int64_t j = 0; j < m; j++) key[j] = (int32_t)f32_to_bits(fabsf(x[j] - b[j]));
            above += window_counts_avx2(key, m, lo, hi, low_counts);
        } else
#endif
        {
            int32_t a = 0;
            for (int64_t j = 0; j < m; j++) {
                int32_t k = (int32_t)f32_to_bits(fabsf(x[j] - b[j]));
                key[j] = k;
                a += k >= hi;
                inside[j] = (k >= lo) & (k < hi);
            }
            above += a;
            int32_t in = 0;
            nonzero_positions(inside, m, idx, &in);
            for (int32_t q = 0; q < in; q++) low_counts[key[idx[q]] - lo]++;
        }
        if (mass) block_mass(key, m, lo, hi, avx2, mass);
    }
    counts[0] += above;
    counts[1] += n;
    return bad;
}

/* Version of the kernels' signatures: neuromerge.kernels refuses a library whose number differs from its own (a stale
 * build left in place by a failed rebuild), instead of calling it with the wrong arguments. */
#define NM_ABI 8
int64_t nm_abi(void) { return NM_ABI; }

/* The extension module itself is empty: it exists so that setuptools builds and installs the shared library,
 * which neuromerge.kernels loads with ctypes. */
static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_fused", "fused merge kernels (see ctypes)", -1,
                                          NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&fused_module); }
