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

/* ---- a whole GLM2/3 block with int8 activations, in two calls ---------------------------------------- */
/*
 * Why: a full-width decode step spent a tenth to a sixth of its time outside the kernels, in the Python
 * and torch code between about 25 calls a layer, each finding that code and its data cold after the
 * layer's weights streamed through the caches. Two calls a layer took 5-8% off a step of the AVX2 build's
 * fp32 model, 1-2% on the native build (benchmarks/README.md,
 * "One call per half block"). They run the same kernels in glm2.py's order, so every row gets the bits
 * the module-by-module path gives it (tests/test_block_ops.py holds them to that), for a block whose four
 * linears are QuantizedLinear with int8 activations:
 *
 *   glm2_attention_half:  x1 = x + dense(attend(rope(qkv(rms_norm1(x)))));  gu = h_to_4h(rms_norm2(x1))
 *   glm2_mlp_half:        y  = x1 + 4h_to_h(s)
 *
 * and torch computes s = silu(gate) * up from gu in between (its exp, so the bits stay torch's). The new
 * rows' K and V are written to their pool slots before the attention reads them, as _LayerKV.attend does.
 * Rows are fp32 or bf16 (`bf16`), the weights in the hub's layout or the lane layout (`lanes`, per linear).
 */
typedef struct {
    const int8_t *w;
    const float *scale, *bias;   /* fp32; bias may be NULL */
    int out, in, lanes;
} x8_linear;

typedef struct {
    int bits, bf16, heads, kv_heads, head_dim;
    float eps1, eps2, scale;     /* the two RMSNorms' eps; attention's 1 / sqrt(head_dim) */
    const void *norm1, *norm2;   /* [D], the rows' dtype */
    x8_linear qkv, dense, up, down;
} glm2_layer;

/* y = linear(x), M rows, the rows' dtype in and out: QuantizedLinear's int8-activation path. */
static void x8_linear_rows(const x8_linear *L, int bits, int bf16, const void *x, int M, void *y, int nthreads) {
    if (bf16) gemv_x8_bf16((const uint16_t *)x, M, L->in, L->w, bits, L->lanes, L->scale, L->bias, (uint16_t *)y, L->out, nthreads);
    else gemv_x8((const float *)x, M, L->in, L->w, bits, L->lanes, L->scale, L->bias, (float *)y, L->out, nthreads);
}

/* y = a + b, n elements, each sum rounded once to the rows' dtype (torch's bf16 add). */
static void add_rows(const void *a, const void *b, void *y, size_t n, int bf16) {
    for (size_t i = 0; i < n; i++) store_elem(y, bf16, i, load_elem(a, bf16, i) + load_elem(b, bf16, i));
}

/* The size of glm2_layer, for the test that holds build.py's ctypes mirror of it to this layout. */
size_t glm2_layer_bytes(void) { return sizeof(glm2_layer); }

/* x [N, D] -> x1 [N, D] and gu [N, up.out]. The attention's arguments are attend_f32's (attention.c) for
 * q = the rotated QKV rows; write[r]: the pool slot of new row r's K and V (k_pool, v_pool: this layer's
 * [pool_slots, G, d]). -> 1 when computed; 0 when a write slot is outside the pool (nothing written), the
 * attention refused its shapes or memory ran out, and then x1 and gu are unwritten (the K/V slots may
 * hold the new rows: the path that runs instead writes the same values, or raises on a bad slot). */
int glm2_attention_half(const glm2_layer *L, const void *x, int N, const float *cos, const float *sin, int pairs,
                        int nparts, const int *rows, const int *keys, const int *min_keys, const int32_t *slots,
                        const long *key_start, void *k_pool, void *v_pool, long pool_slots, const long *write,
                        void *x1, void *gu, int nthreads) {
    const int D = L->dense.out, H = L->heads, G = L->kv_heads, d = L->head_dim, QKV = L->qkv.out, bf16 = L->bf16;
    const size_t es = bf16 ? sizeof(uint16_t) : sizeof(float);
    for (int r = 0; r < N; r++)
        if (write[r] < 0 || write[r] >= pool_slots) return 0;
    char *h = (char *)malloc(es * (size_t)N * D), *qkv = (char *)malloc(es * (size_t)N * QKV),
         *att = (char *)malloc(es * (size_t)N * H * d), *o = (char *)malloc(es * (size_t)N * D);
    int ok = h && qkv && att && o;
    if (ok) {
        rms_norm(x, D, N, D, L->norm1, L->eps1, h, D, bf16, nthreads);
        x8_linear_rows(&L->qkv, L->bits, bf16, h, N, qkv, nthreads);
        rotary(qkv, QKV, N, H + G, d, cos, sin, pairs, bf16);      /* the Q and K heads, adjacent in each row */
        const size_t kv = es * (size_t)G * d;
        for (int r = 0; r < N; r++) {
            const char *row = qkv + es * (size_t)r * QKV + es * (size_t)H * d;
            memcpy((char *)k_pool + kv * (size_t)write[r], row, kv);
            memcpy((char *)v_pool + kv * (size_t)write[r], row + kv, kv);
        }
        ok = bf16 ? attend_bf16(qkv, QKV, nparts, rows, keys, min_keys, slots, key_start, k_pool, v_pool,
                                (long)G * d, H, G, d, L->scale, att, nthreads)
                  : attend_f32(qkv, QKV, nparts, rows, keys, min_keys, slots, key_start, k_pool, v_pool,
                               (long)G * d, H, G, d, L->scale, att, nthreads);
    }
    if (ok) {
        x8_linear_rows(&L->dense, L->bits, bf16, att, N, o, nthreads);
        add_rows(x, o, x1, (size_t)N * D, bf16);
        rms_norm(x1, D, N, D, L->norm2, L->eps2, h, D, bf16, nthreads);
        x8_linear_rows(&L->up, L->bits, bf16, h, N, gu, nthreads);
    }
    free(h);
    free(qkv);
    free(att);
    free(o);
    return ok;
}

/* y = x1 + 4h_to_h(s): s [N, down.in], x1 and y [N, D]. -> 0 when memory ran out (y unwritten). */
int glm2_mlp_half(const glm2_layer *L, const void *s, const void *x1, int N, void *y, int nthreads) {
    const size_t n = (size_t)N * L->down.out;
    void *o = malloc((L->bf16 ? sizeof(uint16_t) : sizeof(float)) * n);
    if (!o) return 0;
    x8_linear_rows(&L->down, L->bits, L->bf16, s, N, o, nthreads);
    add_rows(x1, o, y, n, L->bf16);
    free(o);
    return 1;
}
