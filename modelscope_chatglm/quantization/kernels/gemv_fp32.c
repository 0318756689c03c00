/*
 * The exact weight-only kernels: up to ROW_BLOCK rows of int8 or int4 weights (fp32 or bf16 for the LM
 * head), widened to fp32 in registers, against up to X_ROWS rows of fp32 x; written once on vf (vec.h) for
 * every instruction set. gemv.c runs them over a whole matrix; gemv_avx512_bf16.c has their twin for bf16 x.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#define ROW_BLOCK 4   /* output rows per work item: their weights stay in L1 across the M rows of x */

/*
 * The summation order, the same for every number of rows M: y[m, n] accumulates in one vector per
 * (m, n), VW weights at a time in increasing k (int4: per VW bytes, the high nibbles against the even
 * columns, then the low nibbles against the odd ones), then the horizontal sum, then the scalar tail.
 * So a row's result never depends on the other rows in the call: a sequence decoded in a batch gets
 * exactly the numbers it gets alone. The scalar build (VW = 1) is the plain sequential sum.
 *
 * int4 activations are rearranged once per call ("interleaved"): for each block of VW bytes, the VW
 * even columns then the VW odd ones, so the kernel reads x in the order it consumes it.
 */
static inline __attribute__((always_inline)) void interleave_cols(const char *x, int K, char *out, int width,
                                                                  size_t size) {
    const int KB = K / 2, full = KB - KB % width;
    for (int j0 = 0; j0 < full; j0 += width)
        for (int i = 0; i < width; i++) {
            memcpy(out + (2 * (size_t)j0 + i) * size, x + 2 * (size_t)(j0 + i) * size, size);
            memcpy(out + (2 * (size_t)j0 + width + i) * size, x + (2 * (size_t)(j0 + i) + 1) * size, size);
        }
    memcpy(out + 2 * (size_t)full * size, x + 2 * (size_t)full * size, 2 * (size_t)(KB - full) * size);
}

static void interleave_q4(const float *x, int K, float *out) {
    interleave_cols((const char *)x, K, (char *)out, VW, sizeof(float));
}

/* Up to ROW_BLOCK weight rows against up to X_ROWS rows of x: each weight vector is widened in registers
 * once and multiplied by all of them (X_ROWS x ROW_BLOCK accumulators + X_ROWS x values + one weight
 * vector fill the 16 AVX2 registers). More rows of x take more passes over the same ROW_BLOCK weight
 * rows, which by then sit in L1/L2: DRAM sees the weights once per call. out[m * ROW_BLOCK + r]. */
#define X_ROWS 3

/* One weight per column, of type `wt`: int8 (widened in registers), or fp32, bf16 or fp16 (the LM head);
 * `stride` in bytes. Inlined with a constant `wt`, so each caller gets its own straight loop. */
enum weight_type { W_INT8, W_F32, W_BF16, W_F16 };

static inline __attribute__((always_inline)) float widened_weight(const int8_t *wr, int k, enum weight_type wt) {
    switch (wt) {
    case W_F32: return ((const float *)wr)[k];
    case W_BF16: return bf16_to_f32(((const uint16_t *)wr)[k]);
    case W_F16: return f16_to_f32(((const uint16_t *)wr)[k]);
    default: return (float)wr[k];
    }
}

static inline __attribute__((always_inline)) vf widened_weights(const int8_t *wr, int k, enum weight_type wt) {
    switch (wt) {
    case W_F32: return vload((const float *)wr + k);
    case W_BF16: return load_bf16((const uint16_t *)wr + k);
    case W_F16: return load_f16((const uint16_t *)wr + k);
    default: return load_q8(wr + k);
    }
}

static inline __attribute__((always_inline)) void rows_wide(const float *x, size_t ldx, int mb, const int8_t *w,
                                                            size_t stride, int K, int rows, float *out,
                                                            enum weight_type wt) {
    vf acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = vzero();
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[X_ROWS];
        for (int m = 0; m < mb; m++) xv[m] = vload(x + m * ldx + k);
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            vf wv = widened_weights(wr, k, wt);
            for (int m = 0; m < mb; m++) acc[m][r] = vfma(wv, xv[m], acc[m][r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            float d = vhsum(acc[m][r]);
            for (int kk = k; kk < K; kk++) d += x[m * ldx + kk] * widened_weight(wr, kk, wt);
            out[m * ROW_BLOCK + r] = d;
        }
}

static inline __attribute__((always_inline)) void rows_q4(const float *xi, size_t ldx, int mb, const int8_t *w,
                                                          size_t stride, int K, int rows, float *out,
                                                          int unused /* ROWS_WITH_CONSTANT_SHAPES passes a weight type */) {
    (void)unused;
    const int KB = K / 2;
    vf acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = vzero();
    int j = 0;
    for (; j + VW <= KB; j += VW)
        for (int r = 0; r < rows; r++) {
            vf hi, lo;
            load_q4(w + r * stride + j, &hi, &lo);
            for (int m = 0; m < mb; m++) {
                acc[m][r] = vfma(hi, vload(xi + m * ldx + 2 * j), acc[m][r]);
                acc[m][r] = vfma(lo, vload(xi + m * ldx + 2 * j + VW), acc[m][r]);
            }
        }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const float *xm = xi + m * ldx;
            float d = vhsum(acc[m][r]);
            for (int jj = j; jj < KB; jj++) {
                int8_t b = w[r * stride + jj];
                d += xm[2 * jj] * (float)int4_high(b) + xm[2 * jj + 1] * (float)int4_low(b);
            }
            out[m * ROW_BLOCK + r] = d;
        }
}
