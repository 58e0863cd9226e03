/* Sampling one token per row from bf16 logits at temperature T, no truncation: one kernel call.
 *
 * What rlft.engines.sampling.sample_tokens computes for such rows (RL sampling's common case),
 * without its float32 [B, V] intermediate (12.6 MB at 64 x 49,152) and its eight passes over it:
 *     z = x / T (float32; x itself when T == 1), zmax = max z, w = exp(z - zmax)
 *     block sums of 256 entries, their running sum (cdf), total = the last
 *     target = u * total; the first block whose cdf exceeds it, then the first entry inside it
 *     whose running sum exceeds what is left (clamped below the block's own sum: never a zero weight)
 *     logprob = z_token - zmax - log(total)
 * The same roundings except exp (a ~1 ulp polynomial, simd.h) and the order of the block sums'
 * float32 additions: a draw can differ only where u * total falls within ~1e-7 of a boundary.
 *
 * Rows run in parallel (OpenMP). Needs AVX-512 F/BW (rlft.kernels.build). Left out: top-p,
 * top-k, greedy rows, float32 logits (the torch path handles them).
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#define BLOCK 256
#define MAX_BLOCKS 4096 /* vocabularies up to ~1M entries */

/* exp(z - zmax) for n <= 16 entries of a row at p (z = x, or x / T when divide) */
static inline __m512 weights(const uint16_t *p, int n, int divide, __m512 t, __m512 zmax) {
    __m512 x = load_any(p, n);
    if (divide) x = _mm512_div_ps(x, t);
    __m512 w = exp_ps(_mm512_sub_ps(x, zmax));
    return _mm512_maskz_mov_ps(tail_mask(n), w);
}

/* logits: [B, V] with row stride row; temperature, uniform: [B] (T > 0, u in [0, 1)).
 * Writes tokens [B] and logprobs [B]. Returns 0, or -1 for a vocabulary it does not handle. */
int rlft_sample_plain(const uint16_t *logits, long row, int B, int V, const float *temperature,
                      const float *uniform, int64_t *tokens, float *logprobs) {
    const int nb = (V + BLOCK - 1) / BLOCK;
    if (V < 1 || nb > MAX_BLOCKS) return -1;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; ++b) {
        const uint16_t *x = logits + b * row;
        const float T = temperature[b];
        const int divide = T != 1.0f;
        const __m512 t = _mm512_set1_ps(T);
        /* max of the bf16 values (exact); dividing by T > 0 keeps the argmax: max(x / T) = max(x) / T */
        const float xmax = max_bf16(x, V), zmax = divide ? xmax / T : xmax;
        const __m512 vzmax = _mm512_set1_ps(zmax);
        float sums[MAX_BLOCKS], cdf[MAX_BLOCKS];
        float running = 0.0f;
        for (int k = 0; k < nb; ++k) {
            const int end = (k + 1) * BLOCK < V ? (k + 1) * BLOCK : V;
            __m512 acc = _mm512_setzero_ps();
            for (int i = k * BLOCK; i < end; i += 16) acc = _mm512_add_ps(acc, weights(x + i, end - i, divide, t, vzmax));
            sums[k] = _mm512_reduce_add_ps(acc);
            cdf[k] = running += sums[k];
        }
        const float total = running, target = uniform[b] * total;
        int k = 0;
        while (k < nb - 1 && cdf[k] <= target) ++k;
        const int start = k * BLOCK, end = start + BLOCK < V ? start + BLOCK : V;
        float w[BLOCK] __attribute__((aligned(64)));
        for (int i = start; i < end; i += 16) _mm512_store_ps(w + (i - start), weights(x + i, end - i, divide, t, vzmax));
        float inner[BLOCK], sum = 0.0f;
        for (int i = 0; i < end - start; ++i) inner[i] = sum += w[i];
        const float before = cdf[k] - sums[k];
        float rest = target - before;
        if (rest < 0.0f) rest = 0.0f;
        const float below = nextafterf(inner[end - start - 1], 0.0f);
        if (rest > below) rest = below;
        int j = 0;
        while (j < end - start - 1 && inner[j] <= rest) ++j;
        const int token = start + j;
        uint32_t bits = (uint32_t)x[token] << 16;
        float xt;
        __builtin_memcpy(&xt, &bits, sizeof xt);
        const float zt = divide ? xt / T : xt;
        tokens[b] = token;
        logprobs[b] = (zt - zmax) - logf(total);
    }
    return 0;
}
