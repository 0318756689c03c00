/*
 * Weights into other layouts: the lane layout of the x86 int8-activation strips (x8_strips.c),
 * into which a model's weights are rearranged once (x8_relayout_weights), and dequantised row tiles in fp32
 * or bf16 for a prompt's matrix multiply in torch (`*_dequant_rows_*`).
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- the lane layout of the int8-activation strips -------------------------------------------- */
/*
 * The lane layout: each full strip of SL G rows holds, in its own bytes, its groups as pack_strip
 * writes them, then each row's short last block (as in the hub layout). A last strip of fewer rows keeps
 * the hub's row layout (it is transposed per call). to_lanes = 0 restores the hub layout.
 * -> 0; -1 on builds without the strips, -2 when the buffers for the move cannot be allocated (the weights
 * are left as they were in both cases). Each thread moves a strip through its own copy, allocated before
 * any strip moves, so a failure never leaves some strips moved.
 * Why the layout: "int8 activations in strips" (x8_strips.c).
 */
#ifdef X8_LANES
typedef struct {
    int8_t *W;
    int K, bits, to_lanes, nthreads;
    int8_t *copies;   /* nthreads strips: thread t's copy at t x strip bytes */
} relayout_job;

/* The thread's number in the running team: 0 .. nthreads - 1, or 0 outside one (parallel_run's serial path). */
static int team_thread(int nthreads) {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
    return t < nthreads ? t : 0;   /* called serially from inside someone else's team: we are alone */
#else
    (void)nthreads;
    return 0;
#endif
}

static void relayout_strips(void *arg, int s0, int s1) {
    const relayout_job *job = (const relayout_job *)arg;
    const int groups = full_groups(job->K, job->bits);
    const int32_t flip = sign_bits(job->bits);
    const size_t KB = job->bits == 4 ? (size_t)job->K / 2 : (size_t)job->K, full_bytes = 4 * (size_t)groups;
    const int G = strip_groups(job->bits), strip_rows = SL * G;
    const size_t tail = KB - full_bytes, strip_bytes = KB * strip_rows;
    int8_t *copy = job->copies + strip_bytes * team_thread(job->nthreads);
    for (int s = s0; s < s1; s++) {
        int8_t *strip = job->W + (size_t)s * strip_bytes;
        memcpy(copy, strip, strip_bytes);
        if (job->to_lanes) {
            pack_strip(copy, KB, strip_rows, groups, G, flip, (int32_t *)strip);
            for (int r = 0; r < strip_rows; r++)
                memcpy(strip + full_bytes * strip_rows + r * tail, copy + r * KB + full_bytes, tail);
        } else {
            const int32_t *packed = (const int32_t *)copy;
            for (int r = 0; r < strip_rows; r++) {
                for (int c = 0; c < groups; c++) {
                    const int32_t v = packed[((size_t)c * G + r / SL) * SL + r % SL] ^ flip;
                    memcpy(strip + r * KB + 4 * (size_t)c, &v, 4);
                }
                memcpy(strip + r * KB + full_bytes, copy + full_bytes * strip_rows + r * tail, tail);
            }
        }
    }
}

int x8_relayout_weights(int8_t *W, int N, int K, int bits, int to_lanes, int nthreads) {
    const size_t strip_bytes = (bits == 4 ? (size_t)K / 2 : (size_t)K) * SL * strip_groups(bits);
    nthreads = nthreads < 1 ? 1 : nthreads;
    relayout_job job = {W, K, bits, to_lanes, nthreads, (int8_t *)malloc(strip_bytes * nthreads)};
    if (!job.copies) return -2;
    parallel_for(N / (SL * strip_groups(bits)), nthreads, relayout_strips, &job);
    free(job.copies);
    return 0;
}
#else
int x8_relayout_weights(int8_t *W, int N, int K, int bits, int to_lanes, int nthreads) {
    (void)W, (void)N, (void)K, (void)bits, (void)to_lanes, (void)nthreads;
    return -1;
}
#endif

/* ---- dequantised row tiles: the prefill path ------------------------------------------------- */
/* Rows [n0, n1) of W into `out` ([n1-n0, K]), as fp32 or bf16 (round to nearest even), times scale[n];
 * with scale NULL, the integer values themselves (exact in both). linear.py passes NULL for fp32 and
 * bf16 models and multiplies the matmul's output by the scales, as the gemv kernels do: a prompt's
 * rows and a decode step's multiply x by the same numbers, whichever path they take. */

typedef struct {
    const int8_t *W;
    const float *scale;   /* NULL: the integer values */
    int n0, K, bits, bf16;
    void *out;            /* float or uint16_t (bf16) [n1 - n0, K] */
} dequant_job;

static inline __attribute__((always_inline)) void put(void *out, size_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)out)[i] = to_bf16(v);
    else ((float *)out)[i] = v;
}

/* One row, with bits and bf16 constant where it is inlined below (so each case is a plain loop). */
static inline __attribute__((always_inline)) void dequant_row(const int8_t *w, float s, int K, int bits, int bf16, void *out) {
    if (bits == 8)
        for (int k = 0; k < K; k++) put(out, k, (float)w[k] * s, bf16);
    else
        for (int j = 0; j < K / 2; j++) {
            put(out, 2 * (size_t)j, (float)int4_high(w[j]) * s, bf16);
            put(out, 2 * (size_t)j + 1, (float)int4_low(w[j]) * s, bf16);
        }
}

static void dequant_rows(void *arg, int i0, int i1) {
    const dequant_job *job = (const dequant_job *)arg;
    const int K = job->K, bytes = job->bits == 8 ? K : K / 2, size = job->bf16 ? 2 : 4;
    for (int i = i0; i < i1; i++) {
        const int n = job->n0 + i;
        const int8_t *w = job->W + (size_t)n * bytes;
        const float s = job->scale ? job->scale[n] : 1.0f;
        void *out = (char *)job->out + (size_t)i * K * size;
        if (job->bits == 8) {
            if (job->bf16) dequant_row(w, s, K, 8, 1, out); else dequant_row(w, s, K, 8, 0, out);
        } else {
            if (job->bf16) dequant_row(w, s, K, 4, 1, out); else dequant_row(w, s, K, 4, 0, out);
        }
    }
}

static void dequant(const int8_t *W, const float *scale, int n0, int n1, int K, int bits, int bf16, void *out, int nthreads) {
    dequant_job job = {W, scale, n0, K, bits, bf16, out};
    parallel_for(n1 - n0, nthreads, dequant_rows, &job);
}

void q8_dequant_rows_f32(const int8_t *W, const float *scale, int n0, int n1, int K, float *out, int nthreads) {
    dequant(W, scale, n0, n1, K, 8, 0, out, nthreads);
}

void q8_dequant_rows_bf16(const int8_t *W, const float *scale, int n0, int n1, int K, uint16_t *out, int nthreads) {
    dequant(W, scale, n0, n1, K, 8, 1, out, nthreads);
}

void q4_dequant_rows_f32(const int8_t *W, const float *scale, int n0, int n1, int K, float *out, int nthreads) {
    dequant(W, scale, n0, n1, K, 4, 0, out, nthreads);
}

void q4_dequant_rows_bf16(const int8_t *W, const float *scale, int n0, int n1, int K, uint16_t *out, int nthreads) {
    dequant(W, scale, n0, n1, K, 4, 1, out, nthreads);
}
