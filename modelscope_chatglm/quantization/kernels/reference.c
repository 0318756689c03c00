/*
 * The scalar references: one plain loop per formula for every kernel, exported as `*_ref`. They are the
 * definitions: the tests compare each instruction-set build's kernels with them. They use quantize_x8 and
 * block_isum (x8_quantize.c) and the paged job (attention.c); no kernel uses them.
 * Part of the one translation unit quant_kernels.c (its top comment is the map), the last; not compiled on
 * its own.
 */

/* -- the exact weight-only kernels (gemv_fp32.c, gemv_avx512_bf16.c, gemv.c) ------------------- */

void q8_gemv_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                 float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * (float)W[(size_t)n * K + k];
            y[(size_t)m * N + n] = acc * scale[n] + (bias ? bias[n] : 0.0f);
        }
}

void q4_gemv_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                 float *y, int N) {
    const int KB = K / 2;   /* bytes per row */
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int j = 0; j < KB; j++) {
                int8_t b = W[(size_t)n * KB + j];
                acc += x[(size_t)m * K + 2 * j] * (float)int4_high(b);
                acc += x[(size_t)m * K + 2 * j + 1] * (float)int4_low(b);
            }
            y[(size_t)m * N + n] = acc * scale[n] + (bias ? bias[n] : 0.0f);
        }
}

void f32_gemv_ref(const float *x, int M, int K, const float *W, const float *bias, float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * W[(size_t)n * K + k];
            y[(size_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
}

void f16_gemv_ref(const float *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * f16_to_f32(W[(size_t)n * K + k]);
            y[(size_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
}

/* bf16 activations (a bf16 model): the same sums on x widened to fp32. */
void q8_gemv_xbf16_ref(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                       float *y, int N) {
    float *xf = widen_bf16(x, (size_t)M * K);
    q8_gemv_ref(xf, M, K, W, scale, bias, y, N);
    free(xf);
}

void q4_gemv_xbf16_ref(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                       float *y, int N) {
    float *xf = widen_bf16(x, (size_t)M * K);
    q4_gemv_ref(xf, M, K, W, scale, bias, y, N);
    free(xf);
}

/* bf16 weights and bf16 x (a bf16 model's LM head), fp32 logits. */
void bf16_gemv_ref(const uint16_t *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += bf16_to_f32(x[(size_t)m * K + k]) * bf16_to_f32(W[(size_t)n * K + k]);
            y[(size_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
}

/* -- int8 activations (x8_quantize.c, x8_strips.c, x8_neon.c, x8_scalar.c, x8.c) ---------------- */

/* Scalar reference: quantize, then sum the blocks in order. */
static void gemv_x8_ref(const float *x, int M, int K, const int8_t *W, int bits, const float *scale,
                        const float *bias, float *y, int N) {
    const int KB = bits == 4 ? K / 2 : K;
    x8_t xq = quantize_x8(x, M, K, X8_NATURAL);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            y[(size_t)m * N + n] = row_x8(&xq, m, W + (size_t)n * KB, bits) * scale[n] + (bias ? bias[n] : 0.0f);
    free_x8(&xq);
}

void q8_gemv_x8_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                    float *y, int N) {
    gemv_x8_ref(x, M, K, W, 8, scale, bias, y, N);
}

void q4_gemv_x8_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                    float *y, int N) {
    gemv_x8_ref(x, M, K, W, 4, scale, bias, y, N);
}

/* -- attention over paged K/V (attention.c, attention_avx512_bf16.c) --------------------------- */

static int attend_paged_ref(paged_job *job, int bf16) {
    if (!paged_shapes_ok(job)) return 0;
    const int H = job->H, d = job->d, per_group = H / job->G;
    int most = 1;
    for (int p = 0; p < job->nparts; p++) most = job->keys[p] > most ? job->keys[p] : most;
    float *score = (float *)malloc(sizeof(float) * most), *o = (float *)malloc(sizeof(float) * d);
    if (!score || !o) {   /* -> 0: not computed (out of memory) */
        free(score);
        free(o);
        return 0;
    }
    for (int p = 0; p < job->nparts; p++)
        for (int r = job->rows[p]; r < job->rows[p + 1]; r++) {
            const int n = visible_keys(job, p, r);
            for (int h = 0; h < H; h++) {
                const int g = h / per_group;
                const size_t qh = (size_t)r * job->ldq + (size_t)h * d;
                float max = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {
                    const size_t kj = key_offset(job, p, j, g);
                    float acc = 0.0f;
                    for (int c = 0; c < d; c++) acc += element(job->q, qh + c, bf16) * element(job->k, kj + c, bf16);
                    score[j] = acc * job->scale;
                    max = score[j] > max ? score[j] : max;
                }
                for (int c = 0; c < d; c++) o[c] = 0.0f;
                for (int j = 0; j < n; j++) {
                    const size_t vj = key_offset(job, p, j, g);
                    const float e = bf16 ? bf16_to_f32(to_bf16(expf(score[j] - max))) : expf(score[j] - max);
                    sum += e;
                    for (int c = 0; c < d; c++) o[c] += e * element(job->v, vj + c, bf16);
                }
                const size_t out = ((size_t)r * H + h) * d;
                for (int c = 0; c < d; c++) {
                    if (bf16) ((uint16_t *)job->out)[out + c] = to_bf16(o[c] / sum);
                    else ((float *)job->out)[out + c] = o[c] / sum;
                }
            }
        }
    free(score);
    free(o);
    return 1;
}

int attend_f32_ref(PAGED_ARGS) {
    paged_job job = PAGED_JOB;
    return attend_paged_ref(&job, 0);
}

int attend_bf16_ref(PAGED_ARGS) {
    paged_job job = PAGED_JOB;
    return attend_paged_ref(&job, 1);
}

/* -- SwiGLU (block_ops.c) ----------------------------------------------------------------------------- */

static void swiglu_ref(const void *gu, int N, int F, int bf16, void *s) {
    for (int r = 0; r < N; r++)
        for (int j = 0; j < F; j++)
            store_elem(s, bf16, (size_t)r * F + j, swiglu_one(load_elem(gu, bf16, (size_t)r * 2 * F + j),
                                                              load_elem(gu, bf16, (size_t)r * 2 * F + F + j), bf16));
}

void swiglu_f32_ref(const float *gu, int N, int F, float *s) { swiglu_ref(gu, N, F, 0, s); }
void swiglu_bf16_ref(const uint16_t *gu, int N, int F, uint16_t *s) { swiglu_ref(gu, N, F, 1, s); }
