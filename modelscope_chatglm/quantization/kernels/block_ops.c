/*
 * The per-row ops of a GLM2/3 block around its linears, for fp32 and bf16 rows: RMSNorm and RoPE (the CPU
 * twins of models/triton_ops.py's `rms_norm` and `rotary_qk_`), called from models/cpu_ops.py.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- per-row ops of a block: RMSNorm, RoPE --------------------------------------------------------- */
/*
 * Why in C: a decode step moves one row per sequence through these, and in torch they are a dozen small
 * ops each (RMSNorm eight, RoPE about fifteen for q and k), each costing microseconds of dispatch for
 * nanoseconds of work, and a decode step's weights streaming through the caches leave each op cold.
 * Here each is one call per layer (measured: benchmarks/README.md, "Zen 4, after the block ops").
 *
 * The math is glm2.py's, in fp32, the row's dtype read and written at the ends (bf16 widened exactly,
 * rounded to nearest even once, as torch's .to(torch.bfloat16) rounds):
 *   rms_norm: y = w * (x * (1 / sqrt(sum(x^2) / K + eps)))
 *   rotary:   (x0, x1) -> (x0 * cos - x1 * sin, x1 * cos + x0 * sin) for the first `pairs` pairs of each head
 * The products and sums are separate roundings (build.py compiles with -ffp-contract=off), so RoPE gives torch's
 * bits. The sum of squares runs in 16 partial sums (a vector's lanes) then pairwise: torch sums in its
 * own order, so rms_norm can differ from torch in the last bit of a row's scale (tests/test_block_ops.py
 * bounds it). Each row is computed alone, in the same order whatever the other rows are.
 */
static inline float load_elem(const void *x, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline void store_elem(void *y, int bf16, size_t i, float v) {
    if (bf16) ((uint16_t *)y)[i] = to_bf16(v);
    else ((float *)y)[i] = v;
}

typedef struct {
    const void *x, *w;
    void *y;
    long ldx, ldy;
    int K, bf16;
    float eps;
} rms_norm_job;

static void rms_norm_rows(void *arg, int m0, int m1) {
    const rms_norm_job *job = (const rms_norm_job *)arg;
    const int K = job->K, bf16 = job->bf16;
    for (int m = m0; m < m1; m++) {
        const size_t row = (size_t)m * job->ldx, out = (size_t)m * job->ldy;
        float part[16] = {0};
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; j++) {
                const float v = load_elem(job->x, bf16, row + k + j);
                part[j] += v * v;
            }
        for (; k < K; k++) {
            const float v = load_elem(job->x, bf16, row + k);
            part[k % 16] += v * v;
        }
        for (int width = 8; width >= 1; width /= 2)
            for (int j = 0; j < width; j++) part[j] += part[j + width];
        const float r = 1.0f / sqrtf(part[0] * (1.0f / (float)K) + job->eps);
        for (k = 0; k < K; k++) {
            const float t = load_elem(job->x, bf16, row + k) * r;
            store_elem(job->y, bf16, out + k, load_elem(job->w, bf16, k) * t);
        }
    }
}

/* x [M, K] (rows ldx elements apart), w [K], y [M, K] (rows ldy apart), all fp32 or all bf16. */
static void rms_norm(const void *x, long ldx, int M, int K, const void *w, float eps, void *y, long ldy, int bf16,
                     int nthreads) {
    rms_norm_job job = {x, w, y, ldx, ldy, K, bf16, eps};
    /* A decode step's few rows are microseconds of work: waking the other threads would cost more. */
    parallel_run(M, M >= 16 ? nthreads : 1, rms_norm_rows, &job, 1);
}

void rms_norm_f32(const float *x, long ldx, int M, int K, const float *w, float eps, float *y, long ldy,
                  int nthreads) {
    rms_norm(x, ldx, M, K, w, eps, y, ldy, 0, nthreads);
}

void rms_norm_bf16(const uint16_t *x, long ldx, int M, int K, const uint16_t *w, float eps, uint16_t *y, long ldy,
                   int nthreads) {
    rms_norm(x, ldx, M, K, w, eps, y, ldy, 1, nthreads);
}

/* In place on N rows of x (ld elements apart; a fused QKV output): the first `heads` heads of d columns
 * each, pairs (2i, 2i + 1) for i < pairs rotated by cos, sin [N, pairs] (fp32). */
static void rotary(void *x, long ld, int N, int heads, int d, const float *cos, const float *sin, int pairs,
                   int bf16) {
    for (int n = 0; n < N; n++)
        for (int h = 0; h < heads; h++) {
            const size_t base = (size_t)n * ld + (size_t)h * d;
            for (int i = 0; i < pairs; i++) {
                const float c = cos[(size_t)n * pairs + i], s = sin[(size_t)n * pairs + i];
                const float x0 = load_elem(x, bf16, base + 2 * i), x1 = load_elem(x, bf16, base + 2 * i + 1);
                store_elem(x, bf16, base + 2 * i, x0 * c - x1 * s);
                store_elem(x, bf16, base + 2 * i + 1, x1 * c + x0 * s);
            }
        }
}

void rotary_f32(float *x, long ld, int N, int heads, int d, const float *cos, const float *sin, int pairs) {
    rotary(x, ld, N, heads, d, cos, sin, pairs, 0);
}

void rotary_bf16(uint16_t *x, long ld, int N, int heads, int d, const float *cos, const float *sin, int pairs) {
    rotary(x, ld, N, heads, d, cos, sin, pairs, 1);
}
