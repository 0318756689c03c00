/*
 * The exact weight-only kernels on bf16 x with AVX512-BF16's bf16 pair products: rows_xbf16, the twin of
 * gemv_fp32.c's rows for a bf16 model's activations, and the widening of the weights to bf16 that it reads.
 * Empty unless this build has XBF16_DP (common.h); gemv.c picks them.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- bf16 activations: a bf16 model's decode rows -------------------------------------------- */
/*
 * In a bf16 model x arrives in bf16. AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later) has
 * `vdpbf16ps`: 32 products of bf16 pairs per instruction, each adjacent pair added into one fp32 lane,
 * twice the products of an fp32 FMA. Every weight value here is exact in bf16 (int8, an int4 nibble, a
 * bf16 head weight), and so is the product of two bf16 in fp32: these are the exact sums of the kernels
 * of gemv_fp32.c, in another order (pairs of columns), with bf16 denormals (below 1e-38) read as zero, the
 * instruction's rule. Each row of y is still summed in the same order whatever M is.
 *
 * The weights are widened in registers:
 * - int8: 32 bytes -> two fp32 vectors -> 32 bf16 in column order (vcvtne2ps2bf16, exact);
 * - int4: 32 bytes -> 64 nibbles by two 32-entry table lookups, the high nibbles (even columns) and the
 *   low ones (odd columns). vpermw reads an index's low 5 bits and the table holds the 16 values twice,
 *   so the low nibble needs no mask. x is rearranged to match once per call (interleave_q4_bf16);
 * - bf16 (the LM head): as they are.
 *
 * Every build other than "avx512-vnni-bf16" has no `vdpbf16ps`: there the same entry points (gemv.c) widen
 * x to fp32 and run the kernels of gemv_fp32.c.
 */
#ifdef XBF16_DP
static void interleave_q4_bf16(const uint16_t *x, int K, uint16_t *out) {
    interleave_cols((const char *)x, K, (char *)out, 32, sizeof(uint16_t));
}

static inline __m512bh as_bf16(__m512i v) { return (__m512bh)v; }

static inline __m512bh load_q8_bf16(const int8_t *w) {   /* 32 bytes -> 32 bf16 */
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(b, a);   /* words 0-15 from a (columns 0-15), 16-31 from b */
}

static inline void load_q4_bf16(const int8_t *w, __m512bh *hi, __m512bh *lo) {   /* 32 bytes -> 2 x 32 bf16 */
    const __m512 value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(value, value);
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)w));
    *hi = as_bf16(_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table));
    *lo = as_bf16(_mm512_permutexvar_epi16(b, table));
}

/* A batch of more than X_ROWS rows of x passes the same weight rows several times. Widening int8 to bf16
 * costs 5 instructions per 32 weights, as much as the products it feeds in a pass of X_ROWS rows, so
 * then the block's int8 weights are widened once into the thread's scratch buffer (L1/L2) and every pass
 * reads them from there: vectors wb[((t * ROW_BLOCK + r) * nvec + v) * 32] for step t, weight row r and
 * vector v, then each row's tail columns in natural order. The same values in the same operations: the
 * results do not change. (int4 too could, with nvec = 2 for the high and low nibbles; but its two
 * table lookups are cheaper than reading 4x the bytes back, so int4 widens per pass: measured in
 * benchmarks/README.md, "Design choices".) */
static void widen_rows_bf16(const int8_t *w, size_t stride, int K, int rows, int bits, uint16_t *wb) {
    const int step = bits == 4 ? 64 : 32, nvec = bits == 4 ? 2 : 1, steps = K / step, tail = K - steps * step;
    for (int t = 0; t < steps; t++)
        for (int r = 0; r < rows; r++) {
            uint16_t *v = wb + ((size_t)t * ROW_BLOCK + r) * nvec * 32;
            __m512bh w0, w1;
            if (bits == 4) {
                load_q4_bf16(w + r * stride + t * step / 2, &w0, &w1);
                _mm512_storeu_si512(v + 32, (__m512i)w1);
            } else {
                w0 = load_q8_bf16(w + r * stride + t * step);
            }
            _mm512_storeu_si512(v, (__m512i)w0);
        }
    uint16_t *tails = wb + (size_t)steps * ROW_BLOCK * nvec * 32;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < tail; i++) {
            const int col = steps * step + i;
            const int8_t *wr = w + r * stride;
            const float f = (float)(bits == 4 ? (col % 2 ? int4_low(wr[col / 2]) : int4_high(wr[col / 2])) : wr[col]);
            uint32_t u;
            memcpy(&u, &f, 4);
            tails[r * tail + i] = (uint16_t)(u >> 16);   /* a small integer: exact in bf16 */
        }
}

static size_t widened_bytes(int K) { return sizeof(uint16_t) * ((size_t)ROW_BLOCK * K + 64); }

/* Up to ROW_BLOCK weight rows (bits: 8, 4, or 16 for bf16 weights) against up to X_ROWS rows of bf16 x.
 * Per row of y: one accumulator, 32 (int8, bf16) or 64 (int4: high nibbles, then low) columns a step,
 * then the horizontal sum, then the scalar tail. out[m * ROW_BLOCK + r]. wb: the rows already widened
 * (widen_rows_bf16), or NULL to widen them here. (X_ROWS = 3 here too: 4 or more rows of x per pass
 * spill accumulators and were slower on Zen 4; benchmarks/README.md, "Design choices".) */
static inline __attribute__((always_inline)) void rows_xbf16(const uint16_t *x, size_t ldx, int mb, const int8_t *w,
                                                             size_t stride, int K, int rows, float *out, int bits,
                                                             const uint16_t *wb) {
    __m512 acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = _mm512_setzero_ps();
    const int step = bits == 4 ? 64 : 32, nvec = bits == 4 ? 2 : 1, tail = K % step;
    int k = 0;
    for (; k + step <= K; k += step) {
        __m512bh x0[X_ROWS], x1[X_ROWS];   /* loaded once for all weight rows */
        for (int m = 0; m < mb; m++) {
            x0[m] = as_bf16(_mm512_loadu_si512(x + m * ldx + k));
            if (bits == 4) x1[m] = as_bf16(_mm512_loadu_si512(x + m * ldx + k + 32));
        }
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            __m512bh w0, w1;
            if (wb) {
                const uint16_t *v = wb + ((size_t)(k / step) * ROW_BLOCK + r) * nvec * 32;
                w0 = as_bf16(_mm512_loadu_si512(v));
                if (bits == 4) w1 = as_bf16(_mm512_loadu_si512(v + 32));
            }
            else if (bits == 4) load_q4_bf16(wr + k / 2, &w0, &w1);
            else if (bits == 8) w0 = load_q8_bf16(wr + k);
            else w0 = as_bf16(_mm512_loadu_si512((const uint16_t *)wr + k));
            for (int m = 0; m < mb; m++) {
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], w0, x0[m]);
                if (bits == 4) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], w1, x1[m]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            const uint16_t *xm = x + m * ldx;
            float d = _mm512_reduce_add_ps(acc[m][r]);
            for (int kk = k; kk < K; kk++) {   /* int4: the tail keeps the natural column order */
                const float wv = wb ? bf16_to_f32(wb[(size_t)(K / step) * ROW_BLOCK * nvec * 32 + r * tail + kk - k])
                               : bits == 4 ? (float)(kk % 2 ? int4_low(wr[kk / 2]) : int4_high(wr[kk / 2]))
                               : bits == 8 ? (float)wr[kk] : bf16_to_f32(((const uint16_t *)wr)[kk]);
                d += bf16_to_f32(xm[kk]) * wv;
            }
            out[m * ROW_BLOCK + r] = d;
        }
}
#endif
