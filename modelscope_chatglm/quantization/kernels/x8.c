/*
 * The driver of the int8-activation kernels: x quantized once (x8_quantize.c), then panels of its rows
 * against every weight row on the threads, by the strips of x8_strips.c, the tiles of x8_neon.c or the rows
 * of x8_scalar.c (X8_TILES: whichever this build has); and the exported entry points q8_gemv_x8, q4_gemv_x8,
 * q8_gemv_x8_lanes and q4_gemv_x8_lanes, and their bf16-in, bf16-out twins (`*_bf16`).
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

static void gemv_x8(const float *x, int M, int K, const int8_t *W, int bits, int lanes, const float *scale,
                    const float *bias, float *y, int N, int nthreads) {
    x8_t xq = quantize_x8(x, M, K, X8_ORDER(bits));
    /* Rows of x in panels that stay in L2 while every weight row passes them (a long prompt would
     * otherwise bring all of x from L3 for each work item). The weights are read once per panel; a
     * decode batch is one panel. */
    const int pass = X8_TILE_XROWS(bits), tile = X8_TILE_ROWS(bits);
    int panel = X8_PANEL_BYTES / K / pass * pass;
    panel = panel < pass ? pass : panel;
    for (int p0 = 0; p0 < M; p0 += panel) {
        x8_job job = {&xq, p0, p0 + panel < M ? p0 + panel : M, bits, lanes, W, scale, bias, y, N};
        parallel_for((N + tile - 1) / tile, nthreads, X8_TILES, &job);
    }
    free_x8(&xq);
}

void q8_gemv_x8(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 8, 0, scale, bias, y, N, nthreads);
}

void q4_gemv_x8(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 4, 0, scale, bias, y, N, nthreads);
}

/* W in the lane layout (x8_relayout_weights). */
void q8_gemv_x8_lanes(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                      float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 8, 1, scale, bias, y, N, nthreads);
}

void q4_gemv_x8_lanes(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                      float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 4, 1, scale, bias, y, N, nthreads);
}

/* A bf16 model's rows, bf16 in and out: x widened exactly (then quantized as above), y rounded once to
 * nearest even, as torch's .to(torch.bfloat16) rounds the fp32 result. The same numbers as converting
 * around the fp32 entry points, without the two conversions per linear that cost a decode step more
 * dispatch than arithmetic. */
static void gemv_x8_bf16(const uint16_t *x, int M, int K, const int8_t *W, int bits, int lanes, const float *scale,
                         const float *bias, uint16_t *y, int N, int nthreads) {
    float *xf = widen_bf16(x, (size_t)M * K), *yf = (float *)malloc(sizeof(float) * (size_t)M * N);
    if (xf && yf) gemv_x8(xf, M, K, W, bits, lanes, scale, bias, yf, N, nthreads);
    /* Out of memory: NaN, which the sampler reports as a failed sequence, rather than a crash. */
    for (size_t i = 0; i < (size_t)M * N; i++) y[i] = xf && yf ? to_bf16(yf[i]) : 0x7FC0;
    free(xf);
    free(yf);
}

void q8_gemv_x8_bf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                     uint16_t *y, int N, int nthreads) {
    gemv_x8_bf16(x, M, K, W, 8, 0, scale, bias, y, N, nthreads);
}

void q4_gemv_x8_bf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                     uint16_t *y, int N, int nthreads) {
    gemv_x8_bf16(x, M, K, W, 4, 0, scale, bias, y, N, nthreads);
}

void q8_gemv_x8_lanes_bf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                           uint16_t *y, int N, int nthreads) {
    gemv_x8_bf16(x, M, K, W, 8, 1, scale, bias, y, N, nthreads);
}

void q4_gemv_x8_lanes_bf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                           uint16_t *y, int N, int nthreads) {
    gemv_x8_bf16(x, M, K, W, 4, 1, scale, bias, y, N, nthreads);
}
