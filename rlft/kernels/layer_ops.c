/* The small per-layer ops of a Llama-family decoder, bf16, each one pass instead of several torch ops.
 *
 * At SmolLM2's decode shapes (64 rows x 576) each torch op costs more in dispatch than in
 * arithmetic, and an RMSNorm with HF's roundings is eight of them. These compute the same roundings
 * as rlft.engines.fast_forward's torch code (every bf16 result rounded to nearest-even from an exact
 * or float32 value, in the same order); what may differ is the order of the float32 sum in the
 * norm's mean and the last bit of float32 exp in SiLU, so a bf16 output is at most one step off
 * (tests/test_kernels.py).
 *
 *   rlft_add_rms_norm: h += delta (when given; in place), out = weight * bf16(h_f32 / sqrt(mean(h^2) + eps))
 *   rlft_rotary:       x = bf16(bf16(x * cos) + bf16(swap_halves(x) * signed_sin)) per head, in place
 *   rlft_silu_mul:     out = bf16(bf16(silu(gate)) * up)
 *   rlft_silu_mul_backward: its gradients (for training: rlft.kernels.swiglu)
 *   rlft_rms_norm_backward: the gradients of the norm (for training: rlft.kernels.rms_norm)
 *
 * Needs AVX-512 F/BW and AVX512-BF16 (see rlft.kernels.build). Rows run in parallel (OpenMP) only
 * when there are enough of them to pay for waking a thread. Left out: other dtypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define PARALLEL_ELEMENTS 65536 /* below this, one thread: waking the second costs more */


/* h, delta, out: [rows, n] with row strides; weight: [n]. delta may be NULL (norm only); rstd, when
 * given, receives each row's 1 / sqrt(mean(h^2) + eps) (float32, for the backward). */
void rlft_add_rms_norm(uint16_t *h, long h_row, const uint16_t *delta, long delta_row, const uint16_t *weight,
                       uint16_t *out, long out_row, int rows, int n, float eps, float *rstd) {
#pragma omp parallel for schedule(static) if ((long)rows * n >= PARALLEL_ELEMENTS)
    for (int row = 0; row < rows; ++row) {
        uint16_t *hr = h + row * h_row;
        __m512 sq = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            int m = n - i;
            __m512 x = load_any(hr + i, m);
            if (delta) {
                x = round_bf16(_mm512_add_ps(x, load_any(delta + row * delta_row + i, m)));
                store_bf16(hr + i, x, m);
            }
            sq = _mm512_fmadd_ps(x, x, sq);
        }
        float var = _mm512_reduce_add_ps(sq) / (float)n, r = 1.0f / sqrtf(var + eps);
        if (rstd) rstd[row] = r;
        __m512 inv = _mm512_set1_ps(r);
        for (int i = 0; i < n; i += 16) {
            int m = n - i;
            __m512 x = round_bf16(_mm512_mul_ps(load_any(hr + i, m), inv));
            store_bf16(out + row * out_row + i, _mm512_mul_ps(load_any(weight + i, m), x), m);
        }
    }
}

/* x: [rows, heads, D] (heads contiguous, row stride x_row); cos, sin: [rows, D], sin with its first
 * half negated (rotate_half(x) * sin == swap_halves(x) * signed_sin). In place. D even, <= 512. */
void rlft_rotary(uint16_t *x, long x_row, int rows, int heads, int D, const uint16_t *cos, const uint16_t *sin) {
    const int half = D / 2;
#pragma omp parallel for schedule(static) if ((long)rows * heads * D >= PARALLEL_ELEMENTS)
    for (int r = 0; r < rows; ++r) {
        const uint16_t *c = cos + (long)r * D, *s = sin + (long)r * D;
        for (int h = 0; h < heads; ++h) {
            uint16_t *v = x + r * x_row + (long)h * D;
            uint16_t old[512];
            for (int i = 0; i < D; ++i) old[i] = v[i];
            for (int i = 0; i < D; i += 16) {
                int m = D - i < 16 ? D - i : 16;
                /* lanes i..i+m of swap_halves(old): one half holds the other's values */
                int from = i < half ? i + half : i - half;
                int m_swap = (i < half ? half - i : D - i) < m ? (i < half ? half - i : D - i) : m;
                __m512 sw = m_swap == m ? load_any(old + from, m) : _mm512_setzero_ps();
                if (m_swap != m) { /* a 16-lane block that straddles the halves (D/2 not a multiple of 16) */
                    float tmp[16] = {0};
                    for (int j = 0; j < m; ++j) {
                        int d = i + j, src = d < half ? d + half : d - half;
                        uint32_t u = (uint32_t)old[src] << 16;
                        __builtin_memcpy(&tmp[j], &u, 4);
                    }
                    sw = _mm512_loadu_ps(tmp);
                }
                __m512 a = round_bf16(_mm512_mul_ps(load_any(old + i, m), load_any(c + i, m)));
                __m512 b = round_bf16(_mm512_mul_ps(sw, load_any(s + i, m)));
                store_bf16(v + i, _mm512_add_ps(a, b), m);
            }
        }
    }
}

static inline __m512 silu_ps(__m512 x) { /* x / (1 + exp(-x)) in float32 */
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* gate, up: [rows, inter] with row strides g_row, u_row (the halves of one gate|up row in the
 * engine, two tensors in training); out: [rows, inter] contiguous. */
void rlft_silu_mul(const uint16_t *gate, long g_row, const uint16_t *up, long u_row, uint16_t *out, int rows,
                   int inter) {
#pragma omp parallel for schedule(static) if ((long)rows * inter >= PARALLEL_ELEMENTS)
    for (int r = 0; r < rows; ++r) {
        const uint16_t *g = gate + r * g_row, *u = up + r * u_row;
        for (int i = 0; i < inter; i += 16) {
            int m = inter - i;
            /* silu in float32, rounded; then the bf16 product, rounded */
            __m512 s = round_bf16(silu_ps(load_any(g + i, m)));
            store_bf16(out + (long)r * inter + i, _mm512_mul_ps(s, load_any(u + i, m)), m);
        }
    }
}

/* The backward of out = bf16(bf16(silu(gate)) * up), as autograd runs SiLU and the product:
 *   dup = bf16(dout * bf16(silu(gate))) ;  ds = bf16(dout * up)
 *   dgate = bf16(ds * sig * (1 + gate * (1 - sig))),  sig = 1 / (1 + exp(-gate))
 * gate, up, dout, dgate, dup: [rows, inter] contiguous. */
void rlft_silu_mul_backward(const uint16_t *gate, const uint16_t *up, const uint16_t *dout, uint16_t *dgate,
                            uint16_t *dup, int rows, int inter) {
    const long n = (long)rows * inter;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_ELEMENTS)
    for (long i = 0; i < n; i += 16) {
        int m = n - i < 16 ? (int)(n - i) : 16;
        __m512 g = load_any(gate + i, m), d = load_any(dout + i, m), one = _mm512_set1_ps(1.0f);
        __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        __m512 s = round_bf16(_mm512_mul_ps(g, sig));
        store_bf16(dup + i, _mm512_mul_ps(d, s), m);
        __m512 ds = round_bf16(_mm512_mul_ps(d, load_any(up + i, m)));
        __m512 dsig = _mm512_mul_ps(sig, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sig), one));
        store_bf16(dgate + i, _mm512_mul_ps(ds, dsig), m);
    }
}

/* The backward of y = weight * bf16(x * rstd) (rlft_add_rms_norm without delta), as autograd runs
 * LlamaRMSNorm's: g = bf16(dy * weight); n = x * rstd (float32);
 *   dx = bf16(rstd * (g - n * mean(g * n)))        per row
 *   dweight += dy * bf16(n)                          over rows, float32 (when dweight is given)
 * x, dy, dx: [rows, n] contiguous; rstd: [rows] from the forward; dweight: [n] float32, added to. */
void rlft_rms_norm_backward(const uint16_t *x, const uint16_t *weight, const float *rstd, const uint16_t *dy,
                            uint16_t *dx, float *dweight, int rows, int n) {
#pragma omp parallel if ((long)rows * n >= PARALLEL_ELEMENTS)
    {
        float *dw = NULL; /* this thread's share of dweight, padded for whole-vector tails */
        if (dweight) dw = calloc((size_t)n + 16, sizeof(float));
#pragma omp for schedule(static)
        for (int row = 0; row < rows; ++row) {
            const uint16_t *xr = x + (long)row * n, *gr = dy + (long)row * n;
            const __m512 r = _mm512_set1_ps(rstd[row]);
            __m512 dot = _mm512_setzero_ps();
            for (int i = 0; i < n; i += 16) {
                int m = n - i;
                __m512 g = round_bf16(_mm512_mul_ps(load_any(gr + i, m), load_any(weight + i, m)));
                dot = _mm512_fmadd_ps(g, _mm512_mul_ps(load_any(xr + i, m), r), dot);
            }
            const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / (float)n);
            for (int i = 0; i < n; i += 16) {
                int m = n - i;
                __m512 dyv = load_any(gr + i, m), nv = _mm512_mul_ps(load_any(xr + i, m), r);
                __m512 g = round_bf16(_mm512_mul_ps(dyv, load_any(weight + i, m)));
                store_bf16(dx + (long)row * n + i, _mm512_mul_ps(r, _mm512_fnmadd_ps(nv, mean, g)), m);
                if (dw) {
                    __m512 acc = _mm512_loadu_ps(dw + i);
                    _mm512_storeu_ps(dw + i, _mm512_fmadd_ps(dyv, round_bf16(nv), acc));
                }
            }
        }
        if (dw) {
#pragma omp critical
            for (int i = 0; i < n; ++i) dweight[i] += dw[i];
            free(dw);
        }
    }
}
