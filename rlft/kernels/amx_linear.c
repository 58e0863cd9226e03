/* A linear layer y = x W^T (+ bias) on Intel AMX tiles, bf16 in, float32 sums, bf16 out.
 *
 * A decode step of a small model multiplies 64 rows by each weight once: the weights stream from
 * memory (270 MB a step for SmolLM2-135M) and every byte is used 64 times. oneDNN's packed bf16
 * linear took ~22 ms a step for that on a 2-core AMX VM against an ~11 ms floor (the weights at
 * ~25 GB/s) and ~8 ms of tile arithmetic; this kernel takes ~16 ms (benchmarks/README.md).
 *
 * Weights are packed once (rlft_amx_pack, below) into the layout the tile multiply reads,
 * 32 output columns x 32 inputs per 2 KB block, blocks of one column group contiguous:
 *   packed[N/32][K/32][2 tiles][16 input pairs][16 columns][2]
 * so a thread streams one contiguous range of memory. Each thread takes a contiguous range of
 * column groups; for each, it runs over the rows 32 at a time (4 accumulator tiles: 2 x 16 rows by
 * 2 x 16 columns), so a group's weights come from memory once and from L1 for the other rows.
 * Rows are taken 256 at a time as the outer loop, so a long prefill keeps its rows in L2. A few
 * software prefetches into L2, 16 KB ahead of the tile loads (one line in eight), start the
 * hardware's streams on the pages ahead: ~5 % faster a step; prefetching every line of the next
 * block, into L1 or L2, was slower (measured on the 2-core AMX VM).
 *
 * Needs AMX-BF16 (-march=native refuses the tile intrinsics elsewhere: no kernel there) and the
 * kernel's permission to use the tile state (rlft_amx_init, once per process). K must be a
 * multiple of 32 (checked by the caller); N is padded to 32 in the packed weight and only the
 * first N columns written. Left out: other dtypes, transposed x, accumulating into y.
 */
#define _GNU_SOURCE
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROW_BLOCK 256         /* rows per outer pass: 256 x K bf16 stays in L2 */
#define PREFETCH_AHEAD 16384  /* bytes of packed weights ahead of the tile loads */

/* Ask Linux for the AMX tile state for this process; 0 on success. */
int rlft_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3: float32 accumulators (rows r0 of the first 16, r1 of the second, x 16 columns each);
 * 4, 5: x (r0 / r1 rows x 32 inputs); 6, 7: weights (16 input pairs x 16 columns x 2). */
static void configure(int r0, int r1) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = (uint8_t)rows[t];
        c.colsb[t] = rows[t] ? 64 : 0;
    }
    _tile_loadconfig(&c);
}

/* x: [M, K] with row stride x_row (elements); wp: packed [ceil(N/32) blocks]; bias: [N] or NULL;
 * y: [M, N] with row stride y_row. */
void rlft_amx_linear(const uint16_t *x, long x_row, int M, int K, const uint16_t *wp, int N, const uint16_t *bias,
                     uint16_t *y, long y_row) {
    const int blocks = (N + 31) / 32, kblocks = K / 32;
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int b0 = (int)((long)blocks * t / threads), b1 = (int)((long)blocks * (t + 1) / threads);
        float acc[32 * 32] __attribute__((aligned(64)));
        int configured = -1;
        for (int mb = 0; mb < M; mb += ROW_BLOCK) {
            const int mend = M - mb < ROW_BLOCK ? M : mb + ROW_BLOCK;
            for (int nb = b0; nb < b1; ++nb) {
                const uint16_t *wb = wp + (long)nb * K * 32;
                const int cols = N - nb * 32 < 32 ? N - nb * 32 : 32;
                __m512 bias_lo = _mm512_setzero_ps(), bias_hi = _mm512_setzero_ps();
                if (bias) {
                    bias_lo = load_any(bias + nb * 32, cols);
                    if (cols > 16) bias_hi = load_any(bias + nb * 32 + 16, cols - 16);
                }
                for (int m0 = mb; m0 < mend; m0 += 32) {
                    const int r = mend - m0 < 32 ? mend - m0 : 32, r0 = r < 16 ? r : 16, r1 = r - r0;
                    if (r != configured) { /* the rows of a partial chunk: once per call at most */
                        configure(r0, r1);
                        configured = r;
                    }
                    const uint16_t *xa = x + (long)m0 * x_row, *xb = xa + 16 * x_row;
                    _tile_zero(0);
                    _tile_zero(1);
                    if (r1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    for (int kb = 0; kb < kblocks; ++kb) {
                        const uint16_t *bp = wb + (long)kb * 1024;
                        for (int at = 0; at < 2048; at += 512) /* 4 lines 16 KB ahead: see the header */
                            _mm_prefetch((const char *)bp + PREFETCH_AHEAD + at, _MM_HINT_T2);
                        _tile_loadd(4, xa + kb * 32, x_row * 2);
                        _tile_loadd(6, bp, 64);
                        _tile_loadd(7, bp + 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (r1) {
                            _tile_loadd(5, xb + kb * 32, x_row * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, acc, 128);
                    _tile_stored(1, acc + 16, 128);
                    if (r1) {
                        _tile_stored(2, acc + 512, 128);
                        _tile_stored(3, acc + 528, 128);
                    }
                    for (int i = 0; i < r; ++i) {
                        uint16_t *yr = y + (long)(m0 + i) * y_row + nb * 32;
                        store_bf16(yr, _mm512_add_ps(_mm512_load_ps(acc + i * 32), bias_lo), cols);
                        if (cols > 16)
                            store_bf16(yr + 16, _mm512_add_ps(_mm512_load_ps(acc + i * 32 + 16), bias_hi), cols - 16);
                    }
                }
            }
        }
        _tile_release();
    }
}

/* Pack w [N, K] (row stride w_row) into the layout above, zero columns up to a multiple of 32:
 * packed[nb][kb][t][r][c][j] = w[32 nb + 16 t + c][32 kb + 2 r + j]. One 2 KB block at a time: 32
 * rows' 64-byte segments in, one contiguous block out (a permuted torch copy was ~2x slower). */
void rlft_amx_pack(const uint16_t *w, long w_row, int N, int K, uint16_t *packed) {
    const int blocks = (N + 31) / 32, kblocks = K / 32;
#pragma omp parallel for schedule(static)
    for (int nb = 0; nb < blocks; ++nb)
        for (int kb = 0; kb < kblocks; ++kb) {
            uint32_t *out = (uint32_t *)(packed + ((long)nb * kblocks + kb) * 1024); /* pairs (j = 0, 1) as one word */
            for (int t = 0; t < 2; ++t)
                for (int c = 0; c < 16; ++c) {
                    const int n = nb * 32 + t * 16 + c;
                    const uint32_t *src = (const uint32_t *)(w + (long)n * w_row + kb * 32);
                    for (int r = 0; r < 16; ++r) out[t * 256 + r * 16 + c] = n < N ? src[r] : 0;
                }
        }
}

