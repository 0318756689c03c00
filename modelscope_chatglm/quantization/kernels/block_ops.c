/*
 * The per-row ops of a GLM2/3 block around its linears, for fp32 and bf16 rows: RMSNorm and RoPE (the CPU
 * twins of models/triton_ops.py's `rms_norm` and `rotary_qk_`) and SwiGLU; and glm2_layers, every block of
 * a forward with int8 activations in one call. Called from models/cpu_ops.py.
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

/* ---- SwiGLU ----------------------------------------------------------------------------------------- */
/*
 * s = silu(gate) * up, gate and up the two halves of each row of dense_h_to_4h's output, with
 * silu(g) = g / (1 + exp(-g)) in fp32: glm2.py's MLP, torch's formula, with vec.h's exp in place of
 * torch's. Measured against the exact value it is as accurate as torch's (tests/test_block_ops.py bounds
 * it), and equal to torch's in most but not all last bits; like torch's it gives -0 for a very negative
 * gate (exp overflows to inf) and NaN for -inf. For bf16 rows silu is rounded to bf16 before the product,
 * which is rounded again, as torch's two ops round. Every build gives the same bits: vexp on full vectors,
 * its scalar twin exp_poly on the rest (swiglu_one, which the reference swiglu_*_ref runs on every element).
 */
static inline float swiglu_product(float silu, float up, int bf16) {
    return (bf16 ? bf16_to_f32(to_bf16(silu)) : silu) * up;
}

static inline float swiglu_one(float g, float up, int bf16) {
    return swiglu_product(g / (1.0f + exp_poly(-g)), up, bf16);
}

typedef struct {
    const void *gu;
    void *s;
    int F, bf16;
} swiglu_job;

static void swiglu_rows(void *arg, int r0, int r1) {
    const swiglu_job *job = (const swiglu_job *)arg;
    const int F = job->F, bf16 = job->bf16;
    for (int r = r0; r < r1; r++) {
        const size_t in = (size_t)r * 2 * F, out = (size_t)r * F;
        int j = 0;
#if VW > 1
        float silu[VW];
        for (; j + VW <= F; j += VW) {
            const vf g = bf16 ? load_bf16((const uint16_t *)job->gu + in + j) : vload((const float *)job->gu + in + j);
            const vf v = vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g))));
            if (bf16) {
                vstore(silu, v);
                for (int i = 0; i < VW; i++)
                    ((uint16_t *)job->s)[out + j + i] = to_bf16(swiglu_product(silu[i], load_elem(job->gu, 1, in + F + j + i), 1));
            } else
                vstore((float *)job->s + out + j, vmul(v, vload((const float *)job->gu + in + F + j)));
        }
#endif
        for (; j < F; j++)
            store_elem(job->s, bf16, out + j, swiglu_one(load_elem(job->gu, bf16, in + j), load_elem(job->gu, bf16, in + F + j), bf16));
    }
}

/* gu [N, 2F] -> s [N, F], the rows' dtype. */
static void swiglu(const void *gu, int N, int F, int bf16, void *s, int nthreads) {
    swiglu_job job = {gu, s, F, bf16};
    /* A decode step's few rows are microseconds of work: waking the other threads would cost more. */
    parallel_run(N, N >= 16 ? nthreads : 1, swiglu_rows, &job, 1);
}

void swiglu_f32(const float *gu, int N, int F, float *s, int nthreads) { swiglu(gu, N, F, 0, s, nthreads); }
void swiglu_bf16(const uint16_t *gu, int N, int F, uint16_t *s, int nthreads) { swiglu(gu, N, F, 1, s, nthreads); }

/* ---- GLM2/3 blocks with int8 activations, in one call ---------------------------------------------------- */
/*
 * Why: a full-width decode step spent a tenth of its time outside the kernels, in the Python and torch
 * code between the calls of each layer (about 25 a layer, then 3), each finding that code and its data
 * cold after the layer's weights streamed through the caches (benchmarks/README.md, "All blocks in one
 * call"). glm2_layers runs every block of a forward in one call, with the same kernels in glm2.py's order,
 * so every row gets the bits the module-by-module path gives it (tests/test_block_ops.py holds them to
 * that), for blocks whose four linears are QuantizedLinear with int8 activations. Per block:
 *
 *   x1 = x + dense(attend(rope(qkv(rms_norm1(x)))))
 *   y  = x1 + 4h_to_h(swiglu(h_to_4h(rms_norm2(x1))))
 *
 * The new rows' K and V are written to their pool slots before the attention reads them, as
 * _LayerKV.attend does. Rows are fp32 or bf16 (`bf16`), the weights in the hub's layout or the lane layout
 * (`lanes`, per linear).
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

/* The size of glm2_layer, for the test that holds build.py's ctypes mirror of it to this layout. */
size_t glm2_layer_bytes(void) { return sizeof(glm2_layer); }

/* y = linear(x), M rows, the rows' dtype in and out: QuantizedLinear's int8-activation path. */
static void x8_linear_rows(const x8_linear *L, int bits, int bf16, const void *x, int M, void *y, int nthreads) {
    if (bf16) gemv_x8_bf16((const uint16_t *)x, M, L->in, L->w, bits, L->lanes, L->scale, L->bias, (uint16_t *)y, L->out, nthreads);
    else gemv_x8((const float *)x, M, L->in, L->w, bits, L->lanes, L->scale, L->bias, (float *)y, L->out, nthreads);
}

/* y = a + b, n elements, each sum rounded once to the rows' dtype (torch's bf16 add). */
static void add_rows(const void *a, const void *b, void *y, size_t n, int bf16) {
    for (size_t i = 0; i < n; i++) store_elem(y, bf16, i, load_elem(a, bf16, i) + load_elem(b, bf16, i));
}

/* The attention's arguments of one forward (attend_f32's, attention.c), and where the new rows' K/V go. */
typedef struct {
    int nparts;
    const int *rows, *keys, *min_keys;
    const int32_t *slots;
    const long *key_start;
    const long *write;           /* [N]: new row r's pool slot */
} glm2_pages;

/* One forward's working rows, sized for the widest block. */
typedef struct {
    char *h, *qkv, *att, *o, *x1, *gu, *s;
} glm2_rows;

/* One block: x [N, D] -> y [N, D] (y may be x). k_pool, v_pool: this layer's [pool slots, G, d]. -> 0 where
 * the attention refused its shapes or memory ran out (y unwritten). */
static int glm2_block(const glm2_layer *L, const void *x, int N, const float *cos, const float *sin, int pairs,
                      const glm2_pages *P, void *k_pool, void *v_pool, const glm2_rows *B, void *y, int nthreads) {
    const int D = L->dense.out, H = L->heads, G = L->kv_heads, d = L->head_dim, QKV = L->qkv.out, bf16 = L->bf16;
    const size_t es = bf16 ? sizeof(uint16_t) : sizeof(float), kv = es * (size_t)G * d;
    rms_norm(x, D, N, D, L->norm1, L->eps1, B->h, D, bf16, nthreads);
    x8_linear_rows(&L->qkv, L->bits, bf16, B->h, N, B->qkv, nthreads);
    rotary(B->qkv, QKV, N, H + G, d, cos, sin, pairs, bf16);      /* the Q and K heads, adjacent in each row */
    for (int r = 0; r < N; r++) {
        const char *row = B->qkv + es * (size_t)r * QKV + es * (size_t)H * d;
        memcpy((char *)k_pool + kv * (size_t)P->write[r], row, kv);
        memcpy((char *)v_pool + kv * (size_t)P->write[r], row + kv, kv);
    }
    const int ok = (bf16 ? attend_bf16 : attend_f32)(B->qkv, QKV, P->nparts, P->rows, P->keys, P->min_keys, P->slots,
                                                     P->key_start, k_pool, v_pool, (long)G * d, H, G, d, L->scale,
                                                     B->att, nthreads);
    if (!ok) return 0;
    x8_linear_rows(&L->dense, L->bits, bf16, B->att, N, B->o, nthreads);
    add_rows(x, B->o, B->x1, (size_t)N * D, bf16);
    rms_norm(B->x1, D, N, D, L->norm2, L->eps2, B->h, D, bf16, nthreads);
    x8_linear_rows(&L->up, L->bits, bf16, B->h, N, B->gu, nthreads);
    swiglu(B->gu, N, L->down.in, bf16, B->s, nthreads);
    x8_linear_rows(&L->down, L->bits, bf16, B->s, N, B->o, nthreads);
    add_rows(B->x1, B->o, y, (size_t)N * D, bf16);
    return 1;
}

/* x [N, D] through `count` blocks -> y [N, D]. Block i's K/V pool is k_pool, v_pool plus i * layer_elems
 * elements ([pool_slots, G, d] each: KVPool's [layers, slots, G, d]); the rest are attend_f32's arguments
 * and write[r], new row r's pool slot. -> 1 when computed; 0 when a write slot is outside the pool
 * (nothing written), an attention refused its shapes or memory ran out, and then y is unwritten (the K/V
 * slots may hold some layers' new rows: the path that runs instead writes the same values, or raises on
 * a bad slot). */
int glm2_layers(const glm2_layer *layers, int count, const void *x, int N, const float *cos, const float *sin,
                int pairs, int nparts, const int *rows, const int *keys, const int *min_keys, const int32_t *slots,
                const long *key_start, void *k_pool, void *v_pool, long pool_slots, long layer_elems,
                const long *write, void *y, int nthreads) {
    for (int r = 0; r < N; r++)
        if (write[r] < 0 || write[r] >= pool_slots) return 0;
    size_t wide[7] = {0};   /* per row: h, qkv, att, o, x1, gu, s */
    for (int i = 0; i < count; i++) {
        const glm2_layer *L = &layers[i];
        const size_t w[7] = {L->dense.out, L->qkv.out, (size_t)L->heads * L->head_dim, L->dense.out, L->dense.out,
                             L->up.out, L->down.in};
        for (int j = 0; j < 7; j++) wide[j] = w[j] > wide[j] ? w[j] : wide[j];
    }
    const size_t es = count > 0 && layers[0].bf16 ? sizeof(uint16_t) : sizeof(float);
    char *buf[7];
    int ok = 1;
    for (int j = 0; j < 7; j++) ok &= (buf[j] = (char *)malloc(es * (size_t)N * wide[j] + 1)) != NULL;
    const glm2_pages P = {nparts, rows, keys, min_keys, slots, key_start, write};
    const glm2_rows B = {buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6]};
    for (int i = 0; ok && i < count; i++)
        ok = glm2_block(&layers[i], i == 0 ? x : y, N, cos, sin, pairs, &P,
                        (char *)k_pool + es * (size_t)layer_elems * i, (char *)v_pool + es * (size_t)layer_elems * i,
                        &B, y, nthreads);
    for (int j = 0; j < 7; j++) free(buf[j]);
    return ok;
}
