/*
 * int8 activations on AVX2: register tiles of X8_WROWS weight rows against X8_ROWS rows of xq, the products
 * by `vpmaddubsw`. Compiled where the build has no AVX512-VNNI (X8_VNNI, common.h) and is not NEON (those
 * have x8_neon.c): the AVX2 and AVX-512 (F+BW) builds run the vector code, the scalar build the plain C in
 * tile_x8's #else. The X8_* macros at the end tell x8.c how to run the tiles.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#if !defined(X8_VNNI) && !defined(KERNEL_NEON)
/* ---- int8 activations on AVX2 (and the scalar code) ------------------------------------------ */

/* A register tile: X8_WROWS weight rows against up to X8_ROWS rows of xq. For each block of columns,
 * the weight rows are loaded (int4: also unpacked) once and each row of xq once: every product pair
 * shares both loads. Registers (AVX2: 16): X8_ROWS x X8_WROWS accumulators, the weight blocks (2 per
 * weight row), one block of xq and the products in flight. */
#define X8_ROWS 3
#define X8_WROWS 2

#if defined(__AVX2__)
static inline float vhsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One block's exact integer sums in LANES int32 lanes (lane j: bytes 4j..4j+3 of both halves), from the
 * two halves of the block's unsigned weight bytes (u0, u1) and signed xq bytes (x0, x1), started at
 * `init`. int4: u = nibble + 8 and init = minus8; int8: u = |w|, x carries w's sign and init = 0. */
static inline __m256i block_sums(__m256i u0, __m256i u1, __m256i x0, __m256i x1, __m256i init, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 4)   /* the two halves' int16 pair sums can be added first: each <= 2 * 2 * 15 * 127 */
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, x0),
                                                                   _mm256_maddubs_epi16(u1, x1)), ones), init);
    /* int8 pair sums reach 2 * 128 * 127: widen each half to int32 before adding */
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x1), ones));
}
#endif

static inline __attribute__((always_inline)) void tile_x8(const x8_t *xq, int m0, int mb, const int8_t *w, size_t stride,
                                                          int nr, int bits, float *out /* [mb][X8_WROWS] */) {
    const int K = xq->K, nb = xq->nb, full = K / QK;
    const int8_t *q = xq->q + (size_t)m0 * K;
    const float *d = xq->d + (size_t)m0 * nb;
    float sum[X8_ROWS][X8_WROWS] = {{0}};
#if defined(__AVX2__)
    const int32_t *minus8 = xq->minus8 + (size_t)m0 * nb * LANES;
    __m256 acc[X8_ROWS][X8_WROWS];
    for (int m = 0; m < X8_ROWS; m++)
        for (int r = 0; r < X8_WROWS; r++) acc[m][r] = _mm256_setzero_ps();
    for (int b = 0; b < full; b++) {
        const int k0 = b * QK;
        /* The block's two halves of weights, in xq's order: signed (int8, for the signs) and unsigned. */
        __m256i w0[X8_WROWS], w1[X8_WROWS], u0[X8_WROWS], u1[X8_WROWS];
        for (int r = 0; r < nr; r++) {
            if (bits == 8) {
                w0[r] = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0));
                w1[r] = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0 + 32));
                u0[r] = _mm256_abs_epi8(w0[r]);
                u1[r] = _mm256_abs_epi8(w1[r]);
            } else {   /* 32 bytes: high nibbles (even columns), low nibbles (odd columns), each + 8 */
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0 / 2));
                const __m256i nib = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
                u0[r] = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib), eight);
                u1[r] = _mm256_xor_si256(_mm256_and_si256(bytes, nib), eight);
            }
        }
        for (int m = 0; m < mb; m++) {
            const int8_t *xb = q + (size_t)m * K + k0;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb), x1 = _mm256_loadu_si256((const __m256i *)(xb + 32));
            const __m256 dm = _mm256_broadcast_ss(d + (size_t)m * nb + b);
            const __m256i init = bits == 4 ? _mm256_loadu_si256((const __m256i *)(minus8 + ((size_t)m * nb + b) * LANES))
                                           : _mm256_setzero_si256();
            for (int r = 0; r < nr; r++) {
                const __m256i s = bits == 4 ? block_sums(u0[r], u1[r], x0, x1, init, 4)
                                            : block_sums(u0[r], u1[r], _mm256_sign_epi8(x0, w0[r]),
                                                         _mm256_sign_epi8(x1, w1[r]), init, 8);
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dm, acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) sum[m][r] = vhsum8(acc[m][r]);
#else
    for (int b = 0; b < full; b++)
        for (int m = 0; m < mb; m++)
            for (int r = 0; r < nr; r++)
                sum[m][r] = fmaf(d[(size_t)m * nb + b], (float)block_isum(q + (size_t)m * K, w + r * stride, bits,
                                                                          bits == 4 ? X8_HALVES : X8_NATURAL, b * QK, QK),
                                 sum[m][r]);
#endif
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) {
            if (full < nb)   /* the short last block */
                sum[m][r] = fmaf(d[(size_t)m * nb + full],
                                 (float)block_isum(q + (size_t)m * K, w + r * stride, bits, X8_NATURAL, full * QK, K - full * QK),
                                 sum[m][r]);
            out[m * X8_WROWS + r] = sum[m][r];
        }
}

/* Tiles [t0, t1) of X8_WROWS weight rows against rows [p0, p1) of xq. */
static void tiles_x8(void *arg, int t0, int t1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int p0 = job->p0, p1 = job->p1, N = job->N, KB = job->bits == 4 ? xq->K / 2 : xq->K;
    const float *scale = job->scale, *bias = job->bias;
    for (int t = t0; t < t1; t++) {
        const int n0 = t * X8_WROWS, nr = N - n0 < X8_WROWS ? N - n0 : X8_WROWS;
        const int8_t *w = job->W + (size_t)n0 * KB;
        float out[X8_ROWS * X8_WROWS];
        for (int m0 = p0; m0 < p1; m0 += X8_ROWS) {
            const int mb = p1 - m0 < X8_ROWS ? p1 - m0 : X8_ROWS;
            /* Constant shapes for the usual cases (as ROWS_WITH_CONSTANT_SHAPES, gemv.c). One row of x
             * (decode) takes the weight rows one at a time: a single stream is bound by memory, and
             * one weight row leaves the compiler more registers. */
#define X8_SHAPES(B)                                                                          \
            if (nr == X8_WROWS && mb == 1) {                                                  \
                tile_x8(xq, m0, 1, w, KB, 1, B, out);                                         \
                tile_x8(xq, m0, 1, w + KB, KB, 1, B, out + 1);                                \
            } else if (nr == X8_WROWS && mb == 2) tile_x8(xq, m0, 2, w, KB, X8_WROWS, B, out); \
            else if (nr == X8_WROWS && mb == 3) tile_x8(xq, m0, 3, w, KB, X8_WROWS, B, out);  \
            else tile_x8(xq, m0, mb, w, KB, nr, B, out);
            if (job->bits == 8) { X8_SHAPES(8) } else { X8_SHAPES(4) }
#undef X8_SHAPES
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < nr; r++)
                    job->y[(size_t)(m0 + m) * N + n0 + r] = out[m * X8_WROWS + r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

#define X8_ORDER(bits) ((bits) == 4 ? X8_HALVES : X8_NATURAL)
#define X8_TILE_ROWS(bits) X8_WROWS   /* weight rows per work item */
#define X8_TILE_XROWS(bits) X8_ROWS   /* rows of x per pass */
#define X8_TILES tiles_x8
#endif  /* !X8_VNNI && !KERNEL_NEON */
