/*
 * The driver of the exact weight-only kernels: blocks of ROW_BLOCK weight rows on the threads (threads.c),
 * each block's sums by the rows of gemv_fp32.c or gemv_avx512_bf16.c, then the scales and the bias; and the
 * exported entry points q8_gemv, q4_gemv, f32_gemv, q8_gemv_xbf16, q4_gemv_xbf16, bf16_gemv and f16_gemv.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- GEMV / skinny GEMM: decode and batched decode ------------------------------------------- */

/* The usual shapes (a full block of weight rows against 1, 2 or X_ROWS rows of x) as calls with constant
 * trip counts: inlined, GCC unrolls them and keeps the accumulators in registers instead of on the
 * stack. The same code computes the same sums in the same order, whichever call runs. */
#define ROWS_WITH_CONSTANT_SHAPES(fn, x, ...)                                                    \
    do {                                                                                        \
        if (rows == ROW_BLOCK && mb == 1) fn(x, (size_t)K, 1, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__);     \
        else if (rows == ROW_BLOCK && mb == 2) fn(x, (size_t)K, 2, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__); \
        else if (rows == ROW_BLOCK && mb == X_ROWS)                                             \
            fn(x, (size_t)K, X_ROWS, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__);             \
        else fn(x, (size_t)K, mb, w, row_bytes, K, rows, out, __VA_ARGS__);                    \
    } while (0)

/* The LM head's weights, as `bits` of a job: fp32, bf16, or the checkpoint's fp16 (widened in registers) */
#define ROWS_F32 32
#define ROWS_BF16 16
#define ROWS_F16 (-16)

typedef struct {
    const void *x;    /* [M, K], fp32, or bf16 with xbf16 set; for int4 rearranged (interleave_q4*) */
    int xbf16;
    int M, K, bits;   /* bits: 8 or 4 (quantized rows, times scale[n]), or one of the head's ROWS_* above */
    const int8_t *W;
    const float *scale, *bias;
    float *y;
    int N;
} gemv_job;

/* Blocks [b0, b1) of ROW_BLOCK weight rows against every row of x. */
static void gemv_blocks(void *arg, int b0, int b1) {
    const gemv_job *job = (const gemv_job *)arg;
    const int M = job->M, K = job->K, N = job->N, bits = job->bits, KB = bits == 4 ? K / 2 : K;
    const size_t row_bytes = bits == ROWS_F32 ? sizeof(float) * (size_t)K
                             : bits == ROWS_BF16 || bits == ROWS_F16 ? sizeof(uint16_t) * (size_t)K : (size_t)KB;
    const float *scale = job->scale, *bias = job->bias;
    float *d = (float *)malloc(sizeof(float) * (size_t)M * ROW_BLOCK);
#ifdef XBF16_DP
    /* more rows of x than one pass takes: widen each block's int8 weights once (widen_rows_bf16) */
    uint16_t *wb = job->xbf16 && bits == 8 && M > X_ROWS ? (uint16_t *)thread_scratch(widened_bytes(K)) : NULL;
#endif
    for (int blk = b0; blk < b1; blk++) {
        const int n0 = blk * ROW_BLOCK, rows = n0 + ROW_BLOCK < N ? ROW_BLOCK : N - n0;
        const int8_t *w = job->W + n0 * row_bytes;
#ifdef XBF16_DP
        if (wb) widen_rows_bf16(w, row_bytes, K, rows, bits, wb);
#endif
        for (int m0 = 0; m0 < M; m0 += X_ROWS) {
            const int mb = M - m0 < X_ROWS ? M - m0 : X_ROWS;
            float *out = d + m0 * ROW_BLOCK;
#ifdef XBF16_DP
            if (job->xbf16) {
                const uint16_t *xm = (const uint16_t *)job->x + (size_t)m0 * K;
                if (bits == 4) ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 4, wb);
                else if (bits == 8) ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 8, wb);
                else ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 16, NULL);
                continue;
            }
#endif
            const float *xm = (const float *)job->x + (size_t)m0 * K;
            if (bits == 4) ROWS_WITH_CONSTANT_SHAPES(rows_q4, xm, 0);
            else if (bits == 8) ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_INT8);
            else if (bits == ROWS_BF16) ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_BF16);
            else if (bits == ROWS_F16) ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_F16);
            else ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_F32);
        }
        for (int m = 0; m < M; m++)
            for (int r = 0; r < rows; r++)
                job->y[(size_t)m * N + n0 + r] = d[m * ROW_BLOCK + r] * (scale ? scale[n0 + r] : 1.0f) +
                                                 (bias ? bias[n0 + r] : 0.0f);
    }
    free(d);
}

/* x is fp32, or bf16 with xbf16 set (the `*_xbf16` entry points and the bf16 head). */
static void gemv(const void *x, int xbf16, int M, int K, const int8_t *W, int bits, const float *scale,
                 const float *bias, float *y, int N, int nthreads) {
#ifndef XBF16_DP
    if (xbf16) {   /* no bf16 pair products on this build: widen x and run the fp32 loop */
        float *xf = widen_bf16((const uint16_t *)x, (size_t)M * K);
        gemv(xf, 0, M, K, W, bits, scale, bias, y, N, nthreads);
        free(xf);
        return;
    }
#endif
    void *xi = NULL;
    if (bits == 4) {   /* rearrange each x row once: see interleave_q4 */
        const size_t row = (size_t)K * (xbf16 ? sizeof(uint16_t) : sizeof(float));
        xi = malloc(row * M);
        for (int m = 0; m < M; m++) {
#ifdef XBF16_DP
            if (xbf16) {
                interleave_q4_bf16((const uint16_t *)x + (size_t)m * K, K, (uint16_t *)xi + (size_t)m * K);
                continue;
            }
#endif
            interleave_q4((const float *)x + (size_t)m * K, K, (float *)xi + (size_t)m * K);
        }
    }
    gemv_job job = {xi ? xi : x, xbf16, M, K, bits, W, scale, bias, y, N};
    parallel_for((N + ROW_BLOCK - 1) / ROW_BLOCK, nthreads, gemv_blocks, &job);
    free(xi);
}

void q8_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, 0, M, K, W, 8, scale, bias, y, N, nthreads);
}

void q4_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, 0, M, K, W, 4, scale, bias, y, N, nthreads);
}

/* fp32 weights: the LM head of a batched decode step, so that a row's logits do not depend on the
 * other rows either (MKL's sgemm sums in an order that changes with the number of rows). */
void f32_gemv(const float *x, int M, int K, const float *W, const float *bias, float *y, int N, int nthreads) {
    gemv(x, 0, M, K, (const int8_t *)W, ROWS_F32, NULL, bias, y, N, nthreads);
}

void q8_gemv_xbf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                   float *y, int N, int nthreads) {
    gemv(x, 1, M, K, W, 8, scale, bias, y, N, nthreads);
}

void q4_gemv_xbf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                   float *y, int N, int nthreads) {
    gemv(x, 1, M, K, W, 4, scale, bias, y, N, nthreads);
}

/* bf16 weights and x (a bf16 model's LM head), fp32 logits: half the bytes of f32_gemv, and no bf16
 * rounding of the logits (two candidates 1 ulp apart in bf16 would tie, and which won would depend
 * on summation order). */
void bf16_gemv(const uint16_t *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N, int nthreads) {
    gemv(x, 1, M, K, (const int8_t *)W, ROWS_BF16, NULL, bias, y, N, nthreads);
}

/* The checkpoint's own fp16 weights and fp32 x (the LM head of a quantized fp32 model), fp32 logits: the
 * f32_gemv sums exactly (fp16 widens to fp32 without rounding), from half the bytes. */
void f16_gemv(const float *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N, int nthreads) {
    gemv(x, 0, M, K, (const int8_t *)W, ROWS_F16, NULL, bias, y, N, nthreads);
}
