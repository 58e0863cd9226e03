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
 * Where the compiler has AMX-BF16 and Linux grants the tile state, a second path (the end of this file)
 * runs every product on AMX tiles: ~2.6x the dot products on the tool_use recipe's rows, ~1.4x on the demo's
 * (benchmarks/README.md); the caller picks it (``amx``), for head_dim 32, 64, 96 or 128.
 *
 * Needs AVX-512 F/BW/VL and AVX512-BF16 (-march=native; rlft.kernels.build falls back to the torch
 * path where the compiler refuses). Threads: OpenMP (torch's libgomp pool). Left out: other dtypes,
 * head_dim not a multiple of 16 or over 256, dropout, soft-capping, sliding windows.
 */
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define RLFT_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define GB 3  /* query heads per block (SmolLM2: 3 per KV head) */
#define QF 8  /* queries per forward block: QF x GB score accumulators */
#define QB 4  /* queries per backward block: 2 x QB x GB accumulators (scores and dO.v) */
#define AI __attribute__((always_inline))
#define AMX_G_MAX 8  /* query heads per KV head on the AMX path: rows up to 128 */

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

/* ---- The same on AMX tiles (where the compiler has AMX-BF16 and Linux grants the tile state) ----
 *
 * Rows are (query head, query) pairs of a block of up to 16 consecutive queries and all G query
 * heads of one KV head (row b * nq + i: head b, query i of the block's nq; zero rows up to a multiple
 * of 16), so every key and value tile is loaded once for the whole group. Every product is a tile multiply (16 x 32 bf16 by 32 x 16 bf16 into
 * 16 x 16 float32): the scores q.k and dO.v from the dimension-pair copies of K and V (as above),
 * p v and ds k from copies with consecutive keys paired ([KV][token pair][D][2]), and the key
 * gradients transposed, dk^T += q^T ds and dv^T += dO^T p, into each thread's float32 sums laid out
 * [KV][16-token chunk][D][16] (a tile of them is 1 KB of contiguous memory). So p and ds are rounded
 * to bf16 before they multiply (as flash attention does on GPUs); the softmax, its statistics and
 * every sum stay float32, and the forward divides by the softmax's sum after p v (flash attention's
 * order), so each weight is written once, as bf16, straight from its exp. Tile tails read past a key
 * range into zero padding or other tokens and multiply them by zero weights, or add zero to other
 * keys' sums.
 */
#ifdef RLFT_AMX

#define PAD 32       /* tokens of zero padding past the copies, for tile tails */

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static void amx_configure(void) { /* all eight tiles 16 rows x 64 bytes */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

int rlft_packed_attention_amx(void) { /* 1 where the AMX path can run: tile state granted */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* x [T, N, D] bf16 -> xp [N][Pp][D][2]: tokens 2m and 2m + 1 paired per dimension (past T: 0). */
static void pair_tokens(const uint16_t *x, uint16_t *xp, int T, int N, int D, int Pp) {
#pragma omp for schedule(static)
    for (long task = 0; task < (long)N * Pp; ++task) {
        const int h = (int)(task / Pp);
        const long m = task % Pp, t0 = 2 * m, t1 = t0 + 1;
        uint32_t *dst = (uint32_t *)(xp + task * D * 2);
        for (int d = 0; d < D; d += 16) {
            const __m512i a = t0 < T ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + (t0 * N + h) * D + d)))
                                     : _mm512_setzero_si512();
            const __m512i b = t1 < T ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + (t1 * N + h) * D + d)))
                                     : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
}

/* B tile c of a 16-key chunk: dimension pairs 16c .. 16c + 15 of keys j .. j + 15 (xt: one KV head). */
#define LOAD_KEYS(tile, xt, c, j, Tp) _tile_loadd(tile, (xt) + (long)(16 * (c)) * (Tp) + (j), (Tp) * 4)

/* s[r * stride + at + j - j0] = a_r . x_j (unscaled) for the R rows of a ([R][D] bf16) and keys
 * [j0, j1) of xt ([D / 2][Tp] pairs); each 16-key chunk's D / 32 tiles loaded once for all rows. */
static void amx_scores(const uint16_t *a, int R, int D, const uint32_t *xt, int Tp, int j0, int j1, float *s,
                       int stride, int at) {
    const int C = D / 32;
    for (int j = j0; j < j1; j += 16) {
        LOAD_KEYS(4, xt, 0, j, Tp);
        if (C > 1) LOAD_KEYS(5, xt, 1, j, Tp);
        if (C > 2) LOAD_KEYS(6, xt, 2, j, Tp);
        if (C > 3) LOAD_KEYS(7, xt, 3, j, Tp);
        for (int r = 0; r < R; r += 16) {
            const uint16_t *ar = a + (long)r * D;
            _tile_zero(0);
            _tile_loadd(1, ar, D * 2);
            _tile_dpbf16ps(0, 1, 4);
            if (C > 1) {
                _tile_loadd(2, ar + 32, D * 2);
                _tile_dpbf16ps(0, 2, 5);
            }
            if (C > 2) {
                _tile_loadd(1, ar + 64, D * 2);
                _tile_dpbf16ps(0, 1, 6);
            }
            if (C > 3) {
                _tile_loadd(2, ar + 96, D * 2);
                _tile_dpbf16ps(0, 2, 7);
            }
            _tile_stored(0, s + (long)r * stride + at + j - j0, stride * 4);
        }
    }
}

/* A key range of a block in the weights' layouts: tokens [base, base + np) hold [r0, r1) at offset
 * r0 - base (base = r0 rounded down to 16, np a multiple of 32, n16 the 16-key chunks it spans);
 * its scores sit at column at of a row. */
typedef struct {
    int r0, r1, base, np, n16, at, col; /* col: where its bf16 weights start in a row of w */
} Range;

static int block_ranges(const Block *k, Range *out) {
    int n = 0, col = 0;
    const int lo[2] = {k->a0, k->b0}, hi[2] = {k->a1, k->b1}, at[2] = {0, k->a1 - k->a0};
    for (int x = 0; x < 2; ++x) {
        if (hi[x] <= lo[x]) continue;
        const int base = lo[x] & ~15, np = (hi[x] - base + 31) & ~31, n16 = (hi[x] - base + 15) & ~15;
        out[n++] = (Range){lo[x], hi[x], base, np, n16, at[x], col};
        col += np;
    }
    return n;
}

/* The lanes l of the 16 keys from base + j that lie in the range [r0, r1). */
static inline __mmask16 range_lanes(const Range *g, int j) {
    const int off = g->r0 - g->base, lo = off - j > 0 ? off - j : 0, hi = off + g->r1 - g->r0 - j < 16 ? off + g->r1 - g->r0 - j : 16;
    return hi > lo ? (__mmask16)(tail_mask(hi) & ~tail_mask(lo)) : 0;
}

/* One row's softmax weights of scale * s (n scores, at least one finite) as bf16 in the ranges'
 * layout (wrow; 0 around the ranges), not normalized: returns the logsumexp, *inv = 1 / the sum. */
static float exp_weights(const float *row, int n, const Range *g, int nr, float scale, uint16_t *wrow, float *inv) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n; t += 16) mx = _mm512_mask_max_ps(mx, tail_mask(n - t), mx, _mm512_maskz_loadu_ps(tail_mask(n - t), row + t));
    const float top = _mm512_reduce_max_ps(mx);
    const __m512 sc = _mm512_set1_ps(scale), shift = _mm512_set1_ps(scale * top);
    __m512 sum = _mm512_setzero_ps();
    for (int x = 0; x < nr; ++x) {
        const float *src = row + g[x].at - (g[x].r0 - g[x].base);
        for (int j = 0; j < g[x].np; j += 16) {
            const __mmask16 m = range_lanes(g + x, j);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, src + j), sc, shift)));
            _mm256_storeu_si256((__m256i *)(wrow + g[x].col + j), to_bf16(e));
            sum = _mm512_add_ps(sum, e);
        }
    }
    const float total = _mm512_reduce_add_ps(sum);
    *inv = 1.0f / total;
    return scale * top + logf(total);
}

/* op (_tile_loadd or _tile_stored) on accumulator tiles 0 .. n - 1 (n <= 4) at p, p + step, ... (pointer
 * steps; rows stride bytes apart). */
#define ACC_TILES(op, n, p, step, stride)                                \
    do {                                                                 \
        op(0, (p), (stride));                                            \
        if ((n) > 1) op(1, (p) + (step), (stride));                      \
        if ((n) > 2) op(2, (p) + 2 * (step), (stride));                  \
        if ((n) > 3) op(3, (p) + 3 * (step), (stride));                  \
    } while (0)
/* Accumulator i (< n <= 4) += tile 4 x the tile loaded from p + i * step (into tiles 5, 6, 7, 5), or
 * with LOADED_LEFT the loaded tile x tile 4 (tile numbers are immediates: hence a macro). */
#define DP_ONE(i, t, p, stride, LOADED_LEFT)                             \
    do {                                                                 \
        _tile_loadd(t, (p), (stride));                                   \
        if (LOADED_LEFT) _tile_dpbf16ps(i, t, 4);                        \
        else _tile_dpbf16ps(i, 4, t);                                    \
    } while (0)
#define DP_ACC(n, p, step, stride, LOADED_LEFT)                                      \
    do {                                                                             \
        DP_ONE(0, 5, (p), (stride), LOADED_LEFT);                                    \
        if ((n) > 1) DP_ONE(1, 6, (p) + (step), (stride), LOADED_LEFT);              \
        if ((n) > 2) DP_ONE(2, 7, (p) + 2 * (step), (stride), LOADED_LEFT);          \
        if ((n) > 3) DP_ONE(3, 5, (p) + 3 * (step), (stride), LOADED_LEFT);          \
    } while (0)

/* out[r][d] = sum over the ranges' tokens of w[r][.] xp[token][d] (xp: one KV head's token pairs),
 * float32 into o ([R][D]); 64 dimensions (4 accumulator tiles) at a time. */
static void amx_weighted(const uint16_t *w, int wstride, int R, const Range *g, int nr, const uint16_t *xp, int D,
                         float *o) {
    for (int r = 0; r < R; r += 16)
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int nd = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int x = 0; x < nr; ++x)
                for (int j = 0; j < g[x].np; j += 32) {
                    _tile_loadd(4, w + (long)r * wstride + g[x].col + j, wstride * 2);
                    DP_ACC(nd, xp + ((long)(g[x].base + j) / 2 * D + d0) * 2, 32, D * 4, 0);
                }
            ACC_TILES(_tile_stored, nd, o + (long)r * D + d0, 16, D * 4);
        }
}

/* The block's rows of x ([T, H, D], heads h .. h + G - 1; row b * nq + i: head b, query i) into
 * a [RP][D] (the rows after them: 0). */
static void gather_rows(const uint16_t *x, const Block *k, int h, int G, int H, int D, int RP, uint16_t *a) {
    for (int b = 0; b < G; ++b)
        for (int i = 0; i < k->nq; ++i)
            memcpy(a + (long)(b * k->nq + i) * D, x + ((long)(k->t0 + i) * H + h + b) * D, sizeof(uint16_t) * D);
    memset(a + (long)G * k->nq * D, 0, sizeof(uint16_t) * (RP - G * k->nq) * D);
}

static int amx_fwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int32_t *qr, uint16_t *out,
                   float *lse, int T, int H, int KV, int D, float scale) {
    const int G = H / KV, R = 16 * G, Tp = (T + 15) & ~15, Pp = Tp / 2 + PAD, stride = Tp + PAD;
    const int wstride = (Tp + 2 * PAD + 31) & ~31;
    uint32_t *kt = calloc((size_t)KV * (D / 2) * Tp + PAD, sizeof(uint32_t));
    uint16_t *vp = malloc(sizeof(uint16_t) * (size_t)KV * Pp * D * 2);
    Block *blocks = malloc(sizeof(Block) * (size_t)T);
    if (!kt || !vp || !blocks) {
        free(kt);
        free(vp);
        free(blocks);
        return -2;
    }
    const int nb = make_blocks(qr, T, 16, blocks);
    for (int t = 0; t < T; ++t)
        if (seen(qr + 4L * t) == 0) {
            memset(out + (long)t * H * D, 0, sizeof(uint16_t) * H * D);
            for (int h = 0; h < H; ++h) lse[(long)t * H + h] = -INFINITY;
        }
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * ((size_t)R * stride + (size_t)R * D + R));
        uint16_t *a = malloc(sizeof(uint16_t) * ((size_t)R * D + (size_t)R * wstride));
        if (!s || !a) {
#pragma omp atomic write
            failed = 1;
        }
        transpose_pairs(k, kt, T, KV, D, Tp);
        pair_tokens(v, vp, T, KV, D, Pp); /* ends in a barrier */
        amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)nb * KV; ++task) {
            if (!s || !a) continue;
            const Block *blk = blocks + task / KV;
            const int g = (int)(task % KV), nA = blk->a1 - blk->a0, n = nA + blk->b1 - blk->b0;
            float *o = s + (size_t)R * stride, *inv = o + (size_t)R * D;
            uint16_t *w = a + (size_t)R * D;
            Range rg[2];
            const int nr = block_ranges(blk, rg);
            const int nq = blk->nq, Rb = (G * nq + 15) & ~15; /* the block's rows, b * nq + i */
            gather_rows(q, blk, g * G, G, H, D, Rb, a);
            const uint32_t *ktg = kt + (long)g * (D / 2) * Tp;
            amx_scores(a, Rb, D, ktg, Tp, blk->a0, blk->a1, s, stride, 0);
            amx_scores(a, Rb, D, ktg, Tp, blk->b0, blk->b1, s, stride, nA);
            for (int r = 0; r < Rb; ++r) {
                const int b = r / nq, i = r % nq;
                uint16_t *wrow = w + (long)r * wstride;
                if (b >= G) { /* a row past the block's: zero weights */
                    memset(wrow, 0, sizeof(uint16_t) * (rg[nr - 1].col + rg[nr - 1].np));
                    continue;
                }
                float *row = s + (long)r * stride;
                mask_past_end(row, blk, qr + 4L * (blk->t0 + i));
                lse[(long)(blk->t0 + i) * H + g * G + b] = exp_weights(row, n, rg, nr, scale, wrow, inv + r);
            }
            amx_weighted(w, wstride, Rb, rg, nr, vp + (long)g * Pp * D * 2, D, o);
            for (int r = 0; r < G * nq; ++r) {
                const int b = r / nq, i = r % nq;
                const __m512 norm = _mm512_set1_ps(inv[r]); /* the softmax's 1 / sum, after p v */
                for (int d = 0; d < D; d += 16)
                    store_bf16(out + ((long)(blk->t0 + i) * H + g * G + b) * D + d,
                               _mm512_mul_ps(_mm512_loadu_ps(o + (long)r * D + d), norm), 16);
            }
        }
        _tile_release();
        free(s);
        free(a);
    }
    free(kt);
    free(vp);
    free(blocks);
    return failed ? -2 : 0;
}

/* The backward's weights of one pair of rows (2 rp, 2 rp + 1) from their scores s and dO.v (dp):
 * p = exp(scale s - lse) and ds = p (dp - dsum), as bf16 in the ranges' layouts: ds row by row into
 * w (for dq; rows up to R), and p and ds as row pairs (pv, dsv: [rp][key][2] per range, for the key
 * gradients). valid[e]: the row is one of the block's queries (else its weights are 0). */
static void pair_weights(const float *const *srow, const float *const *drow, const int *valid, const float *top,
                         const float *dsum, int rp, int R, float scale, const Range *g, int nr, uint16_t *w,
                         int wstride, uint16_t *const *pv, uint16_t *const *dsv) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int x = 0; x < nr; ++x) {
        const int shift = g[x].at - (g[x].r0 - g[x].base);
        for (int j = 0; j < g[x].np; j += 16) {
            const __mmask16 m = range_lanes(g + x, j);
            __m512i pw[2], dw[2];
            for (int e = 0; e < 2; ++e) {
                __m512 p = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
                if (valid[e] && m) {
                    p = _mm512_maskz_mov_ps(m, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, srow[e] + shift + j), sc,
                                                                      _mm512_set1_ps(top[e]))));
                    ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, drow[e] + shift + j), _mm512_set1_ps(dsum[e])));
                }
                const __m256i db = to_bf16(ds);
                if (2 * rp + e < R) _mm256_storeu_si256((__m256i *)(w + (long)(2 * rp + e) * wstride + g[x].col + j), db);
                pw[e] = _mm512_cvtepu16_epi32(to_bf16(p));
                dw[e] = _mm512_cvtepu16_epi32(db);
            }
            if (j < g[x].n16) {
                const long at = ((long)rp * g[x].n16 + j) * 2;
                _mm512_storeu_si512(pv[x] + at, _mm512_or_si512(pw[0], _mm512_slli_epi32(pw[1], 16)));
                _mm512_storeu_si512(dsv[x] + at, _mm512_or_si512(dw[0], _mm512_slli_epi32(dw[1], 16)));
            }
        }
    }
}

/* xT[d][r] = x[r][d] for the [RP][D] rows. */
static void transpose_rows(const uint16_t *x, int RP, int D, uint16_t *xT) {
    for (int r = 0; r < RP; ++r)
        for (int d = 0; d < D; ++d) xT[(long)d * RP + r] = x[(long)r * D + d];
}

/* sums[t / 16][d][t % 16] += sum_r aT[d][r] pv[r][t - 16 (r0 / 16)] for the range's keys t, one 16-key
 * chunk (a contiguous [D][16] block of one KV head's float32 sums) at a time; keys of the first and
 * last chunks outside the range get 0 added. */
static void amx_key_sums(const uint16_t *aT, int RP, int D, const uint16_t *pv, const Range *g, float *sums) {
    const int n16 = g->n16;
    for (int j = 0; j < n16; j += 16)
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int nd = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
            float *c = sums + ((long)(g->base + j) * D + 16L * d0); /* chunk (base + j) / 16, dimension d0 */
            ACC_TILES(_tile_loadd, nd, c, 256, 64);
            for (int rp = 0; rp < RP / 2; rp += 16) {
                _tile_loadd(4, pv + ((long)rp * n16 + j) * 2, n16 * 4);
                DP_ACC(nd, aT + (long)d0 * RP + 2 * rp, 16L * RP, RP * 2, 1);
            }
            ACC_TILES(_tile_stored, nd, c, 256, 64);
        }
}

static int amx_bwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out, const float *lse,
                   const uint16_t *dout, const int32_t *qr, uint16_t *dq, uint16_t *dk, uint16_t *dv, int T, int H,
                   int KV, int D, float scale) {
    const int G = H / KV, R = 16 * G, RP = (R + 31) & ~31, Tp = (T + 15) & ~15, Pp = Tp / 2 + PAD;
    const int stride = Tp + PAD, wstride = (Tp + 2 * PAD + 31) & ~31, Tk = Tp + PAD, n16max = Tp + 32;
    const int threads = omp_get_max_threads();
    const size_t kt_n = (size_t)KV * (D / 2) * Tp + PAD, sum_n = (size_t)KV * D * Tk;
    uint32_t *kt = calloc(2 * kt_n, sizeof(uint32_t)), *vt = kt ? kt + kt_n : NULL;
    uint16_t *kp = malloc(sizeof(uint16_t) * (size_t)KV * Pp * D * 2);
    float *sums = malloc(sizeof(float) * 2 * sum_n * threads); /* per thread: dk, then dv, [KV][Tk / 16][D][16] */
    Block *blocks = malloc(sizeof(Block) * (size_t)T);
    if (!kt || !kp || !sums || !blocks) {
        free(kt);
        free(kp);
        free(sums);
        free(blocks);
        return -2;
    }
    const int nb = make_blocks(qr, T, 16, blocks);
    for (int t = 0; t < T; ++t)
        if (seen(qr + 4L * t) == 0) memset(dq + (long)t * H * D, 0, sizeof(uint16_t) * H * D);
    int failed = 0;
#pragma omp parallel
    {
        const int me = omp_get_thread_num();
        float *s = malloc(sizeof(float) * ((size_t)2 * R * stride + (size_t)R * D));
        uint16_t *a = malloc(sizeof(uint16_t) * ((size_t)4 * RP * D + (size_t)R * wstride + (size_t)2 * RP * n16max));
        if (!s || !a || me >= threads) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(sums + 2 * sum_n * me, 0, sizeof(float) * 2 * sum_n);
        }
        transpose_pairs(k, kt, T, KV, D, Tp);
        transpose_pairs(v, vt, T, KV, D, Tp);
        pair_tokens(k, kp, T, KV, D, Pp); /* ends in a barrier */
        amx_configure();
#pragma omp for schedule(static, 1) /* round-robin: the float32 sums do not depend on timing */
        for (long task = 0; task < (long)nb * KV; ++task) {
            if (failed) continue;
            const Block *blk = blocks + task / KV;
            const int g = (int)(task % KV), h = g * G, nA = blk->a1 - blk->a0;
            float *dp = s + (size_t)R * stride, *o = dp + (size_t)R * stride;
            uint16_t *qa = a, *ga = qa + (size_t)RP * D, *qT = ga + (size_t)RP * D, *gT = qT + (size_t)RP * D;
            uint16_t *w = gT + (size_t)RP * D, *pv = w + (size_t)R * wstride, *dsv = pv + (size_t)RP * n16max;
            float *dks = sums + 2 * sum_n * me + (size_t)g * D * Tk, *dvs = dks + sum_n;
            Range rg[2];
            const int nr = block_ranges(blk, rg);
            const int nq = blk->nq, Rb = (G * nq + 15) & ~15, RPb = (Rb + 31) & ~31; /* rows b * nq + i */
            gather_rows(q, blk, h, G, H, D, RPb, qa);
            gather_rows(dout, blk, h, G, H, D, RPb, ga);
            const uint32_t *ktg = kt + (long)g * (D / 2) * Tp, *vtg = vt + (long)g * (D / 2) * Tp;
            amx_scores(qa, Rb, D, ktg, Tp, blk->a0, blk->a1, s, stride, 0);
            amx_scores(qa, Rb, D, ktg, Tp, blk->b0, blk->b1, s, stride, nA);
            amx_scores(ga, Rb, D, vtg, Tp, blk->a0, blk->a1, dp, stride, 0);
            amx_scores(ga, Rb, D, vtg, Tp, blk->b0, blk->b1, dp, stride, nA);
            uint16_t *pvx[2] = {pv, pv + (size_t)RP * n16max / 2}, *dsvx[2] = {dsv, dsv + (size_t)RP * n16max / 2};
            for (int rp = 0; rp < RPb / 2; ++rp) { /* p = exp(scale s - lse), ds = p (dp - dsum), two rows at a time */
                const float *srow[2], *drow[2];
                float top[2] = {0, 0}, dsum[2] = {0, 0};
                int valid[2];
                for (int e = 0; e < 2; ++e) {
                    const int r = 2 * rp + e, b = r / nq, i = r % nq;
                    float *sr = s + (long)r * stride;
                    srow[e] = sr;
                    drow[e] = dp + (long)r * stride;
                    valid[e] = b < G;
                    if (!valid[e]) continue;
                    const long at = ((long)(blk->t0 + i) * H + h + b) * D;
                    __m512 d = _mm512_setzero_ps();
                    for (int c = 0; c < D; c += 16) d = _mm512_fmadd_ps(load_bf16(dout + at + c), load_bf16(out + at + c), d);
                    dsum[e] = _mm512_reduce_add_ps(d);
                    top[e] = lse[(long)(blk->t0 + i) * H + h + b];
                    mask_past_end(sr, blk, qr + 4L * (blk->t0 + i));
                }
                pair_weights(srow, drow, valid, top, dsum, rp, Rb, scale, rg, nr, w, wstride, pvx, dsvx);
            }
            /* dq = scale sum_j ds k_j */
            amx_weighted(w, wstride, Rb, rg, nr, kp + (long)g * Pp * D * 2, D, o);
            for (int r = 0; r < G * nq; ++r)
                for (int d = 0; d < D; d += 16)
                    store_bf16(dq + ((long)(blk->t0 + r % nq) * H + h + r / nq) * D + d,
                               _mm512_mul_ps(_mm512_loadu_ps(o + (long)r * D + d), _mm512_set1_ps(scale)), 16);
            /* dk^T += q^T ds, dv^T += dO^T p, range by range */
            transpose_rows(qa, RPb, D, qT);
            transpose_rows(ga, RPb, D, gT);
            for (int x = 0; x < nr; ++x) {
                amx_key_sums(gT, RPb, D, pvx[x], rg + x, dvs);
                amx_key_sums(qT, RPb, D, dsvx[x], rg + x, dks);
            }
        }
        _tile_release();
        /* the loop's implicit barrier: every thread's sums are complete; [KV][Tk / 16][D][16] -> [T, KV, D] */
        const int n_threads = omp_get_num_threads() < threads ? omp_get_num_threads() : threads;
        const int tblocks = (T + 15) / 16, dblocks = D / 16;
#pragma omp for schedule(static)
        for (long task = 0; task < (long)KV * dblocks * tblocks; ++task) {
            const int g = (int)(task / ((long)dblocks * tblocks)), d0 = 16 * (int)(task / tblocks % dblocks);
            const int t0 = 16 * (int)(task % tblocks);
            float tk[256] __attribute__((aligned(64))), tv[256] __attribute__((aligned(64)));
            for (int d = 0; d < 16; ++d) {
                const size_t at = (size_t)g * D * Tk + (size_t)t0 * D + (size_t)(d0 + d) * 16;
                __m512 x = _mm512_setzero_ps(), y = _mm512_setzero_ps();
                for (int th = 0; th < n_threads; ++th) {
                    x = _mm512_add_ps(x, _mm512_loadu_ps(sums + 2 * sum_n * th + at));
                    y = _mm512_add_ps(y, _mm512_loadu_ps(sums + 2 * sum_n * th + sum_n + at));
                }
                _mm512_store_ps(tk + 16 * d, _mm512_mul_ps(x, _mm512_set1_ps(scale)));
                _mm512_store_ps(tv + 16 * d, y);
            }
            const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                   _mm512_set1_epi32(16));
            for (int tt = 0; tt < 16 && t0 + tt < T; ++tt) {
                const long at = ((long)(t0 + tt) * KV + g) * D + d0;
                store_bf16(dk + at, _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(tt)), tk, 4), 16);
                store_bf16(dv + at, _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(tt)), tv, 4), 16);
            }
        }
        free(s);
        free(a);
    }
    free(kt);
    free(kp);
    free(sums);
    free(blocks);
    return failed ? -2 : 0;
}

/* Whether the AMX path takes these shapes. */
static int amx_shapes(int H, int KV, int D) { return D % 32 == 0 && D <= 128 && H / KV <= AMX_G_MAX; }
#else
int rlft_packed_attention_amx(void) { return 0; }
#endif

/* q: [T, H, D], k, v: [T, KV, D] bf16; qr: [T, 4]; out: [T, H, D] bf16, lse: [T, H] float32
 * (a token that sees no key: out 0, lse -inf). Returns 0, -1 for shapes or ranges not handled, -2 out
 * of memory. */
int rlft_packed_attention_fwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int32_t *qr,
                              uint16_t *out, float *lse, int T, int H, int KV, int D, float scale, int amx) {
    const int nc = check(qr, T, H, KV, D), G = H / KV, Tp = (T + 15) & ~15, stride = Tp + 16;
    if (nc < 0) return -1;
#ifdef RLFT_AMX
    if (amx && amx_shapes(H, KV, D)) return amx_fwd(q, k, v, qr, out, lse, T, H, KV, D, scale);
#endif
    (void)amx;
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
                              uint16_t *dv, int T, int H, int KV, int D, float scale, int amx) {
    const int nc = check(qr, T, H, KV, D), G = H / KV, Tp = (T + 15) & ~15, stride = Tp + 16;
    if (nc < 0) return -1;
#ifdef RLFT_AMX
    if (amx && amx_shapes(H, KV, D)) return amx_bwd(q, k, v, out, lse, dout, qr, dq, dk, dv, T, H, KV, D, scale);
#endif
    (void)amx;
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
