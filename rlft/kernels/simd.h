/* AVX-512 helpers shared by rlft's kernels: bf16 loads and stores (and their tail masks), a row's max, rounding, exp. */
#ifndef RLFT_SIMD_H
#define RLFT_SIMD_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 load_bf16(const uint16_t *p) { /* 16 bf16 values as float32 lanes (exact) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __mmask16 tail_mask(long n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); } /* min(n, 16) lanes */

static inline __m512 load_bf16_n(const uint16_t *p, int n) { /* the first n <= 16 lanes, the rest 0 */
    __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); } /* nearest, ties to even */

static inline __m512 load_any(const uint16_t *p, int n) { /* min(n, 16) lanes of a row's tail, the rest 0 */
    return n >= 16 ? load_bf16(p) : load_bf16_n(p, n);
}

static inline void store_bf16(uint16_t *p, __m512 x, int n) { /* rounded to bf16; only min(n, 16) lanes */
    if (n >= 16) _mm256_storeu_si256((__m256i *)p, to_bf16(x));
    else _mm256_mask_storeu_epi16(p, tail_mask(n), to_bf16(x));
}

static inline float max_bf16(const uint16_t *p, long n) { /* the largest of n >= 1 bf16 values (exact) */
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (long i = 0; i < n; i += 16) mx = _mm512_mask_max_ps(mx, tail_mask(n - i), mx, load_any(p + i, n - i));
    return _mm512_reduce_max_ps(mx);
}

static inline __m512 round_bf16(__m512 x) { /* to the nearest bf16, back in float32 lanes */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}

static inline __m512 exp_ps(__m512 x) {
    /* exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 Taylor on r: ~1 ulp.
       Below -104 the result is 0 (scalef underflows), above 88.5 it saturates to inf. */
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.5f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    /* below e^-86 (4.4e-38) the result is 0, not a subnormal: subnormal results take a microcode
       assist (~100+ cycles a vector); NaN stays NaN */
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-86.0f), _CMP_NLT_UQ), p, n);
}

#endif
