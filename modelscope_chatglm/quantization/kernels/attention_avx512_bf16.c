/*
 * Attention over paged K/V in bf16: with AVX512-BF16's bf16 pair products (XBF16_DP, common.h), K and V
 * packed once per part and group, the scores and P V as small GEMMs; and the exported attend_bf16, which on
 * the other builds runs attention.c's kernel on bf16 widened to fp32.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* -- bf16 with bf16 dot products (AVX512-BF16) ----------------------------------------------------- */
#ifdef XBF16_DP
/*
 * The same work items as attention.c's kernel, with bf16 pair products (`vdpbf16ps`): the scores of a
 * query's H/G heads are a small GEMM (ATT_HEADS heads x ATT_BLOCKS blocks of 16 keys per pass, K packed so
 * that one vector holds one pair of dims of 16 keys), then the softmax row by row, then P V (ATT_PV_HEADS
 * heads x 128 dims per pass, V packed so that one vector holds 16 dims of a pair of keys). K and V are
 * packed from the pool once per part and group, for all of its queries. (torch's bf16 SDPA reaches a
 * fraction of what `vdpbf16ps` does on these shapes: benchmarks/README.md, "Design choices".)
 */
#define ATT_HEADS 4      /* heads per pass of the scores: 4 x 4 accumulators, each K vector feeds 4 */
#define ATT_BLOCKS 4     /* blocks of 16 keys per pass */
#define ATT_PV_HEADS 2   /* heads per pass of P V: 2 x 8 accumulators (128 dims) */

typedef struct {
    const paged_job *job;
    int p;               /* the part being computed */
    int blocks;          /* ceil(keys / 16) */
    uint32_t *kp;        /* K packed: [G][blocks][d/2][16] bf16 pairs (dims 2c, 2c+1 of 16 keys) */
    uint32_t *vp;        /* V packed: [G][blocks * 8][d] bf16 pairs (keys 2j, 2j+1 of one dim) */
} bf16_part;

/* exp(x) on 16 lanes, as vexp (vec.h) (kept apart: a build with AVX512-BF16 has VW 16 anyway). */
static inline __m512 exp_ps(__m512 x) { return vexp(x); }

/* Block b of 16 keys of group g, K and V, into their packed layouts; keys past the part's keys become
 * zeros. With d a multiple of 32 in vectors: K by 16 x 16 transposes of dim pairs (transpose16, vec.h), V by
 * interleaving two keys' rows. (Packing with scalar loops took most of a decode step's attention.) */
static void pack_kv(void *arg, int item0, int item1) {
    const bf16_part *part = (const bf16_part *)arg;
    const paged_job *job = part->job;
    const int d = job->d, half = d / 2, t = job->keys[part->p];
    const __m512i lo = _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006,
                                         0x270007, 0x280008, 0x290009, 0x2A000A, 0x2B000B, 0x2C000C, 0x2D000D,
                                         0x2E000E, 0x2F000F);   /* 16-bit indices 0, 32, 1, 33, ... 15, 47 */
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int item = item0; item < item1; item++) {
        const int g = item / part->blocks, b = item % part->blocks, keys = t - b * 16 < 16 ? t - b * 16 : 16;
        const uint16_t *krow[16], *vrow[16];
        for (int l = 0; l < keys; l++) {
            const size_t at = key_offset(job, part->p, b * 16 + l, g);
            krow[l] = (const uint16_t *)job->k + at;
            vrow[l] = (const uint16_t *)job->v + at;
        }
        uint32_t *kp = part->kp + ((size_t)g * part->blocks + b) * half * 16;
        uint16_t *vp = (uint16_t *)(part->vp + ((size_t)g * part->blocks + b) * 8 * d);
        if (d % 32) {
            for (int l = 0; l < 16; l++) {
                uint16_t *vl = vp + (size_t)(l / 2) * d * 2 + l % 2;
                for (int j = 0; j < half; j++) kp[j * 16 + l] = l < keys ? ((const uint32_t *)krow[l])[j] : 0;
                for (int c = 0; c < d; c++) vl[2 * c] = l < keys ? vrow[l][c] : 0;
            }
            continue;
        }
        for (int j = 0; j < half; j += 16) {
            __m512i r[16];
            for (int l = 0; l < 16; l++)
                r[l] = l < keys ? _mm512_loadu_si512((const uint32_t *)krow[l] + j) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(kp + (size_t)(j + i) * 16, r[i]);
        }
        for (int pair = 0; pair < 8; pair++)
            for (int c = 0; c < d; c += 32) {
                const int k0 = 2 * pair, k1 = k0 + 1;
                const __m512i x = k0 < keys ? _mm512_loadu_si512(vrow[k0] + c) : _mm512_setzero_si512();
                const __m512i y = k1 < keys ? _mm512_loadu_si512(vrow[k1] + c) : _mm512_setzero_si512();
                uint16_t *out = vp + ((size_t)pair * d + c) * 2;
                _mm512_storeu_si512(out, _mm512_permutex2var_epi16(x, lo, y));
                _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(x, hi, y));
            }
    }
}

/* Scores of `heads` heads (their q as bf16 pairs, heads `half` pairs apart) against `nblocks` blocks of
 * packed keys, times scale, into S (rows ldS apart). */
static inline __attribute__((always_inline)) void score_pass(const uint32_t *q, int half, int heads, const uint32_t *kp,
                                                             int nblocks, float scale, float *S, size_t ldS) {
    __m512 acc[ATT_HEADS][ATT_BLOCKS];
    for (int r = 0; r < heads; r++)
        for (int c = 0; c < nblocks; c++) acc[r][c] = _mm512_setzero_ps();
    for (int j = 0; j < half; j++) {
        __m512bh key[ATT_BLOCKS];
        for (int c = 0; c < nblocks; c++) key[c] = (__m512bh)_mm512_loadu_si512(kp + ((size_t)c * half + j) * 16);
        for (int r = 0; r < heads; r++) {
            const __m512bh qr = (__m512bh)_mm512_set1_epi32((int)q[(size_t)r * half + j]);
            for (int c = 0; c < nblocks; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qr, key[c]);
        }
    }
    for (int r = 0; r < heads; r++)
        for (int c = 0; c < nblocks; c++)
            _mm512_storeu_ps(S + r * ldS + c * 16, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(scale)));
}

/* One row of scores over n keys -> p (bf16, zeros from n up to the block's end); -> 1 / sum of p. */
static float softmax_row(const float *S, int n, uint16_t *p) {
    __m512 max = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int c = 0; c < n; c += 16) {
        const __mmask16 in = n - c >= 16 ? 0xFFFF : (__mmask16)((1u << (n - c)) - 1);
        max = _mm512_mask_max_ps(max, in, max, _mm512_loadu_ps(S + c));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    for (int c = 0; c < n; c += 16) {
        const __mmask16 in = n - c >= 16 ? 0xFFFF : (__mmask16)((1u << (n - c)) - 1);
        const __m256bh e = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(in, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(S + c), m))));
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));
        _mm256_storeu_si256((__m256i *)(p + c), (__m256i)e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* out rows of `heads` heads (d apart), dims [0, 16 * groups) = (P V)[., dims] * inv, over `pairs`
 * pairs of keys; p rows ldp pairs apart, V packed with rows of ldv pairs. */
static inline __attribute__((always_inline)) void pv_pass(const uint32_t *p, size_t ldp, int heads, const uint32_t *vp,
                                                          size_t ldv, int pairs, int groups, const float *inv,
                                                          uint16_t *out, int d) {
    __m512 acc[ATT_PV_HEADS][8];
    for (int r = 0; r < heads; r++)
        for (int c = 0; c < groups; c++) acc[r][c] = _mm512_setzero_ps();
    for (int j = 0; j < pairs; j++) {
        __m512bh val[8];
        for (int c = 0; c < groups; c++) val[c] = (__m512bh)_mm512_loadu_si512(vp + (size_t)j * ldv + c * 16);
        for (int r = 0; r < heads; r++) {
            const __m512bh pr = (__m512bh)_mm512_set1_epi32((int)p[r * ldp + j]);
            for (int c = 0; c < groups; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, val[c]);
        }
    }
    for (int r = 0; r < heads; r++)
        for (int c = 0; c < groups; c++)
            _mm256_storeu_si256((__m256i *)(out + (size_t)r * d + c * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))));
}

/* Work items of a part: its query i and group g (item = i * G + g). */
static void attend_positions(void *arg, int item0, int item1) {
    const bf16_part *part = (const bf16_part *)arg;
    paged_job *job = (paged_job *)part->job;
    const int d = job->d, half = d / 2, per_group = job->H / job->G, r0 = job->rows[part->p];
    const size_t ldS = (size_t)part->blocks * 16;
    char *scratch = (char *)thread_scratch(ldS * per_group * (sizeof(float) + sizeof(uint16_t))
                                           + per_group * sizeof(float) + 64);
    if (!scratch) {
        atomic_store(&job->failed, 1);
        return;
    }
    float *S = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63), *inv = S + ldS * per_group;
    uint16_t *P = (uint16_t *)(inv + per_group);
    for (int item = item0; item < item1; item++) {
        const int r = r0 + item / job->G, g = item % job->G, n = visible_keys(job, part->p, r);
        const int nblocks = (n + 15) / 16, pairs = (n + 1) / 2;
        const uint32_t *q = (const uint32_t *)((const uint16_t *)job->q + (size_t)r * job->ldq + (size_t)g * per_group * d);
        const uint32_t *kp = part->kp + (size_t)g * part->blocks * half * 16;
        for (int h = 0; h < per_group; h += ATT_HEADS)
            for (int b = 0; b < nblocks; b += ATT_BLOCKS) {
                const int heads = per_group - h < ATT_HEADS ? per_group - h : ATT_HEADS;
                const int blocks = nblocks - b < ATT_BLOCKS ? nblocks - b : ATT_BLOCKS;
                float *Sb = S + h * ldS + b * 16;
                if (heads == ATT_HEADS && blocks == ATT_BLOCKS)
                    score_pass(q + (size_t)h * half, half, ATT_HEADS, kp + (size_t)b * half * 16, ATT_BLOCKS, job->scale, Sb, ldS);
                else
                    score_pass(q + (size_t)h * half, half, heads, kp + (size_t)b * half * 16, blocks, job->scale, Sb, ldS);
            }
        for (int h = 0; h < per_group; h++) inv[h] = softmax_row(S + h * ldS, n, P + h * ldS);
        const uint32_t *vp = part->vp + (size_t)g * part->blocks * 8 * d;
        uint16_t *out = (uint16_t *)job->out + ((size_t)r * job->H + (size_t)g * per_group) * d;
        for (int h = 0; h < per_group; h += ATT_PV_HEADS)
            for (int c = 0; c < d; c += 128) {
                const int heads = per_group - h < ATT_PV_HEADS ? per_group - h : ATT_PV_HEADS;
                const int groups = d - c < 128 ? (d - c) / 16 : 8;
                const uint32_t *ph = (const uint32_t *)(P + h * ldS);
                if (heads == ATT_PV_HEADS && groups == 8)
                    pv_pass(ph, ldS / 2, ATT_PV_HEADS, vp + c, d, pairs, 8, inv + h, out + (size_t)h * d + c, d);
                else
                    pv_pass(ph, ldS / 2, heads, vp + c, d, pairs, groups, inv + h, out + (size_t)h * d + c, d);
            }
    }
}

/* A decode row (one query): each group packs its own keys and attends, in one parallel region per part. */
static void decode_groups(void *arg, int g0, int g1) {
    const bf16_part *part = (const bf16_part *)arg;
    for (int g = g0; g < g1; g++) {
        pack_kv(arg, g * part->blocks, (g + 1) * part->blocks);
        attend_positions(arg, g, g + 1);
    }
}
#endif

/* -> 1 when computed; 0 when the shapes are wrong or memory ran out. A build without bf16 dot products runs
 * the vector kernel of attention.c on bf16 widened to fp32. */
int attend_bf16(PAGED_ARGS, int nthreads) {
    paged_job job = PAGED_JOB;
#ifdef XBF16_DP
    if (!paged_shapes_ok(&job)) return 0;
    if (d % 16) {   /* the packed layouts take whole vectors of dims: widen instead */
        job.bf16 = 1;
        return attend_vector(&job, nthreads);
    }
    int most = 1;
    for (int p = 0; p < nparts; p++) most = keys[p] > most ? keys[p] : most;
    const int blocks = (most + 15) / 16;
    const size_t packed = (size_t)G * blocks * 16 * d * sizeof(uint16_t);   /* a multiple of 64 */
    uint32_t *kp = (uint32_t *)aligned_alloc(64, packed), *vp = (uint32_t *)aligned_alloc(64, packed);
    if (!kp || !vp) {
        free(kp);
        free(vp);
        return 0;
    }
    for (int p = 0; p < nparts && !atomic_load(&job.failed); p++) {
        const int s = rows[p + 1] - rows[p];
        bf16_part part = {&job, p, (keys[p] + 15) / 16, kp, vp};
        if (s == 1)
            parallel_run(G, nthreads, decode_groups, &part, 1);
        else {
            parallel_run(G * part.blocks, nthreads, pack_kv, &part, 1);
            parallel_run(G * s, nthreads, attend_positions, &part, 1);
        }
    }
    free(kp);
    free(vp);
    return !atomic_load(&job.failed);
#else
    job.bf16 = 1;
    return attend_vector(&job, nthreads);
#endif
}
