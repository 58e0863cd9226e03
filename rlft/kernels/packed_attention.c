/* Training attention over packed shared-prefix rows, forward and backward, visiting only the
 * (query, key) pairs a token may see: bf16 in and out, float32 inside.
 *
 * Tokens are flat (T = rows x length). Query t sees the keys in two ranges [a0, a1) and [b0, b1)
 * (qr[t] = {a0, a1, b0, b1}): a shared token its row's shared tokens up to itself, a segment
 * token its row's shared tokens and its own segment up to itself, padding none. The G query heads
 * that share a KV head (grouped-query attention) are computed together, GB at a time:
 *
 *   forward     s = q.k * scale over the seen keys; p = softmax(s); out = p v; lse = logsumexp(s)
 *   backward    dsum = dO.out; p = exp(s - lse); ds = p (dO.v - dsum);
 *               dq = scale ds k; dk = scale sum ds q, dv = sum p dO (each thread into its own
 *               float32 copy of dk, dv, summed at the end in thread order: no atomics; blocks go
 *               to threads round-robin, so the sums, and a seeded run, are the same every time)
 *
 * Queries go in blocks of consecutive tokens that see the same key ranges but for their causal
 * ends (the block's union of keys is scored, keys past a query's end masked), so each key is
 * loaded once per block, not once per query: scores 16 keys at a time from a copy of K (and V)
 * transposed to [KV head][D / 2][token] in bf16 pairs, one AVX512-BF16 dot-product instruction per
 * 16 pairs, two dimensions and query head (bf16 products exact, float32 sums; with float32 FMAs
 * instead the kernel took ~1.25x as long, measured); p v, ds k and the dk, dv sums 16 dimensions at
 * a time with the block's query heads' weights (or rows) in registers. A first version, one query at a time with a horizontal sum per
 * pair, was slower than torch's dense masked kernel on the tool_use recipe's rows (measured).
 *
 * Needs AVX-512 F/BW/VL and AVX512-BF16 (-march=native; rlft.kernels.build falls back to the torch
 * path where the compiler refuses). Threads: OpenMP (torch's libgomp pool). Left out: other dtypes,
 * head_dim not a multiple of 16 or over 256, dropout, soft-capping, sliding windows.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define GB 3  /* query heads per block (SmolLM2: 3 per KV head) */
#define QF 8  /* queries per forward block: QF x GB score accumulators */
#define QB 4  /* queries per backward block: 2 x QB x GB accumulators (scores and dO.v) */
#define AI __attribute__((always_inline))

static inline int seen(const int32_t *r) { return (r[1] - r[0]) + (r[3] - r[2]); }

typedef struct {
    int t0, nq;          /* tokens t0 .. t0 + nq - 1 */
    int a0, a1, b0, b1;  /* the union of their key ranges */
} Block;

/* Blocks of up to maxq consecutive tokens with the same a0, b0 (and B range present or not). */
static int make_blocks(const int32_t *qr, int T, int maxq, Block *out) {
    int nb = 0;
    for (int t = 0; t < T;) {
        const int32_t *r = qr + 4L * t;
        if (seen(r) == 0) {
            ++t;
            continue;
        }
        int n = 1;
        while (n < maxq && t + n < T) {
            const int32_t *x = qr + 4L * (t + n);
            if (seen(x) == 0 || x[0] != r[0] || x[2] != r[2] || (x[3] > x[2]) != (r[3] > r[2])) break;
            ++n;
        }
        const int32_t *last = qr + 4L * (t + n - 1);
        out[nb++] = (Block){t, n, r[0], last[1], r[2], last[3] > r[2] ? last[3] : r[2]};
        t += n;
    }
    return nb;
}

static inline int key_at(const Block *k, int j) { return j < k->a1 - k->a0 ? k->a0 + j : k->b0 + j - (k->a1 - k->a0); }

/* x [T, N, D] bf16 -> xt [N][D / 2][Tp]: each (d, d + 1) pair of a token as one 32-bit word, the
 * layout the AVX512-BF16 dot product takes (the tail past T zero). Inside a parallel region. */
static void transpose_pairs(const uint16_t *x, uint32_t *xt, int T, int N, int D, int Tp) {
    const int P = D / 2, chunks = (P + 15) / 16; /* pairs per head, in chunks of up to 16 */
#pragma omp for schedule(static)
    for (int task = 0; task < N * chunks; ++task) { /* up to 16 (head, pair) rows: one load per token */
        const int h = task / chunks, i = 16 * (task % chunks), w = P - i < 16 ? P - i : 16;
        uint32_t *dst = xt + ((long)h * P + i) * Tp;
        for (int t = 0; t < T; ++t) {
            uint32_t lane[16] __attribute__((aligned(64)));
            _mm512_store_si512(lane, _mm512_maskz_loadu_epi32(tail_mask(w), (const uint32_t *)(x + ((long)t * N + h) * D) + i));
            for (int c = 0; c < w; ++c) dst[(long)c * Tp + t] = lane[c];
        }
        for (int c = 0; c < w; ++c)
            for (int t = T; t < Tp; ++t) dst[(long)c * Tp + t] = 0;
    }
}

/* Scores of NX = (queries x heads) rows over keys [j0, j1): s[x * stride + at + j - j0] =
 * scale * q_x . k_j, 16 keys at a time from kt (this KV head's pairs, [D / 2][Tp]), two dimensions
 * per AVX512-BF16 dot-product instruction (bf16 products exact, float32 sums); xq[x]: the query
 * rows (bf16 pairs). With gq, vt also dp[...] = dO_x . v_j. */
static inline AI void scores(const uint32_t *const *xq, const uint32_t *kt, const uint32_t *const *gq,
                             const uint32_t *vt, int j0, int j1, int Tp, float scale, float *s, float *dp, int at,
                             int stride, const int NX, const int D) {
    for (int j = j0; j < j1; j += 16) {
        const __mmask16 m = tail_mask(j1 - j);
        __m512 a[NX], e[NX];
        for (int x = 0; x < NX; ++x) a[x] = e[x] = _mm512_setzero_ps();
        for (int i = 0; i < D / 2; ++i) {
            const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi32(m, kt + (long)i * Tp + j);
            for (int x = 0; x < NX; ++x) a[x] = _mm512_dpbf16_ps(a[x], (__m512bh)_mm512_set1_epi32(xq[x][i]), kv);
            if (gq) {
                const __m512bh vv = (__m512bh)_mm512_maskz_loadu_epi32(m, vt + (long)i * Tp + j);
                for (int x = 0; x < NX; ++x) e[x] = _mm512_dpbf16_ps(e[x], (__m512bh)_mm512_set1_epi32(gq[x][i]), vv);
            }
        }
        for (int x = 0; x < NX; ++x) {
            _mm512_mask_storeu_ps(s + (long)x * stride + at + j - j0, m, _mm512_mul_ps(a[x], _mm512_set1_ps(scale)));
            if (gq) _mm512_mask_storeu_ps(dp + (long)x * stride + at + j - j0, m, e[x]);
        }
    }
}

/* -inf on the union's keys past query t's own ends (its row: n = nA + nB scores). */
static inline void mask_past_end(float *row, const Block *k, const int32_t *r) {
    const int nA = k->a1 - k->a0, n = nA + k->b1 - k->b0;
    for (int j = r[1] - k->a0; j < nA; ++j) row[j] = -INFINITY;
    for (int j = nA + (r[3] > r[2] ? r[3] - k->b0 : 0); j < n; ++j) row[j] = -INFINITY;
}

/* Softmax weights in place over n scores (at least one finite): returns the logsumexp. */
static inline float softmax_inplace(float *s, int n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n; t += 16) mx = _mm512_mask_max_ps(mx, tail_mask(n - t), mx, _mm512_maskz_loadu_ps(tail_mask(n - t), s + t));
    const float top = _mm512_reduce_max_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(tail_mask(n - t), s + t), _mm512_set1_ps(top));
        const __m512 e = _mm512_maskz_mov_ps(tail_mask(n - t), exp_ps(x));
        _mm512_mask_storeu_ps(s + t, tail_mask(n - t), e);
        sum = _mm512_add_ps(sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    for (int t = 0; t < n; t += 16)
        _mm512_mask_storeu_ps(s + t, tail_mask(n - t),
                              _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(n - t), s + t), _mm512_set1_ps(1.0f / total)));
    return top + logf(total);
}

/* acc[x] = sum_j w[x * stride + j] * row(key j)[16c .. 16c + 16] for the NX rows of weights,
 * rows bf16 [*, KV, D] at KV head g; stored (times mul) through store(x, value). */
#define WEIGHTED_ROWS(NX, D, c, k, n, x_rows, g, KV, w, stride, acc)                                     \
    do {                                                                                                   \
        for (int x_ = 0; x_ < (NX); ++x_) (acc)[x_] = _mm512_setzero_ps();                                \
        for (int j_ = 0; j_ < (n); ++j_) {                                                                \
            const __m512 v_ = load_bf16((x_rows) + ((long)key_at(k, j_) * (KV) + (g)) * (D) + 16 * (c)); \
            for (int x_ = 0; x_ < (NX); ++x_)                                                              \
                (acc)[x_] = _mm512_fmadd_ps(_mm512_set1_ps((w)[(long)x_ * (stride) + j_]), v_, (acc)[x_]);  \
        }                                                                                                  \
    } while (0)

/* Forward for one block of queries and one KV head g (heads h .. h + GN - 1). */
static inline AI void fwd_block(const uint16_t *q, const uint32_t *kt, const uint16_t *v, const int32_t *qr,
                                uint16_t *out, float *lse, const Block *k, int g, int h, int H, int KV, int Tp,
                                float scale, float *s, int stride, const int GN, const int NC) {
    const int D = 16 * NC, NX = QF * GN, nA = k->a1 - k->a0, n = nA + k->b1 - k->b0;
    const uint32_t *xq[NX];
    for (int i = 0; i < QF; ++i) { /* rows past the block repeat its last query (computed, not stored) */
        const long t = k->t0 + (i < k->nq ? i : k->nq - 1);
        for (int b = 0; b < GN; ++b) xq[i * GN + b] = (const uint32_t *)(q + (t * H + h + b) * D);
    }
    const uint32_t *ktg = kt + (long)g * (D / 2) * Tp;
    scores(xq, ktg, NULL, NULL, k->a0, k->a1, Tp, scale, s, NULL, 0, stride, NX, D);
    scores(xq, ktg, NULL, NULL, k->b0, k->b1, Tp, scale, s, NULL, nA, stride, NX, D);
    for (int i = 0; i < k->nq; ++i)
        for (int b = 0; b < GN; ++b) {
            float *row = s + (long)(i * GN + b) * stride;
            mask_past_end(row, k, qr + 4L * (k->t0 + i));
            lse[(long)(k->t0 + i) * H + h + b] = softmax_inplace(row, n);
        }
    for (int c = 0; c < NC; ++c) {
        __m512 acc[NX];
        WEIGHTED_ROWS(NX, D, c, k, n, v, g, KV, s, stride, acc);
        for (int i = 0; i < k->nq; ++i)
            for (int b = 0; b < GN; ++b)
                store_bf16(out + ((long)(k->t0 + i) * H + h + b) * D + 16 * c, acc[i * GN + b], 16);
    }
}

/* Backward for one block of queries and one KV head g (heads h .. h + GN - 1): dq stored, dk and
 * dv added to this thread's float32 copies dkp, dvp ([T, KV, D], unscaled). */
static inline AI void bwd_block(const uint16_t *q, const uint16_t *k_, const uint32_t *kt, const uint32_t *vt,
                                const uint16_t *out, const float *lse, const uint16_t *dout, const int32_t *qr,
                                uint16_t *dq, float *dkp, float *dvp, const Block *k, int g, int h, int H, int KV,
                                int Tp, float scale, float *s, float *dp, int stride, const int GN, const int NC) {
    const int D = 16 * NC, NX = QB * GN, nA = k->a1 - k->a0, n = nA + k->b1 - k->b0;
    float dsum[QB * GB], top[QB * GB];
    const uint32_t *xq[NX], *gq[NX];
    for (int i = 0; i < QB; ++i) {
        const long t = k->t0 + (i < k->nq ? i : k->nq - 1);
        for (int b = 0; b < GN; ++b) {
            const long at = (t * H + h + b) * D;
            const int x = i * GN + b;
            __m512 d = _mm512_setzero_ps();
            xq[x] = (const uint32_t *)(q + at);
            gq[x] = (const uint32_t *)(dout + at);
            for (int c = 0; c < NC; ++c)
                d = _mm512_fmadd_ps(load_bf16(dout + at + 16 * c), load_bf16(out + at + 16 * c), d);
            dsum[x] = _mm512_reduce_add_ps(d);
            top[x] = lse[t * H + h + b];
        }
    }
    const uint32_t *ktg = kt + (long)g * (D / 2) * Tp, *vtg = vt + (long)g * (D / 2) * Tp;
    scores(xq, ktg, gq, vtg, k->a0, k->a1, Tp, scale, s, dp, 0, stride, NX, D);
    scores(xq, ktg, gq, vtg, k->b0, k->b1, Tp, scale, s, dp, nA, stride, NX, D);
    for (int i = 0; i < QB; ++i)
        for (int b = 0; b < GN; ++b) { /* p = exp(s - lse) into s, ds = p (dp - dsum) into dp; rows past the block: 0 */
            const int x = i * GN + b;
            float *srow = s + (long)x * stride, *drow = dp + (long)x * stride;
            if (i >= k->nq) {
                memset(srow, 0, sizeof(float) * n);
                memset(drow, 0, sizeof(float) * n);
                continue;
            }
            mask_past_end(srow, k, qr + 4L * (k->t0 + i));
            for (int j = 0; j < n; j += 16) {
                const __mmask16 m = tail_mask(n - j);
                const __m512 p = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, srow + j), _mm512_set1_ps(top[x])));
                const __m512 e = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, drow + j), _mm512_set1_ps(dsum[x]));
                _mm512_mask_storeu_ps(srow + j, m, p);
                _mm512_mask_storeu_ps(drow + j, m, _mm512_mul_ps(p, e));
            }
        }
    for (int c = 0; c < NC; ++c) {
        __m512 acc[NX];
        WEIGHTED_ROWS(NX, D, c, k, n, k_, g, KV, dp, stride, acc); /* dq = scale sum_j ds k_j */
        for (int i = 0; i < k->nq; ++i)
            for (int b = 0; b < GN; ++b)
                store_bf16(dq + ((long)(k->t0 + i) * H + h + b) * D + 16 * c,
                           _mm512_mul_ps(acc[i * GN + b], _mm512_set1_ps(scale)), 16);
        __m512 qx[NX], gx[NX]; /* dk_j += sum_x ds q_x, dv_j += sum_x p dO_x: the block's rows in registers */
        for (int i = 0; i < QB; ++i) {
            const long t = k->t0 + (i < k->nq ? i : k->nq - 1);
            for (int b = 0; b < GN; ++b) {
                qx[i * GN + b] = load_bf16(q + (t * H + h + b) * D + 16 * c);
                gx[i * GN + b] = load_bf16(dout + (t * H + h + b) * D + 16 * c);
            }
        }
        for (int j = 0; j < n; ++j) {
            const long at = ((long)key_at(k, j) * KV + g) * D + 16 * c;
            __m512 ak = _mm512_loadu_ps(dkp + at), av = _mm512_loadu_ps(dvp + at);
            for (int x = 0; x < NX; ++x) {
                ak = _mm512_fmadd_ps(_mm512_set1_ps(dp[(long)x * stride + j]), qx[x], ak);
                av = _mm512_fmadd_ps(_mm512_set1_ps(s[(long)x * stride + j]), gx[x], av);
            }
            _mm512_storeu_ps(dkp + at, ak);
            _mm512_storeu_ps(dvp + at, av);
        }
    }
}

/* Expands F(GN, NC) for the runtime gn (1..GB) and nc (1, 2, 4, 8, 16): constants inside, so the
 * accumulators stay in registers. */
#define DISPATCH(F)                                                                                   \
    switch (nc * 4 + gn) {                                                                            \
    case 5: F(1, 1); break;   case 6: F(2, 1); break;   case 7: F(3, 1); break;                       \
    case 9: F(1, 2); break;   case 10: F(2, 2); break;  case 11: F(3, 2); break;                      \
    case 17: F(1, 4); break;  case 18: F(2, 4); break;  case 19: F(3, 4); break;                      \
    case 33: F(1, 8); break;  case 34: F(2, 8); break;  case 35: F(3, 8); break;                      \
    case 65: F(1, 16); break; case 66: F(2, 16); break; default: F(3, 16); break;                     \
    }

/* The head count per block (nc = D / 16), or -1 for shapes not handled or a key range outside [0, T). */
static int check(const int32_t *qr, int T, int H, int KV, int D) {
    if (T < 1 || KV < 1 || H % KV || D % 16 || D > 256) return -1;
    for (long t = 0; t < T; ++t) {
        const int32_t *r = qr + 4 * t;
        if (r[0] < 0 || r[0] > r[1] || r[1] > T || r[2] < 0 || r[2] > r[3] || r[3] > T) return -1;
    }
    const int nc = D / 16;
    return nc == 1 || nc == 2 || nc == 4 || nc == 8 || nc == 16 ? nc : -1;
}

/* q: [T, H, D], k, v: [T, KV, D] bf16; qr: [T, 4]; out: [T, H, D] bf16, lse: [T, H] float32
 * (a token that sees no key: out 0, lse -inf). Returns 0, -1 for shapes or ranges not handled, -2 out
 * of memory. */
int rlft_packed_attention_fwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int32_t *qr,
                              uint16_t *out, float *lse, int T, int H, int KV, int D, float scale) {
    const int nc = check(qr, T, H, KV, D), G = H / KV, Tp = (T + 15) & ~15, stride = Tp + 16;
    if (nc < 0) return -1;
    uint32_t *kt = malloc(sizeof(uint32_t) * (size_t)KV * (D / 2) * Tp);
    Block *blocks = malloc(sizeof(Block) * (size_t)T);
    if (!kt || !blocks) {
        free(kt);
        free(blocks);
        return -2;
    }
    const int nb = make_blocks(qr, T, QF, blocks);
    for (int t = 0; t < T; ++t)
        if (seen(qr + 4L * t) == 0) {
            memset(out + (long)t * H * D, 0, sizeof(uint16_t) * H * D);
            for (int h = 0; h < H; ++h) lse[(long)t * H + h] = -INFINITY;
        }
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)QF * GB * stride);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
        transpose_pairs(k, kt, T, KV, D, Tp); /* its loop ends in a barrier: kt is whole below */
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)nb * KV; ++task) {
            if (!s) continue;
            const Block *blk = blocks + task / KV;
            const int g = task % KV;
            for (int h0 = 0; h0 < G; h0 += GB) {
                const int gn = G - h0 < GB ? G - h0 : GB, h = g * G + h0;
#define FWD(GN, NC) fwd_block(q, kt, v, qr, out, lse, blk, g, h, H, KV, Tp, scale, s, stride, GN, NC)
                DISPATCH(FWD)
#undef FWD
            }
        }
        free(s);
    }
    free(kt);
    free(blocks);
    return failed ? -2 : 0;
}

/* The gradients dq [T, H, D], dk, dv [T, KV, D] (bf16) for dout [T, H, D]. */
int rlft_packed_attention_bwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out,
                              const float *lse, const uint16_t *dout, const int32_t *qr, uint16_t *dq, uint16_t *dk,
                              uint16_t *dv, int T, int H, int KV, int D, float scale) {
    const int nc = check(qr, T, H, KV, D), G = H / KV, Tp = (T + 15) & ~15, stride = Tp + 16;
    if (nc < 0) return -1;
    const int threads = omp_get_max_threads();
    const size_t kv_n = (size_t)KV * (D / 2) * Tp, grad_n = (size_t)T * KV * D;
    float *buf = malloc(sizeof(float) * (2 * kv_n + 2 * grad_n * threads)); /* a pair: the size of a float */
    Block *blocks = malloc(sizeof(Block) * (size_t)T);
    if (!buf || !blocks) {
        free(buf);
        free(blocks);
        return -2;
    }
    uint32_t *kt = (uint32_t *)buf, *vt = kt + kv_n;
    float *grads = buf + 2 * kv_n; /* per thread, dk then dv */
    const int nb = make_blocks(qr, T, QB, blocks);
    for (int t = 0; t < T; ++t)
        if (seen(qr + 4L * t) == 0) memset(dq + (long)t * H * D, 0, sizeof(uint16_t) * H * D);
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)QB * GB * 2 * stride);
        float *dp = s ? s + (size_t)QB * GB * stride : NULL;
        const int me = omp_get_thread_num();
        float *dkp = grads + 2 * grad_n * (me < threads ? me : 0), *dvp = dkp + grad_n;
        if (!s || me >= threads) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(dkp, 0, sizeof(float) * 2 * grad_n);
        }
        transpose_pairs(k, kt, T, KV, D, Tp);
        transpose_pairs(v, vt, T, KV, D, Tp); /* ends in a barrier: the copies and the zeroing are done */
/* round-robin, not dynamic: which thread sums a block's dk, dv must not depend on timing, or the
 * float32 sums (and a seeded run) would differ from run to run */
#pragma omp for schedule(static, 1)
        for (long task = 0; task < (long)nb * KV; ++task) {
            if (failed) continue;
            const Block *blk = blocks + task / KV;
            const int g = task % KV;
            for (int h0 = 0; h0 < G; h0 += GB) {
                const int gn = G - h0 < GB ? G - h0 : GB, h = g * G + h0;
#define BWD(GN, NC) bwd_block(q, k, kt, vt, out, lse, dout, qr, dq, dkp, dvp, blk, g, h, H, KV, Tp, scale, s, dp, \
                              stride, GN, NC)
                DISPATCH(BWD)
#undef BWD
            }
        }
        /* the loop's implicit barrier: every thread's sums are complete */
        const int n_threads = omp_get_num_threads();
#pragma omp for schedule(static)
        for (long i = 0; i < (long)grad_n; i += 16) {
            const int m = grad_n - i >= 16 ? 16 : (int)(grad_n - i);
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            for (int w = 0; w < n_threads && w < threads; ++w) {
                a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(tail_mask(m), grads + 2 * grad_n * w + i));
                b = _mm512_add_ps(b, _mm512_maskz_loadu_ps(tail_mask(m), grads + 2 * grad_n * w + grad_n + i));
            }
            store_bf16(dk + i, _mm512_mul_ps(a, _mm512_set1_ps(scale)), m);
            store_bf16(dv + i, b, m);
        }
        free(s);
    }
    free(buf);
    free(blocks);
    return failed ? -2 : 0;
}
