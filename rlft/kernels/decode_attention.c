/* One decode step's attention over a KV cache, in one pass per (row, KV head): bf16 in, bf16 out.
 *
 * For each row b and KV head h, the G query heads that share h (grouped-query attention) read the
 * row's K and V slots once per block of three heads:
 *     scores_G,L = round_bf16(q_G,D . k_L,D * scale), masked slots -inf
 *     probs_G,L  = round_bf16(softmax_fp32(scores))
 *     out_G,D    = round_bf16(sum_L probs * v_L,D)          (fp32 accumulation)
 * the roundings of rlft's four-op path (baddbmm, float32 softmax, cast, bmm), so the result differs
 * from it only in the order of fp32 sums (measured: ~0.05 % of outputs off by one bf16 step).
 *
 * Why: at SmolLM2's shapes a bf16 bmm is 192 tiny matmuls (3 x 64 by 64 x ~120) per layer, each
 * paying a kernel's overhead; here each (row, head) is a few hundred FMAs over 2 x L x 128 bytes
 * streamed from memory once, with software prefetch because each stream is only a few pages long:
 * K rows a few slots ahead into L1; while the scores are computed, this task's V rows into L2; while
 * V is summed, the next task's K rows into L2 (the last two took a 30-layer step's attention from
 * ~11.3 to ~8.5 ms at 121 slots on the 2-core AMX VM, benchmarks/README.md; a distance-only change
 * of the L1 prefetch had not helped).
 *
 * Needs AVX-512 F/BW/VL and AVX512-BF16 (compiled with -march=native; rlft.kernels.build falls back
 * to the torch path where the compiler refuses). Threads: OpenMP, the runtime torch already loaded
 * (libgomp.so.1), so the thread count is torch.get_num_threads(). Left out: other dtypes, head_dim
 * not a multiple of 16 or over 256, causal masks within the step (one query per row only).
 */
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define GB 3          /* query heads per register block */
#define PREFETCH 8    /* slots ahead */
#define MASKED -1e30f /* exp(MASKED - max) == 0 in fp32, without infinities */

/* Prefetch one K or V row (D bf16). A macro: as a function, gcc left the loop in place and the
 * kernel was no faster than without the prefetches (measured). */
#define PREFETCH_ROW(p, D, hint)                                                                \
    do {                                                                                        \
        for (int at_ = 0; at_ < (D); at_ += 32) _mm_prefetch((const char *)((p) + at_), hint);  \
    } while (0)

/* One (row, KV head): gn <= GB query heads q[g * D ...], K and V slots [L, D], mask bytes m[L]. */
static inline __attribute__((always_inline)) void attend_block(
    const uint16_t *q, const uint16_t *kb, const uint16_t *vb, const uint8_t *m, uint16_t *out,
    int gn, int L, float scale, float *s, const int NC, const uint16_t *next_k) {
    const int D = 16 * NC, Lp = (L + 15) & ~15;
    __m512 qf[GB][NC], acc[GB][NC];
    for (int g = 0; g < GB; ++g)
        for (int c = 0; c < NC; ++c) {
            qf[g][c] = g < gn ? load_bf16(q + g * D + 16 * c) : _mm512_setzero_ps();
            acc[g][c] = _mm512_setzero_ps();
        }
    /* scores: one K row in registers against the block's query heads */
    for (int t = 0; t < L; ++t) {
        _mm_prefetch((const char *)(kb + (long)(t + PREFETCH) * D), _MM_HINT_T0);
        if (D > 32) _mm_prefetch((const char *)(kb + (long)(t + PREFETCH) * D + 32), _MM_HINT_T0);
        PREFETCH_ROW(vb + (long)t * D, D, _MM_HINT_T2); /* this V row into L2, read after the scores */
        if (!m[t]) continue;
        __m512 kf[NC];
        for (int c = 0; c < NC; ++c) kf[c] = load_bf16(kb + (long)t * D + 16 * c);
        for (int g = 0; g < gn; ++g) {
            __m512 a = _mm512_mul_ps(qf[g][0], kf[0]);
            for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qf[g][c], kf[c], a);
            s[g * Lp + t] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    /* softmax per head, 16 slots at a time; masked slots and the tail past L weigh 0 */
    for (int g = 0; g < gn; ++g) {
        float *sg = s + g * Lp;
        __m512 mx = _mm512_set1_ps(MASKED);
        for (int t = 0; t < Lp; t += 16) {
            __mmask16 live = tail_mask(L - t);
            __m128i bytes = _mm_maskz_loadu_epi8(live, m + t);
            __mmask16 keep = _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0xFF));
            __m512 x = _mm512_mask_blend_ps(keep, _mm512_set1_ps(MASKED), round_bf16(_mm512_load_ps(sg + t)));
            _mm512_store_ps(sg + t, x);
            mx = _mm512_max_ps(mx, x);
        }
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
        for (int t = 0; t < Lp; t += 16) {
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(sg + t), top));
            _mm512_store_ps(sg + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        float total = _mm512_reduce_add_ps(sum);
        __m512 inv = _mm512_set1_ps(total > 0 ? 1.0f / total : 0.0f);
        for (int t = 0; t < Lp; t += 16) _mm512_store_ps(sg + t, round_bf16(_mm512_mul_ps(_mm512_load_ps(sg + t), inv)));
    }
    /* probs @ V: one V row in registers for the block's heads */
    for (int t = 0; t < L; ++t) {
        _mm_prefetch((const char *)(vb + (long)(t + PREFETCH) * D), _MM_HINT_T0);
        if (D > 32) _mm_prefetch((const char *)(vb + (long)(t + PREFETCH) * D + 32), _MM_HINT_T0);
        if (next_k) PREFETCH_ROW(next_k + (long)t * D, D, _MM_HINT_T2); /* the next task's K row into L2 */
        if (!m[t]) continue;
        __m512 vf[NC];
        for (int c = 0; c < NC; ++c) vf[c] = load_bf16(vb + (long)t * D + 16 * c);
        for (int g = 0; g < gn; ++g) {
            __m512 p = _mm512_set1_ps(s[g * Lp + t]);
            for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
        }
    }
    for (int g = 0; g < gn; ++g)
        for (int c = 0; c < NC; ++c)
            _mm256_storeu_si256((__m256i *)(out + g * D + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[g][c]));
}

static void attend(const uint16_t *q, const uint16_t *kb, const uint16_t *vb, const uint8_t *m, uint16_t *out,
                   int gn, int L, float scale, float *s, int nc, const uint16_t *next_k) {
    switch (nc) { /* constant head sizes: the accumulators stay in registers */
    case 1: attend_block(q, kb, vb, m, out, gn, L, scale, s, 1, next_k); break;
    case 2: attend_block(q, kb, vb, m, out, gn, L, scale, s, 2, next_k); break;
    case 4: attend_block(q, kb, vb, m, out, gn, L, scale, s, 4, next_k); break;
    case 8: attend_block(q, kb, vb, m, out, gn, L, scale, s, 8, next_k); break;
    default: attend_block(q, kb, vb, m, out, gn, L, scale, s, 16, next_k); break; /* nc <= 16: padded */
    }
}

/* q: [B, KV * G, D] with row stride q_row (elements; heads contiguous); k, v: [B, KV, cap, D];
 * mask: [B, L] bytes (0 = padding); out: [B, KV * G, D]. Returns 0, or -1 for shapes not handled. */
int rlft_decode_attention(const uint16_t *q, long q_row, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                          uint16_t *out, int B, int KV, int G, int cap, int L, int D, float scale) {
    if (D % 16 || D > 256 || L > cap || L < 1) return -1;
    const int nc = D / 16, Lp = (L + 15) & ~15;
    if (nc != 1 && nc != 2 && nc != 4 && nc != 8 && nc != 16) return -1;
    int failed = 0;
#pragma omp parallel
    {
        float *s = aligned_alloc(64, sizeof(float) * GB * (size_t)Lp);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int task = 0; task < B * KV; ++task) {
            if (!s) continue;
            int b = task / KV, h = task % KV;
            const uint16_t *kb = k + (long)task * cap * D, *vb = v + (long)task * cap * D;
            for (int g0 = 0; g0 < G; g0 += GB) {
                int head = h * G + g0;
                /* the last head block of a task also fetches the next task's K (same thread, static schedule) */
                const uint16_t *next_k = g0 + GB >= G && task + 1 < B * KV ? kb + (long)cap * D : NULL;
                attend(q + b * q_row + (long)head * D, kb, vb, mask + (long)b * L,
                       out + ((long)b * KV * G + head) * D, G - g0 < GB ? G - g0 : GB, L, scale, s, nc, next_k);
            }
        }
        free(s);
    }
    return failed ? -2 : 0;
}
