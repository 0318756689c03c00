/*
 * Attention over paged K/V: what a call computes (below), its job and shape checks, and the kernel on vf
 * (vec.h) for fp32, and for bf16 widened to fp32 on builds without bf16 dot products; the exported
 * attend_f32. attention_avx512_bf16.c has attend_bf16, reference.c the definitions attend_f32_ref and
 * attend_bf16_ref.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- attention over paged K/V: every new row of a forward in one call ---------------------------- */
/*
 * The attention of a forward's new rows (prompt chunks and decode tokens of many sequences) over their
 * sequences' keys, one call per layer. Multi-query groups: query head h reads K/V group g = h / (H / G).
 *
 * K and V live in a pool that every sequence shares: pool row `slot` holds one position's K (or V) for
 * all groups, [G][d], rows ld_slot elements apart. A sequence's keys need not be adjacent: part p's keys
 * are the pool rows slots[key_start[p] + j], j < keys[p], in position order (its page table, one position
 * per page, so a prefix that several sequences share is the same slots in each table). Part p's new
 * queries are rows rows[p] .. rows[p + 1] - 1 of q ([row][H][d], rows ldq apart; rows[0] = 0); its last
 * query is the sequence's last position. Query i of a part of s rows sees its first
 *
 *   n = max(keys - (s - 1 - i), min_keys)    keys (never more than keys)
 *
 * (causal order; min_keys[p] lets ChatGLM-6B's prompt see itself both ways, NULL = none), and
 *
 *   S[h, j]  = scale * (q[h] . K[g, j])                                       j < n
 *   out[h]   = sum_j exp(S[h, j] - max S) V[g, j] / sum_j exp(S[h, j] - max S)
 *
 * In bf16 p = bf16(exp(...)) multiplies V and makes the denominator, as in torch's CPU flash attention.
 * out is [row][H][d] (rows H * d apart).
 *
 * One work item is one query row and one group, computed by one thread in an order that depends only on
 * its q, its n keys and their values: a query gets the same bits whatever chunk, batch or number of
 * threads it is computed in. (torch's fp32 SDPA blocks its sums by the chunk's shape: a prompt split
 * into other chunks got other bits, and greedy replies depended on where the scheduler split it.)
 *
 * `attend_f32_ref` / `attend_bf16_ref` (reference.c) are the definition, one loop per formula; the tests
 * compare every instruction-set build with them.
 */

typedef struct {
    const void *q;
    long ldq;
    int nparts;
    const int *rows, *keys, *min_keys;
    const int32_t *slots;
    const long *key_start;
    const void *k, *v;
    long ld_slot;
    int H, G, d;
    float scale;
    void *out;
    _Atomic int failed;   /* a thread found no memory for its scratch: nothing it skipped may be used */
    int bf16;             /* q, K, V and out are bf16 (the vector kernel below widens them) */
} paged_job;

/* The part that query row r belongs to (rows[] ascends). */
static int part_of(const paged_job *job, int r) {
    int lo = 0, hi = job->nparts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (job->rows[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static int visible_keys(const paged_job *job, int p, int r) {
    const int s = job->rows[p + 1] - job->rows[p], keys = job->keys[p];
    const int n = keys - (s - 1 - (r - job->rows[p]));
    if (job->min_keys && n < job->min_keys[p]) return job->min_keys[p] < keys ? job->min_keys[p] : keys;
    return n;
}

/* A call's shapes: parts of 1 <= rows <= keys, rows[0] = 0, heads a multiple of the groups. */
static int paged_shapes_ok(const paged_job *job) {
    if (job->nparts < 0 || job->G < 1 || job->H % job->G || job->d < 1 || (job->nparts && job->rows[0] != 0)) return 0;
    for (int p = 0; p < job->nparts; p++) {
        const int s = job->rows[p + 1] - job->rows[p];
        if (s < 1 || job->keys[p] < s) return 0;
    }
    return 1;
}

static inline size_t key_offset(const paged_job *job, int p, int j, int g) {
    return (size_t)job->slots[job->key_start[p] + j] * job->ld_slot + (size_t)g * job->d;
}

static inline float element(const void *base, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

#define PAGED_ARGS const void *q, long ldq, int nparts, const int *rows, const int *keys, const int *min_keys, \
    const int32_t *slots, const long *key_start, const void *k, const void *v, long ld_slot, int H, int G, int d, \
    float scale, void *out
#define PAGED_JOB {q, ldq, nparts, rows, keys, min_keys, slots, key_start, k, v, ld_slot, H, G, d, scale, out, 0, 0}

/* -- on the vector type of this build (vf: 16, 8, 4 or 1 lanes) ------------------------------------- */
/* fp32, and bf16 on builds without bf16 dot products (widened to fp32 as they are read; p and the output
 * rounded to bf16 as the definition says). */

#define F32_SCORE_HEADS 4                   /* heads per pass of the scores: each packed key vector feeds 4 */
#define F32_PV_HEADS 2                      /* heads per pass of P V ... */
#define F32_PV_VECTORS (VW == 8 ? 4 : 8)    /* ... times this many vectors of dims: 8 (16) accumulators */

/* Scores of `heads` heads (q rows d apart) against VW keys packed dim-major in kb ([d][VW]), into S. */
static inline __attribute__((always_inline)) void f32_score_pass(const float *q, int d, int heads, const float *kb,
                                                                 float scale, float *S, size_t ldS) {
    vf acc[F32_SCORE_HEADS];
    for (int h = 0; h < heads; h++) acc[h] = vzero();
    for (int c = 0; c < d; c++) {
        const vf key = vload(kb + (size_t)c * VW);
        for (int h = 0; h < heads; h++) acc[h] = vfma(vset1(q[(size_t)h * d + c]), key, acc[h]);
    }
    for (int h = 0; h < heads; h++) vstore(S + h * ldS, vmul(acc[h], vset1(scale)));
}

/* One row of scores over n keys (ld >= n, a multiple of VW) -> p in place (zeros from n to ld); -> 1 / sum p. */
static float f32_softmax_row(float *S, int n, size_t ld, int bf16) {
    for (size_t j = n; j < ld; j++) S[j] = -INFINITY;
    vf mx = vset1(-INFINITY), sum = vzero();
    for (size_t j = 0; j < ld; j += VW) mx = vmax(mx, vload(S + j));
    const vf m = vset1(vhmax(mx));
    for (size_t j = 0; j < ld; j += VW) vstore(S + j, vexp(vsub(vload(S + j), m)));
    for (size_t j = n; j < ld; j++) S[j] = 0.0f;
    if (bf16)
        for (int j = 0; j < n; j++) S[j] = bf16_to_f32(to_bf16(S[j]));
    for (size_t j = 0; j < ld; j += VW) sum = vadd(sum, vload(S + j));
    return 1.0f / vhsum(sum);
}

/* out (heads rows d apart) = inv * sum_j p[., j] V[j] for the dims [c0, c0 + VW * vectors), p rows ldS apart. */
static inline __attribute__((always_inline)) void f32_pv_pass(const paged_job *job, int p, int g, int n, const float *P,
                                                              size_t ldS, int heads, int c0, int vectors,
                                                              const float *inv, float *out, int bf16) {
    vf acc[F32_PV_HEADS][F32_PV_VECTORS];
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < vectors; c++) acc[h][c] = vzero();
    for (int j = 0; j < n; j++) {
        const size_t at = key_offset(job, p, j, g) + c0;
        const float *row = (const float *)job->v + at;
        const uint16_t *row16 = (const uint16_t *)job->v + at;
        for (int h = 0; h < heads; h++) {
            const vf pj = vset1(P[h * ldS + j]);
            for (int c = 0; c < vectors; c++)
                acc[h][c] = vfma(pj, bf16 ? load_bf16(row16 + c * VW) : vload(row + c * VW), acc[h][c]);
        }
    }
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < vectors; c++) vstore(out + (size_t)h * job->d + c0 + c * VW, vmul(acc[h][c], vset1(inv[h])));
}

/* Keys j0 .. j0 + VW - 1 (those below n; zeros after) of part p, group g, packed dim-major: kb[c * VW + l] is
 * dim c of key j0 + l. By VW x VW transposes in registers where the dims come in whole vectors (the scalar
 * loop took half of a long decode step's attention). */
static void pack_keys(const paged_job *job, int p, int g, int j0, int n, float *kb) {
    const int d = job->d, live = n - j0 < VW ? n - j0 : VW;
#if VW > 1
    if (d % VW == 0) {
        const float *row[VW];
        const uint16_t *row16[VW];
        for (int l = 0; l < live; l++) {
            const size_t at = key_offset(job, p, j0 + l, g);
            row[l] = (const float *)job->k + at;
            row16[l] = (const uint16_t *)job->k + at;
        }
        for (int c = 0; c < d; c += VW) {
            vf r[VW];
            for (int l = 0; l < VW; l++)
                r[l] = l >= live ? vzero() : job->bf16 ? load_bf16(row16[l] + c) : vload(row[l] + c);
#if VW == 16
            transpose16((__m512i *)r);
#elif VW == 8
            transpose8(r);
#else
            transpose4(r);
#endif
            for (int i = 0; i < VW; i++) vstore(kb + (size_t)(c + i) * VW, r[i]);
        }
        return;
    }
#endif
    for (int l = 0; l < VW; l++) {
        const size_t at = l < live ? key_offset(job, p, j0 + l, g) : 0;
        for (int c = 0; c < d; c++) kb[(size_t)c * VW + l] = l < live ? element(job->k, at + c, job->bf16) : 0.0f;
    }
}

/* Work items: query row r and group g (item = r * G + g). */
static void attend_f32_items(void *arg, int item0, int item1) {
    paged_job *job = (paged_job *)arg;
    const int d = job->d, G = job->G, per_group = job->H / G, bf16 = job->bf16;
    for (int item = item0; item < item1; item++) {
        const int r = item / G, g = item % G, p = part_of(job, r), n = visible_keys(job, p, r);
        const size_t ldS = ((size_t)n + VW - 1) / VW * VW;
        /* scores [per_group][ldS], packed keys [d][VW], q widened [per_group][d], out [per_group][d], 1/sums */
        float *S = (float *)thread_scratch(sizeof(float) * (ldS * per_group + (size_t)d * VW + 2 * (size_t)per_group * d
                                                            + per_group));
        if (!S) {
            atomic_store(&job->failed, 1);
            return;
        }
        float *kb = S + ldS * per_group, *q = kb + (size_t)d * VW, *o = q + (size_t)per_group * d;
        float *inv = o + (size_t)per_group * d;
        const size_t q0 = (size_t)r * job->ldq + (size_t)g * per_group * d;
        for (size_t c = 0; c < (size_t)per_group * d; c++) q[c] = element(job->q, q0 + c, bf16);
        for (int j0 = 0; j0 < n; j0 += VW) {   /* VW keys at a time, packed dim-major: one vector per dim */
            pack_keys(job, p, g, j0, n, kb);
            for (int h = 0; h < per_group; h += F32_SCORE_HEADS) {
                const int heads = per_group - h < F32_SCORE_HEADS ? per_group - h : F32_SCORE_HEADS;
                if (heads == F32_SCORE_HEADS)
                    f32_score_pass(q + (size_t)h * d, d, F32_SCORE_HEADS, kb, job->scale, S + h * ldS + j0, ldS);
                else
                    f32_score_pass(q + (size_t)h * d, d, heads, kb, job->scale, S + h * ldS + j0, ldS);
            }
        }
        for (int h = 0; h < per_group; h++) inv[h] = f32_softmax_row(S + h * ldS, n, ldS, bf16);
        const int full = d / VW;   /* whole vectors of dims; the rest (d % VW) one dim at a time */
        for (int h = 0; h < per_group; h += F32_PV_HEADS) {
            const int heads = per_group - h < F32_PV_HEADS ? per_group - h : F32_PV_HEADS;
            for (int c = 0; c < full; c += F32_PV_VECTORS) {
                const int vectors = full - c < F32_PV_VECTORS ? full - c : F32_PV_VECTORS;
                float *oh = o + (size_t)h * d;
                if (heads == F32_PV_HEADS && vectors == F32_PV_VECTORS)
                    f32_pv_pass(job, p, g, n, S + h * ldS, ldS, F32_PV_HEADS, c * VW, F32_PV_VECTORS, inv + h, oh, bf16);
                else
                    f32_pv_pass(job, p, g, n, S + h * ldS, ldS, heads, c * VW, vectors, inv + h, oh, bf16);
            }
            for (int c = full * VW; c < d; c++)
                for (int hh = h; hh < h + heads; hh++) {
                    float acc = 0.0f;
                    for (int j = 0; j < n; j++) acc = fmaf(S[hh * ldS + j], element(job->v, key_offset(job, p, j, g) + c, bf16), acc);
                    o[(size_t)hh * d + c] = acc * inv[hh];
                }
        }
        const size_t out = ((size_t)r * job->H + (size_t)g * per_group) * d;
        if (bf16)
            for (size_t c = 0; c < (size_t)per_group * d; c++) ((uint16_t *)job->out)[out + c] = to_bf16(o[c]);
        else
            memcpy((float *)job->out + out, o, sizeof(float) * per_group * d);
    }
}

/* The vector kernel over a checked job (fp32, or bf16 widened). */
static int attend_vector(paged_job *job, int nthreads) {
    if (!paged_shapes_ok(job)) return 0;
    if (job->nparts) parallel_run(job->rows[job->nparts] * job->G, nthreads, attend_f32_items, job, 1);
    return !atomic_load(&job->failed);
}

/* -> 1 when computed; 0 when the shapes are wrong (see paged_shapes_ok) or memory ran out. */
int attend_f32(PAGED_ARGS, int nthreads) {
    paged_job job = PAGED_JOB;
    return attend_vector(&job, nthreads);
}
