/* Log-softmax at one token per row, from bf16 logits, forward and backward: float32 inside.
 *
 * The update needs log p(token) at each sampled position and the entropy there (a metric): per
 * row of logits z (V entries, bf16) at temperature T, with x = z / T,
 *     lse = log sum exp(x);  logp = x[target] - lse;  entropy = lse - sum p x  (p = exp(x - lse))
 * and in the backward, for the gradient g of logp,
 *     dz = g (onehot(target) - p) / T   (bf16, the dtype of the logits the head's matmul made)
 * torch spends five full float32 passes on this per chunk of rows (the cast, log_softmax, the
 * entropy's exp and product, the one-hot gather's backward fill, log_softmax's backward); here the
 * forward is two passes over each bf16 row (its max, then the sums) and the backward one.
 * exp is simd.h's (~1 ulp), so results differ from torch's in the last bits.
 *
 * Needs AVX-512 F/BW/VL and AVX512-BF16 (-march=native; rlft.kernels.build falls back to the torch
 * path where the compiler refuses). Threads: OpenMP over rows. Left out: soft-capped logits, other dtypes.
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } c = {(uint32_t)x << 16};
    return c.f;
}

/* z: [C, V] bf16 with row stride ld (elements); targets: [C] int64 in [0, V); inv_t = 1 / T.
 * Writes logp [C], lse [C] and, when ent is not NULL, the entropies [C]. Returns 0, or -1 for a target out of range. */
int rlft_token_logprobs_fwd(const uint16_t *z, long ld, const int64_t *targets, int C, int V, float inv_t,
                            float *logp, float *lse, float *ent) {
    int bad = 0;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; ++c) {
        const uint16_t *row = z + (long)c * ld;
        const int64_t t = targets[c];
        if (t < 0 || t >= V) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        const float top = max_bf16(row, V) * inv_t; /* inv_t > 0: the max of x */
        const __m512 vi = _mm512_set1_ps(inv_t), vm = _mm512_set1_ps(top);
        __m512 sum = _mm512_setzero_ps(), sx = _mm512_setzero_ps();
        for (long v = 0; v < V; v += 16) {
            const __mmask16 m = tail_mask(V - v);
            const __m512 x = _mm512_mul_ps(load_any(row + v, V - v), vi);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(x, vm)));
            sum = _mm512_add_ps(sum, e);
            if (ent) sx = _mm512_fmadd_ps(e, _mm512_maskz_mov_ps(m, x), sx);
        }
        const float s = _mm512_reduce_add_ps(sum), l = top + logf(s);
        lse[c] = l;
        logp[c] = bf16_to_float(row[t]) * inv_t - l;
        if (ent) ent[c] = l - _mm512_reduce_add_ps(sx) / s;
    }
    return bad ? -1 : 0;
}

/* dz [C, V] bf16 (contiguous) = g (onehot(target) - p) / T from the forward's lse. */
int rlft_token_logprobs_bwd(const uint16_t *z, long ld, const int64_t *targets, const float *lse, const float *g,
                            int C, int V, float inv_t, uint16_t *dz) {
    int bad = 0;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; ++c) {
        const uint16_t *row = z + (long)c * ld;
        uint16_t *out = dz + (long)c * V;
        const int64_t t = targets[c];
        if (t < 0 || t >= V) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        const __m512 vi = _mm512_set1_ps(inv_t), vl = _mm512_set1_ps(lse[c]), coef = _mm512_set1_ps(-g[c] * inv_t);
        for (long v = 0; v < V; v += 16) {
            const __m512 p = exp_ps(_mm512_sub_ps(_mm512_mul_ps(load_any(row + v, V - v), vi), vl));
            store_bf16(out + v, _mm512_mul_ps(p, coef), (int)(V - v < 16 ? V - v : 16));
        }
        const float p_t = expf(bf16_to_float(row[t]) * inv_t - lse[c]);
        const __m512 x = _mm512_set1_ps(g[c] * inv_t * (1.0f - p_t)); /* the target's entry, rounded once */
        store_bf16(out + t, x, 1);
    }
    return bad ? -1 : 0;
}
