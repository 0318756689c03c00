/*
 * int8 activations on AVX512-VNNI: strips of 16 G weight rows, one row per int32 lane, against R rows of xq,
 * the products by `vpdpbusd`. pack_strip lays a strip's rows out in lanes, per call; relayout.c does it once
 * for a model's weights (the lane layout). Compiled where the build has X8_VNNI (common.h). The X8_* macros
 * at the end tell x8.c how to run the strips.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#ifdef X8_VNNI
/* ---- int8 activations on AVX512-VNNI ---------------------------------------------------------- */
/*
 * `vpdpbusd` adds to each of 16 int32 lanes the products of 4 unsigned bytes of one operand with 4 signed
 * bytes of the other. Here lane i is weight row n0 + i and the signed bytes are 4 columns of one row of
 * xq, the same in every lane: one instruction is 4 columns of 16 weight rows, and no lane ever needs a
 * horizontal sum. A block's 64 columns are 16 instructions per 16 rows (2 x 8 for int4), then one
 * conversion and one fused multiply-add: acc = fma(d[m, b], isum, acc), block after block, as the scalar
 * reference sums (these builds give the reference's bits).
 *
 * The weights are the unsigned side: u = nibble + 8 (int4) or w + 128 (int8), both one XOR of the sign
 * bit, and each block's sums start at -8 (or -128) times the block's sum of xq (bsum) to take the
 * excess back, exactly.
 *
 * Lanes want group c (4 bytes along k) of 16 rows side by side, where W stores each row's groups in
 * sequence. A model loaded with int8 activations has its weights rearranged so once (the lane layout,
 * x8_relayout_weights), with the sign bits already flipped: each strip of 16 G rows (below) is read as it is,
 * one sequential stream, and goes straight into the products. Weights in the hub's layout (and a model's
 * last strip of fewer rows) are transposed per call, 16 x 16 groups at a time in registers, into a buffer
 * that stays in L1/L2 while every row of x passes it; that costs about as much as reading them. For int4 a group is 8 columns, the high nibbles the even ones and the low nibbles the
 * odd ones, so xq stores each 8 columns as 4 even, then 4 odd (X8_OCTETS). A last block shorter than QK
 * is summed by the scalar code.
 *
 * Where the time goes (Zen 4, one 512-bit vpdpbusd per cycle and core): besides the products, each
 * int4 weight vector is split into its nibbles (3 instructions) and each 4 columns of a row of x are
 * broadcast to all lanes (1 instruction, about as costly as a product). A pass takes R rows of x against
 * G vectors of 16 weight rows (a strip of 16 G rows), so a broadcast feeds G products and a split vector
 * 2 R. Of the shapes that fit the 32 registers (R x G int32 and float accumulators), the fastest, in
 * runs taken in turns (numbers: benchmarks/README.md, "Design choices"):
 * - int4: G = 4, R = 3: a broadcast feeds 4 products. (G = 1, R = 8: one broadcast per product.)
 * - int8 (no nibbles to split): G = 2, R = 5, where more rows of x per split matter less.
 * Software prefetches (of the strip ahead, or of the next strip during a strip's later passes) made int4
 * slower or no faster at 1, 8 and 16 rows; int8 was not tried.
 */
static inline int vnni_groups(int bits) { return bits == 4 ? 4 : 2; }   /* G: vectors of 16 weight rows per strip */
static inline int vnni_rows(int bits) { return bits == 4 ? 3 : 5; }     /* R: rows of x per pass */
#define VNNI_MAX_G 4
#define VNNI_MAX_R 5

/* The sign bit of every weight in a 4-byte group: 0x88888888 (two nibbles a byte) or 0x80808080. */
static inline int32_t sign_bits(int bits) { return bits == 4 ? (int32_t)0x88888888u : (int32_t)0x80808080u; }

/* Groups [0, groups) of `rows` weight rows (row_bytes apart) of a strip of 16 G, lanes side by side, XOR
 * `flip`: out[(c * G + g) * 16 + i] = (group c of row 16 g + i) ^ flip. Lanes past `rows` hold flip
 * (their sums are never used). The same XOR again gives the weights back. */
static void pack_strip(const int8_t *W, size_t row_bytes, int rows, int groups, int G, int32_t flip, int32_t *out) {
    const __m512i f = _mm512_set1_epi32(flip);
    for (int g = 0; g < G; g++) {
        int c = 0;
        for (; c + 16 <= groups; c += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = 16 * g + i < rows ? _mm512_loadu_si512(W + (16 * g + i) * row_bytes + 4 * (size_t)c)
                                         : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++)
                _mm512_storeu_si512(out + ((size_t)(c + i) * G + g) * 16, _mm512_xor_si512(r[i], f));
        }
        for (; c < groups; c++)
            for (int i = 0; i < 16; i++) {
                int32_t v = 0;
                if (16 * g + i < rows) memcpy(&v, W + (16 * g + i) * row_bytes + 4 * (size_t)c, 4);
                out[((size_t)c * G + g) * 16 + i] = v ^ flip;
            }
    }
}

/* The full blocks of rows [m0, m0 + mb) of xq against a packed strip: out[m * 16 G + n]. bits and mb are
 * constants where this is inlined, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void strip_x8(const int32_t *packed, const x8_t *xq, int m0, int mb,
                                                           int bits, float *out) {
    const int K = xq->K, nb = xq->nb, full = K / QK, per_block = bits == 4 ? QK / 8 : QK / 4;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int excess = bits == 4 ? -8 : -128, G = vnni_groups(bits);
    __m512 accf[VNNI_MAX_R][VNNI_MAX_G];
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) accf[m][g] = _mm512_setzero_ps();
    for (int b = 0; b < full; b++) {
        const int32_t *wb = packed + (size_t)b * per_block * 16 * G;
        const int8_t *xb = xq->q + (size_t)m0 * K + (size_t)b * QK;
        __m512i acc[VNNI_MAX_R][VNNI_MAX_G];
        for (int m = 0; m < mb; m++)
            for (int g = 0; g < G; g++) acc[m][g] = _mm512_set1_epi32(excess * xq->bsum[(size_t)(m0 + m) * nb + b]);
        for (int c = 0; c < per_block; c++) {
            __m512i x0[VNNI_MAX_R], x1[VNNI_MAX_R];
            for (int m = 0; m < mb; m++) {
                const int8_t *xc = xb + (size_t)m * K + 4 * (bits == 4 ? 2 * c : c);
                int32_t v;
                memcpy(&v, xc, 4);
                x0[m] = _mm512_set1_epi32(v);
                if (bits == 4) {
                    memcpy(&v, xc + 4, 4);
                    x1[m] = _mm512_set1_epi32(v);
                }
            }
            for (int g = 0; g < G; g++) {
                const __m512i u = _mm512_loadu_si512(wb + (c * G + g) * 16);
                if (bits == 4) {   /* high nibbles: the 4 even columns; low nibbles: the 4 odd ones */
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(u, 4), low4), lo = _mm512_and_si512(u, low4);
                    for (int m = 0; m < mb; m++)
                        acc[m][g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][g], hi, x0[m]), lo, x1[m]);
                } else {
                    for (int m = 0; m < mb; m++) acc[m][g] = _mm512_dpbusd_epi32(acc[m][g], u, x0[m]);
                }
            }
        }
        for (int m = 0; m < mb; m++) {
            const __m512 dm = _mm512_set1_ps(xq->d[(size_t)(m0 + m) * nb + b]);
            for (int g = 0; g < G; g++) accf[m][g] = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(acc[m][g]), accf[m][g]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) _mm512_storeu_ps(out + (m * G + g) * 16, accf[m][g]);
}

/* One pass with bits and mb constants (mb: 1 to vnni_rows(bits)). */
static void strip_pass(const int32_t *packed, const x8_t *xq, int m0, int mb, int bits, float *out) {
#define PASS(n, B) case n: strip_x8(packed, xq, m0, n, B, out); break;
    if (bits == 4) switch (mb) { PASS(1, 4) PASS(2, 4) PASS(3, 4) }
    else switch (mb) { PASS(1, 8) PASS(2, 8) PASS(3, 8) PASS(4, 8) PASS(5, 8) }
#undef PASS
}

/* 4-byte groups in a row's full blocks. */
static inline int full_groups(int K, int bits) { return K / QK * (bits == 4 ? QK / 8 : QK / 4); }

/* Strips [s0, s1) of 16 G weight rows against rows [p0, p1) of xq. */
static void strips_x8(void *arg, int s0, int s1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int K = xq->K, nb = xq->nb, full = K / QK, bits = job->bits, N = job->N, groups = full_groups(K, bits);
    const size_t KB = bits == 4 ? (size_t)K / 2 : (size_t)K, full_bytes = 4 * (size_t)groups, tail = KB - full_bytes;
    const int G = vnni_groups(bits), strip_rows = 16 * G, R = vnni_rows(bits);
    int32_t *scratch = (int32_t *)thread_scratch(sizeof(int32_t) * ((size_t)groups * strip_rows + 1));
    float out[VNNI_MAX_R * 16 * VNNI_MAX_G];
    for (int s = s0; s < s1; s++) {
        const int n0 = s * strip_rows, rows = N - n0 < strip_rows ? N - n0 : strip_rows;
        const int8_t *w = job->W + (size_t)n0 * KB;
        const int ready = job->lanes && rows == strip_rows;   /* a full strip already in the lane layout */
        const int32_t *packed = ready ? (const int32_t *)w : scratch;
        if (!ready) pack_strip(w, KB, rows, groups, G, sign_bits(bits), scratch);
        for (int m0 = job->p0, mb; m0 < job->p1; m0 += mb) {
            /* As few passes as R allows, of near-equal rows: 4 rows are 2 + 2, not 3 + 1 (a pass of one
             * row costs nearly what one of two does). */
            const int left = job->p1 - m0, passes = (left + R - 1) / R;
            mb = (left + passes - 1) / passes;
            strip_pass(packed, xq, m0, mb, bits, out);
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < rows; r++) {
                    float sum = out[m * strip_rows + r];
                    if (full < nb) {   /* the short last block */
                        const int8_t *wt = ready ? w + full_bytes * strip_rows + r * tail : w + r * KB + full_bytes;
                        sum = fmaf(xq->d[(size_t)(m0 + m) * nb + full],
                                   (float)block_isum(xq->q + (size_t)(m0 + m) * K + full * QK, wt, bits, X8_NATURAL, 0,
                                                     K - full * QK), sum);
                    }
                    job->y[(size_t)(m0 + m) * N + n0 + r] = sum * job->scale[n0 + r] + (job->bias ? job->bias[n0 + r] : 0.0f);
                }
        }
    }
}

#define X8_LANES 1   /* this build has the lane layout (relayout.c) */
#define X8_ORDER(bits) ((bits) == 4 ? X8_OCTETS : X8_NATURAL)
#define X8_TILE_ROWS(bits) (16 * vnni_groups(bits))
#define X8_TILE_XROWS(bits) vnni_rows(bits)
#define X8_TILES strips_x8
#endif  /* X8_VNNI */
