/*
 * int8 activations on x86 (AVX2, AVX-512, AVX512-VNNI): strips of SL G weight rows, one row per int32 lane
 * (SL = 8 on AVX2, 16 on AVX-512), against R rows of xq. pack_strip lays a strip's rows out in lanes, per
 * call; relayout.c does it once for a model's weights (the lane layout). Compiled where the build has
 * X8_STRIPS (common.h). The X8_* macros at the end tell x8.c how to run the strips.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#ifdef X8_STRIPS
/* ---- int8 activations in strips ----------------------------------------------------------------- */
/*
 * Lane i of a vector is weight row n0 + i, and the other operand is 4 columns of one row of xq, the same
 * in every lane: one step adds 4 columns' products into each of SL weight rows, and no lane ever needs a
 * horizontal sum. At the end of a block of QK columns each lane's exact integer sum is converted and
 * multiply-added into the row's float sum, acc = fma(d[m, b], isum, acc), block after block: the scalar
 * reference's order, so every build here gives gemv_x8_ref's bits.
 *
 * The step (dot_bytes for int8, run_nibbles for int4, below), per instruction set:
 * - AVX512-VNNI: `vpdpbusd`, 4 products of unsigned bytes by signed ones into each int32 lane, one
 *   instruction. The weights are the unsigned side: u = nibble + 8 (int4) or w + 128 (int8), one XOR of
 *   the sign bit, and each block's sums start at -8 (or -128) times its sum of xq (bsum) to take the
 *   excess back, exactly.
 * - AVX2 and AVX-512 without VNNI: `vpmaddubsw` (pairs of the same products into saturating int16), then
 *   `vpmaddwd` by ones (pairs of int16 into int32), then an add. int4: the pair sums of NIBBLE_RUN groups
 *   (both nibbles of each) are added up in int16 first and widened once, so a group of 8 columns takes
 *   2 `vpmaddubsw` and 2 `vpaddw`, and each run one `vpmaddwd` and one `vpaddd`. int8: u = w + 128 would
 *   saturate int16 (2 x 255 x 127), so, as ggml does, |w| multiplies xq carrying w's sign (2 x 128 x 127
 *   fits; |-128| read unsigned is 128) and int8 weights keep their sign bits (no XOR, no excess).
 *
 * For int4 a 4-byte group is 8 columns, the high nibbles the even ones and the low nibbles the odd ones, so
 * xq stores each 8 columns as 4 even, then 4 odd (X8_OCTETS). A last block shorter than QK is summed by
 * the scalar code.
 *
 * Lanes want group c (4 bytes along k) of SL rows side by side, where W stores each row's groups in
 * sequence. A model loaded with int8 activations has its weights rearranged so once (the lane layout,
 * x8_relayout_weights), sign bits already flipped where the step wants them: each strip of SL G rows
 * (below) is read as it is, one sequential stream. Weights in the hub's layout (and a model's last strip
 * of fewer rows) are transposed per call, SL x SL groups at a time in registers, into a buffer that stays
 * in L1/L2 while every row of x passes it; that costs about as much as reading them.
 *
 * The shape of a pass: R rows of x against G vectors of SL weight rows (a strip of SL G rows). Each 4
 * columns of a row of x are broadcast to all lanes once per pass and feed G steps; an int4 weight vector
 * is split into its nibbles (3 instructions) once and feeds R. The R x G int32 sums, R x G float sums
 * and (int4 without VNNI) R x G int16 run sums want registers (32 on AVX-512, 16 on AVX2, where the
 * chosen shapes spill some of them); the shapes below are the fastest of those tried, in runs taken in
 * turns (benchmarks/README.md, "Design choices"). Software prefetches made VNNI int4 slower or no faster.
 */
/* int4 groups whose pair sums add up in int16 without vpmaddwd: each group adds 2 x 2 products of a
 * nibble + 8 (<= 15) and an xq (|xq| <= 127) to a lane's int16, so 4 groups reach 16 x 15 x 127 = 30480,
 * under 2^15 (5 would not be). It must divide QK / 8, the groups of a block. */
#define RUN_IN_INT16 4
_Static_assert(RUN_IN_INT16 * 4 * 15 * 127 < 32768 && QK / 8 % RUN_IN_INT16 == 0, "int4 run sums must fit int16");

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SL 16   /* int32 lanes, weight rows per vector */
typedef __m512i vi;
static inline vi vi_load(const void *p) { return _mm512_loadu_si512(p); }
static inline void vi_store(void *p, vi v) { _mm512_storeu_si512(p, v); }
static inline vi vi_set1(int32_t v) { return _mm512_set1_epi32(v); }
static inline vi vi_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
static inline vf vi_to_vf(vi v) { return _mm512_cvtepi32_ps(v); }
static inline void vi_transpose(vi r[SL]) { transpose16(r); }
static inline vi high_nibbles(vi u) { return _mm512_and_si512(_mm512_srli_epi16(u, 4), _mm512_set1_epi8(0x0F)); }
static inline vi low_nibbles(vi u) { return _mm512_and_si512(u, _mm512_set1_epi8(0x0F)); }
#ifdef X8_VNNI
#define NIBBLE_RUN 8   /* groups per run: a whole block (the run sums are the int32 sums themselves) */
static inline vi dot_bytes(vi acc, vi u, vi x) { return _mm512_dpbusd_epi32(acc, u, x); }
static inline vi run_nibbles(vi run, vi hi, vi lo, vi x0, vi x1) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(run, hi, x0), lo, x1);
}
static inline vi run_start(vi acc) { return acc; }
static inline vi run_end(vi acc, vi run) { (void)acc; return run; }
#else
#define NIBBLE_RUN RUN_IN_INT16
static inline vi dot_bytes(vi acc, vi w, vi x) {   /* x negated where w < 0 (AVX-512 has no vpsignb) */
    const vi xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), xs), _mm512_set1_epi16(1)));
}
static inline vi run_nibbles(vi run, vi hi, vi lo, vi x0, vi x1) {
    return _mm512_add_epi16(run, _mm512_add_epi16(_mm512_maddubs_epi16(hi, x0), _mm512_maddubs_epi16(lo, x1)));
}
static inline vi run_start(vi acc) { (void)acc; return _mm512_setzero_si512(); }
static inline vi run_end(vi acc, vi run) { return _mm512_add_epi32(acc, _mm512_madd_epi16(run, _mm512_set1_epi16(1))); }
#endif
#else   /* AVX2 */
#define SL 8
typedef __m256i vi;
static inline vi vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void vi_store(void *p, vi v) { _mm256_storeu_si256((__m256i *)p, v); }
static inline vi vi_set1(int32_t v) { return _mm256_set1_epi32(v); }
static inline vi vi_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
static inline vf vi_to_vf(vi v) { return _mm256_cvtepi32_ps(v); }
static inline void vi_transpose(vi r[SL]) {   /* as 8 x 8 floats: the same 32-bit moves */
    __m256 f[SL];
    for (int i = 0; i < SL; i++) f[i] = _mm256_castsi256_ps(r[i]);
    transpose8(f);
    for (int i = 0; i < SL; i++) r[i] = _mm256_castps_si256(f[i]);
}
static inline vi high_nibbles(vi u) { return _mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi8(0x0F)); }
static inline vi low_nibbles(vi u) { return _mm256_and_si256(u, _mm256_set1_epi8(0x0F)); }
#define NIBBLE_RUN RUN_IN_INT16
static inline vi dot_bytes(vi acc, vi w, vi x) {
    const vi pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
static inline vi run_nibbles(vi run, vi hi, vi lo, vi x0, vi x1) {
    return _mm256_add_epi16(run, _mm256_add_epi16(_mm256_maddubs_epi16(hi, x0), _mm256_maddubs_epi16(lo, x1)));
}
static inline vi run_start(vi acc) { (void)acc; return _mm256_setzero_si256(); }
static inline vi run_end(vi acc, vi run) { return _mm256_add_epi32(acc, _mm256_madd_epi16(run, _mm256_set1_epi16(1))); }
#endif

/* 4 bytes of a row of xq in every lane. */
static inline vi broadcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return vi_set1(v);
}

/* G (vectors of SL weight rows per strip) and R (rows of x per pass), per build and bits. */
#if defined(X8_VNNI)
#define STRIP_G4 4
#define STRIP_R4 3
#define STRIP_G8 2
#define STRIP_R8 5
#elif SL == 16
#define STRIP_G4 4
#define STRIP_R4 3
#define STRIP_G8 2
#define STRIP_R8 4
#else
#define STRIP_G4 4
#define STRIP_R4 2
#define STRIP_G8 2
#define STRIP_R8 3
#endif
#define STRIP_MAX_G 4
#define STRIP_MAX_R 5
_Static_assert(STRIP_G4 <= STRIP_MAX_G && STRIP_G8 <= STRIP_MAX_G && STRIP_R4 <= STRIP_MAX_R && STRIP_R8 <= STRIP_MAX_R,
               "the sums of a pass are arrays of STRIP_MAX_R x STRIP_MAX_G vectors");
static inline int strip_groups(int bits) { return bits == 4 ? STRIP_G4 : STRIP_G8; }
static inline int strip_rows_of_x(int bits) { return bits == 4 ? STRIP_R4 : STRIP_R8; }

/* The sign bits the step wants flipped in every weight of a 4-byte group, and the excess that flipping
 * adds to each product (the sums start at excess x bsum): int4 always; int8 where vpdpbusd takes it. */
#ifdef X8_VNNI
static inline int32_t sign_bits(int bits) { return bits == 4 ? (int32_t)0x88888888u : (int32_t)0x80808080u; }
static inline int excess(int bits) { return bits == 4 ? -8 : -128; }
#else
static inline int32_t sign_bits(int bits) { return bits == 4 ? (int32_t)0x88888888u : 0; }
static inline int excess(int bits) { return bits == 4 ? -8 : 0; }
#endif

/* Groups [0, groups) of `rows` weight rows (row_bytes apart) of a strip of SL G, lanes side by side, XOR
 * `flip`: out[(c * G + g) * SL + i] = (group c of row SL g + i) ^ flip. Lanes past `rows` hold flip
 * (their sums are never used). The same XOR again gives the weights back. Groups go SL at a time through
 * a register transpose; a row's full blocks hold 8 (int4) or 16 (int8) groups each, so only AVX-512's
 * int4 with an odd number of blocks leaves the last 8 groups to the scalar loop. */
static void pack_strip(const int8_t *W, size_t row_bytes, int rows, int groups, int G, int32_t flip, int32_t *out) {
    const vi f = vi_set1(flip);
    for (int g = 0; g < G; g++) {
        int c = 0;
        for (; c + SL <= groups; c += SL) {
            vi r[SL];
            for (int i = 0; i < SL; i++)
                r[i] = SL * g + i < rows ? vi_load(W + (SL * g + i) * row_bytes + 4 * (size_t)c) : vi_set1(0);
            vi_transpose(r);
            for (int i = 0; i < SL; i++) vi_store(out + ((size_t)(c + i) * G + g) * SL, vi_xor(r[i], f));
        }
        for (; c < groups; c++)
            for (int i = 0; i < SL; i++) {
                int32_t v = 0;
                if (SL * g + i < rows) memcpy(&v, W + (SL * g + i) * row_bytes + 4 * (size_t)c, 4);
                out[((size_t)c * G + g) * SL + i] = v ^ flip;
            }
    }
}

/* The full blocks of rows [m0, m0 + mb) of xq against a packed strip: out[m * SL G + n]. bits and mb are
 * constants where this is inlined, so the sums live in registers. */
static inline __attribute__((always_inline)) void strip_x8(const int32_t *packed, const x8_t *xq, int m0, int mb,
                                                           int bits, float *out) {
    const int K = xq->K, nb = xq->nb, full = K / QK, per_block = bits == 4 ? QK / 8 : QK / 4;
    const int G = strip_groups(bits);
    vf accf[STRIP_MAX_R][STRIP_MAX_G];
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) accf[m][g] = vzero();
    for (int b = 0; b < full; b++) {
        const int32_t *wb = packed + (size_t)b * per_block * SL * G;
        const int8_t *xb = xq->q + (size_t)m0 * K + (size_t)b * QK;
        vi acc[STRIP_MAX_R][STRIP_MAX_G];
        for (int m = 0; m < mb; m++)
            for (int g = 0; g < G; g++) acc[m][g] = vi_set1(excess(bits) * xq->bsum[(size_t)(m0 + m) * nb + b]);
        if (bits == 4)
            for (int c0 = 0; c0 < per_block; c0 += NIBBLE_RUN) {
                vi run[STRIP_MAX_R][STRIP_MAX_G];
                for (int m = 0; m < mb; m++)
                    for (int g = 0; g < G; g++) run[m][g] = run_start(acc[m][g]);
                for (int c = c0; c < c0 + NIBBLE_RUN; c++) {
                    vi x0[STRIP_MAX_R], x1[STRIP_MAX_R];   /* the 4 even and the 4 odd columns of group c */
                    for (int m = 0; m < mb; m++) {
                        x0[m] = broadcast4(xb + (size_t)m * K + 8 * c);
                        x1[m] = broadcast4(xb + (size_t)m * K + 8 * c + 4);
                    }
                    for (int g = 0; g < G; g++) {
                        const vi u = vi_load(wb + (c * G + g) * SL), hi = high_nibbles(u), lo = low_nibbles(u);
                        for (int m = 0; m < mb; m++) run[m][g] = run_nibbles(run[m][g], hi, lo, x0[m], x1[m]);
                    }
                }
                for (int m = 0; m < mb; m++)
                    for (int g = 0; g < G; g++) acc[m][g] = run_end(acc[m][g], run[m][g]);
            }
        else
            for (int c = 0; c < per_block; c++) {
                vi x0[STRIP_MAX_R];
                for (int m = 0; m < mb; m++) x0[m] = broadcast4(xb + (size_t)m * K + 4 * c);
                for (int g = 0; g < G; g++) {
                    const vi u = vi_load(wb + (c * G + g) * SL);
                    for (int m = 0; m < mb; m++) acc[m][g] = dot_bytes(acc[m][g], u, x0[m]);
                }
            }
        for (int m = 0; m < mb; m++) {
            const vf dm = vset1(xq->d[(size_t)(m0 + m) * nb + b]);
            for (int g = 0; g < G; g++) accf[m][g] = vfma(dm, vi_to_vf(acc[m][g]), accf[m][g]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) vstore(out + (m * G + g) * SL, accf[m][g]);
}

/* One pass with bits and mb constants (mb: 1 to strip_rows_of_x(bits); a case past it is never compiled). */
static void strip_pass(const int32_t *packed, const x8_t *xq, int m0, int mb, int bits, float *out) {
#define PASS(n, B, R) case n: if (n <= R) strip_x8(packed, xq, m0, n, B, out); break;
#define PASSES(B, R) switch (mb) { PASS(1, B, R) PASS(2, B, R) PASS(3, B, R) PASS(4, B, R) PASS(5, B, R) }
    if (bits == 4) PASSES(4, STRIP_R4)
    else PASSES(8, STRIP_R8)
#undef PASSES
#undef PASS
}

/* 4-byte groups in a row's full blocks. */
static inline int full_groups(int K, int bits) { return K / QK * (bits == 4 ? QK / 8 : QK / 4); }

/* Strips [s0, s1) of SL G weight rows against rows [p0, p1) of xq. */
static void strips_x8(void *arg, int s0, int s1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int K = xq->K, nb = xq->nb, full = K / QK, bits = job->bits, N = job->N, groups = full_groups(K, bits);
    const size_t KB = bits == 4 ? (size_t)K / 2 : (size_t)K, full_bytes = 4 * (size_t)groups, tail = KB - full_bytes;
    const int G = strip_groups(bits), strip_rows = SL * G, R = strip_rows_of_x(bits);
    int32_t *scratch = (int32_t *)thread_scratch(sizeof(int32_t) * ((size_t)groups * strip_rows + 1));
    float out[STRIP_MAX_R * SL * STRIP_MAX_G];
    for (int s = s0; s < s1; s++) {
        const int n0 = s * strip_rows, rows = N - n0 < strip_rows ? N - n0 : strip_rows;
        const int8_t *w = job->W + (size_t)n0 * KB;
        const int ready = job->lanes && rows == strip_rows;   /* a full strip already in the lane layout */
        const int32_t *packed = ready ? (const int32_t *)w : scratch;
        if (!ready && !scratch) {   /* out of memory: NaN, which the sampler reports as a failed sequence */
            for (int m = job->p0; m < job->p1; m++)
                for (int r = 0; r < rows; r++) job->y[(size_t)m * N + n0 + r] = NAN;
            continue;
        }
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
                    job->y[(size_t)(m0 + m) * N + n0 + r] =
                        sum * job->scale[n0 + r] + (job->bias ? job->bias[n0 + r] : 0.0f);
                }
        }
    }
}

#define X8_LANES 1   /* this build has the lane layout (relayout.c) */
#define X8_ORDER(bits) ((bits) == 4 ? X8_OCTETS : X8_NATURAL)
#define X8_TILE_ROWS(bits) (SL * strip_groups(bits))
#define X8_TILE_XROWS(bits) strip_rows_of_x(bits)
#define X8_TILES strips_x8
#endif  /* X8_STRIPS */
