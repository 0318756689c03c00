/*
 * int8 activations on Arm NEON (aarch64): register tiles of X8N_WROWS weight rows against up to
 * x8n_rows(bits) rows of xq, the products by `sdot` (Armv8.2 dotprod) or, on plain Armv8-A, by widening
 * multiplies. Compiled where the build is NEON (KERNEL_NEON, common.h). The X8_* macros
 * at the end tell x8.c how to run the tiles. It must equal gemv_x8_ref (reference.c) bit for bit.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#ifdef KERNEL_NEON
/* ---- int8 activations on NEON ---------------------------------------------------------------- */
/*
 * NEON multiplies signed bytes by signed bytes (`sdot`: 4 byte products into each of 4 int32 lanes, 16
 * per instruction), so the unsigned operands of x86 (|w| and signs, nibble + 8 and its excess) are not
 * needed: int8 weights go in as they are, int4 nibbles are sign-extended by shifts (high: >> 4; low:
 * << 4 then >> 4, arithmetic). For int4 xq stores each block's 32 even columns, then its 32 odd ones
 * (X8_HALVES): 16 weight bytes of a block hold the high nibbles of 16 even columns, slots h .. h + 15 of
 * xq, and the low nibbles of the 16 odd columns beside them, slots 32 + h .. 32 + h + 15.
 *
 * The integer sums are exact on every build; only the float sums could differ, and here they do not.
 * At the end of each block the 4 int32 lanes of each (row of x, weight row) are added across (`addp`,
 * exact in integers), 4 weight rows into one vector, converted (exact below 2^24), and multiply-added
 * into that row of x's float sums: acc = fma(isum, d[m, b], acc), lane r for weight row r, block after
 * block. That is fmaf(d[m, b], isum, acc) of gemv_x8_ref in its order: NEON builds give the scalar
 * reference's bits, as the x86 strips do. It costs 3 pairwise adds, a conversion and an fma per block, 4
 * weight rows and row of x, beside 16 (int8) or 8 (int4) `sdot`.
 *
 * Without dotprod: `smull` / `smlal2` multiply 8 byte pairs into int16 lanes (two products of |w| <= 128
 * and |xq| <= 127 fit in one: 2 x 16256 < 32768) and `sadalp` adds neighbouring lanes into int32: three
 * instructions for one `sdot`, the same integer sums.
 *
 * The tile: 4 weight rows (one float lane each) against 4 rows of x for int8 and 3 for int4, chosen so
 * that the 4 x R int32 accumulators, the weight vectors (int4: split into 2 x 4) and R float sums fit the
 * 32 registers, not timed: no Arm machine was at hand (docs/quantization.md, "Instruction sets").
 */
#define X8N_WROWS 4   /* weight rows per tile: the lanes of one float vector of sums per row of x */
#define X8N_MAX_R 4
static inline int x8n_rows(int bits) { return bits == 4 ? 3 : 4; }   /* rows of x per pass */

/* acc + the products of 16 signed byte pairs, summed in 4 int32 lanes (which lane gets which product
 * differs with dotprod and without; the sum across the lanes does not). */
static inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, w, x);
#else
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
#endif
}

/* Lane r of the result: the 4 lanes of s[r] added (exact: integers). */
static inline int32x4_t lane_sums(const int32x4_t s[X8N_WROWS]) {
    return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
}

/* A tile: rows [m0, m0 + mb) of xq against nr <= X8N_WROWS weight rows (stride bytes apart), every block
 * summed in block order; out[m * X8N_WROWS + r]. Inlined with constant mb, nr and bits (tile_pass). */
static inline __attribute__((always_inline)) void tile_x8_neon(const x8_t *xq, int m0, int mb, const int8_t *w,
                                                               size_t stride, int nr, int bits, float *out) {
    const int K = xq->K, nb = xq->nb, full = K / QK;
    const int8_t *q = xq->q + (size_t)m0 * K;
    const float *d = xq->d + (size_t)m0 * nb;
    float32x4_t acc[X8N_MAX_R];
    for (int m = 0; m < mb; m++) acc[m] = vdupq_n_f32(0.0f);
    for (int b = 0; b < full; b++) {
        int32x4_t s[X8N_MAX_R][X8N_WROWS];   /* rows past nr stay 0: their lanes are never read */
        for (int m = 0; m < mb; m++)
            for (int r = 0; r < X8N_WROWS; r++) s[m][r] = vdupq_n_s32(0);
        if (bits == 8) {
            for (int c = 0; c < QK; c += 16) {
                int8x16_t wv[X8N_WROWS];
                for (int r = 0; r < nr; r++) wv[r] = vld1q_s8(w + r * stride + (size_t)b * QK + c);
                for (int m = 0; m < mb; m++) {
                    const int8x16_t xv = vld1q_s8(q + (size_t)m * K + (size_t)b * QK + c);
                    for (int r = 0; r < nr; r++) s[m][r] = dot16(s[m][r], wv[r], xv);
                }
            }
        } else {
            for (int h = 0; h < QK / 2; h += 16) {   /* 16 bytes: 16 even columns and the 16 odd ones */
                int8x16_t hi[X8N_WROWS], lo[X8N_WROWS];
                for (int r = 0; r < nr; r++) {
                    const int8x16_t bytes = vld1q_s8(w + r * stride + (size_t)b * (QK / 2) + h);
                    hi[r] = vshrq_n_s8(bytes, 4);
                    lo[r] = vshrq_n_s8(vshlq_n_s8(bytes, 4), 4);
                }
                for (int m = 0; m < mb; m++) {
                    const int8_t *xb = q + (size_t)m * K + (size_t)b * QK;
                    const int8x16_t even = vld1q_s8(xb + h), odd = vld1q_s8(xb + QK / 2 + h);
                    for (int r = 0; r < nr; r++) s[m][r] = dot16(dot16(s[m][r], hi[r], even), lo[r], odd);
                }
            }
        }
        for (int m = 0; m < mb; m++)   /* fused: acc + isum * d, rounded once, as fmaf(d, isum, acc) */
            acc[m] = vfmaq_f32(acc[m], vcvtq_f32_s32(lane_sums(s[m])), vdupq_n_f32(d[(size_t)m * nb + b]));
    }
    for (int m = 0; m < mb; m++) vst1q_f32(out + m * X8N_WROWS, acc[m]);
    if (full < nb)   /* the short last block, in natural order, by the scalar code */
        for (int m = 0; m < mb; m++)
            for (int r = 0; r < nr; r++)
                out[m * X8N_WROWS + r] = fmaf(d[(size_t)m * nb + full],
                                              (float)block_isum(q + (size_t)m * K, w + r * stride, bits, X8_NATURAL,
                                                                full * QK, K - full * QK),
                                              out[m * X8N_WROWS + r]);
}

/* One tile with constant shapes for the usual cases (as ROWS_WITH_CONSTANT_SHAPES, gemv.c): the
 * accumulators stay in registers. Every case computes the same sums in the same order. */
static void tile_pass_neon(const x8_t *xq, int m0, int mb, const int8_t *w, size_t stride, int nr, int bits,
                           float *out) {
#define PASS(n, B) case n: tile_x8_neon(xq, m0, n, w, stride, X8N_WROWS, B, out); return;
    if (nr == X8N_WROWS) {
        if (bits == 4) switch (mb) { PASS(1, 4) PASS(2, 4) PASS(3, 4) }
        else switch (mb) { PASS(1, 8) PASS(2, 8) PASS(3, 8) PASS(4, 8) }
    }
#undef PASS
    if (bits == 4) tile_x8_neon(xq, m0, mb, w, stride, nr, 4, out);
    else tile_x8_neon(xq, m0, mb, w, stride, nr, 8, out);
}

/* Tiles [t0, t1) of X8N_WROWS weight rows against rows [p0, p1) of xq. */
static void tiles_x8_neon(void *arg, int t0, int t1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int p0 = job->p0, p1 = job->p1, N = job->N, bits = job->bits, R = x8n_rows(bits);
    const int KB = bits == 4 ? xq->K / 2 : xq->K;
    const float *scale = job->scale, *bias = job->bias;
    for (int t = t0; t < t1; t++) {
        const int n0 = t * X8N_WROWS, nr = N - n0 < X8N_WROWS ? N - n0 : X8N_WROWS;
        const int8_t *w = job->W + (size_t)n0 * KB;
        float out[X8N_MAX_R * X8N_WROWS];
        for (int m0 = p0; m0 < p1; m0 += R) {
            const int mb = p1 - m0 < R ? p1 - m0 : R;
            tile_pass_neon(xq, m0, mb, w, KB, nr, bits, out);
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < nr; r++)
                    job->y[(size_t)(m0 + m) * N + n0 + r] = out[m * X8N_WROWS + r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

#define X8_ORDER(bits) ((bits) == 4 ? X8_HALVES : X8_NATURAL)
#define X8_TILE_ROWS(bits) X8N_WROWS       /* weight rows per work item */
#define X8_TILE_XROWS(bits) x8n_rows(bits) /* rows of x per pass */
#define X8_TILES tiles_x8_neon
#endif  /* KERNEL_NEON */
