/*
 * The CPU kernels against their scalar references, in C, for the builds the Python tests cannot load here:
 * tests/test_kernels_arm.py cross-compiles this for aarch64 (NEON with dotprod, and plain Armv8-A NEON)
 * with the library's own flags (build.harness_flags), links it statically and runs it under qemu-aarch64.
 * It #includes the kernels as the library is built (one translation unit), so it reaches the vector
 * primitives of vec.h too. The contract it holds a build to, as tests/test_quantization.py and
 * tests/test_attention.py hold the x86 builds:
 * - int8 activations (`*_gemv_x8`) and SwiGLU (`swiglu_*`): the scalar reference's bits (NEON, like every
 *   x86 build and the scalar build);
 * - the exact kernels, the LM-head kernels and attention: within fp32 rounding of the reference and of
 *   float64 (their vectors sum in another order), and bf16 x gives the bits of x widened to fp32 on
 *   builds without bf16 pair products;
 * - every kernel: a row's bits do not depend on the other rows of a call, nor on the number of threads;
 *   a query's attention not on the chunk or the batch it comes in; NaN reaches the outputs that read it.
 * Prints a line per check ("ok" / "FAIL"), then "passed N of N checks"; exits 1 when a check failed.
 * It builds and passes on x86 too (-march=native, x86-64-v3, x86-64): a check of the harness itself.
 */
#include <stdarg.h>
#include <stdio.h>

#include "quant_kernels.c"

/* ---- checks ---------------------------------------------------------------------------------------- */
static int checks = 0, failed = 0;

static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    checks++;
    failed += !ok;
    fputs(ok ? "ok   " : "FAIL ", stdout);
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
}

/* ---- random inputs (xorshift: the same numbers on every machine) ----------------------------------- */
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static void seed(uint64_t s) { rng = 0x9E3779B97F4A7C15ull ^ (s * 0xBF58476D1CE4E5B9ull) ^ 1; }
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static float uniform(void) { return (float)(rnd() >> 8) * (1.0f / 16777216.0f); }   /* [0, 1) */
static float gauss(void) { return (uniform() + uniform() + uniform() + uniform() - 2.0f) * 1.7320508f; }

static void *alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        puts("FAIL out of memory");
        exit(1);
    }
    return p;
}

/* A finite fp16 of a random sign and mantissa, |v| < 8, subnormals included (exponent field 0 .. 17). */
static uint16_t random_f16(void) { return (uint16_t)((rnd() & 0x8000) | ((rnd() % 18) << 10) | (rnd() & 0x3ff)); }

/* ---- comparisons ----------------------------------------------------------------------------------- */
static int same_bits(const float *a, const float *b, size_t n) {   /* NaN = NaN whatever its payload */
    for (size_t i = 0; i < n; i++)
        if (memcmp(a + i, b + i, 4) && !(a[i] != a[i] && b[i] != b[i])) return 0;
    return 1;
}

static double max_diff(const float *a, const double *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - b[i]);
        m = e > m || e != e ? e : m;
    }
    return m;
}

static double max_abs(const double *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* ---- the gemv kernels, one signature for all ------------------------------------------------------- */
typedef void (*fast_fn)(const void *x, int M, int K, const void *W, const float *scale, const float *bias, float *y,
                        int N, int threads);
typedef void (*ref_fn)(const void *x, int M, int K, const void *W, const float *scale, const float *bias, float *y,
                       int N);

#define QUANTIZED(fn, xt)                                                                                         \
    static void fn##_fast(const void *x, int M, int K, const void *W, const float *s, const float *b, float *y,    \
                          int N, int t) { fn((const xt *)x, M, K, (const int8_t *)W, s, b, y, N, t); }           \
    static void fn##_slow(const void *x, int M, int K, const void *W, const float *s, const float *b, float *y,   \
                          int N) { fn##_ref((const xt *)x, M, K, (const int8_t *)W, s, b, y, N); }
#define HEAD(fn, xt, wt)                                                                                          \
    static void fn##_fast(const void *x, int M, int K, const void *W, const float *s, const float *b, float *y,    \
                          int N, int t) { (void)s; fn((const xt *)x, M, K, (const wt *)W, b, y, N, t); }         \
    static void fn##_slow(const void *x, int M, int K, const void *W, const float *s, const float *b, float *y,   \
                          int N) { (void)s; fn##_ref((const xt *)x, M, K, (const wt *)W, b, y, N); }
QUANTIZED(q8_gemv, float)
QUANTIZED(q4_gemv, float)
QUANTIZED(q8_gemv_xbf16, uint16_t)
QUANTIZED(q4_gemv_xbf16, uint16_t)
QUANTIZED(q8_gemv_x8, float)
QUANTIZED(q4_gemv_x8, float)
HEAD(f32_gemv, float, float)
HEAD(f16_gemv, float, uint16_t)
HEAD(bf16_gemv, uint16_t, uint16_t)

enum wkind { WQ8, WQ4, WF32, WF16, WBF16 };

typedef struct {
    const char *name;
    int xbf16;        /* x in bf16 */
    enum wkind w;
    int x8;           /* int8 activations: the reference's bits */
    fast_fn fast;
    ref_fn ref;
} kernel_t;

#define K_(fn, xbf16, w, x8) {#fn, xbf16, w, x8, fn##_fast, fn##_slow}
static const kernel_t KERNELS[] = {
    K_(q8_gemv, 0, WQ8, 0),       K_(q4_gemv, 0, WQ4, 0),       K_(q8_gemv_xbf16, 1, WQ8, 0),
    K_(q4_gemv_xbf16, 1, WQ4, 0), K_(q8_gemv_x8, 0, WQ8, 1),    K_(q4_gemv_x8, 0, WQ4, 1),
    K_(f32_gemv, 0, WF32, 0),     K_(f16_gemv, 0, WF16, 0),     K_(bf16_gemv, 1, WBF16, 0),
};
#define NKERNELS (int)(sizeof(KERNELS) / sizeof(KERNELS[0]))

static size_t weight_bytes(enum wkind w, int N, int K) {
    const size_t n = (size_t)N * K;
    return w == WQ8 ? n : w == WQ4 ? n / 2 : w == WF32 ? 4 * n : 2 * n;
}

static double weight_value(enum wkind w, const void *W, int K, int n, int k) {
    const size_t i = (size_t)n * K + k;
    switch (w) {
    case WQ8: return ((const int8_t *)W)[i];
    case WQ4: {
        const int8_t b = ((const int8_t *)W)[i / 2];
        return k % 2 ? int4_low(b) : int4_high(b);
    }
    case WF32: return ((const float *)W)[i];
    case WF16: return f16_to_f32(((const uint16_t *)W)[i]);
    default: return bf16_to_f32(((const uint16_t *)W)[i]);
    }
}

/* One problem: x [M, K] (fp32, and its bf16 copy), W [N, K] of the kernel's kind, scales, bias. Weights
 * take every value of their type (int8 -128 too, every int4 nibble). */
typedef struct {
    int M, K, N;
    float *x, *xw;       /* xw: what the kernel sees (x, or x rounded to bf16), widened */
    uint16_t *xb;
    void *W;
    float *scale, *bias;
} problem;

static problem make_problem(const kernel_t *kn, int M, int K, int N, uint64_t s) {
    problem p = {M, K, N, NULL, NULL, NULL, NULL, NULL, NULL};
    seed(s);
    p.x = (float *)alloc(sizeof(float) * M * K);
    p.xw = (float *)alloc(sizeof(float) * M * K);
    p.xb = (uint16_t *)alloc(sizeof(uint16_t) * M * K);
    for (int m = 0; m < M; m++) {
        const float row = 1.0f + 10.0f * uniform();   /* rows of different sizes: each its own x8 scales */
        for (int k = 0; k < K; k++) p.x[(size_t)m * K + k] = gauss() * row;
    }
    if (K >= 7)
        for (int k = 0; k < 7; k++) p.x[k] = 0.0f;    /* an all-zero start of a block */
    for (size_t i = 0; i < (size_t)M * K; i++) {
        p.xb[i] = to_bf16(p.x[i]);
        p.xw[i] = kn->xbf16 ? bf16_to_f32(p.xb[i]) : p.x[i];
    }
    const size_t bytes = weight_bytes(kn->w, N, K), count = kn->w == WQ4 ? bytes : (size_t)N * K;
    p.W = alloc(bytes);
    for (size_t i = 0; i < count; i++) {
        switch (kn->w) {
        case WQ8: case WQ4: ((int8_t *)p.W)[i] = (int8_t)rnd(); break;
        case WF32: ((float *)p.W)[i] = gauss(); break;
        case WF16: ((uint16_t *)p.W)[i] = random_f16(); break;
        case WBF16: ((uint16_t *)p.W)[i] = to_bf16(gauss()); break;
        }
    }
    p.scale = (float *)alloc(sizeof(float) * N);
    p.bias = (float *)alloc(sizeof(float) * N);
    for (int n = 0; n < N; n++) {
        p.scale[n] = 0.001f + 0.02f * uniform();
        p.bias[n] = gauss();
    }
    return p;
}

static void free_problem(problem *p) {
    free(p->x), free(p->xw), free(p->xb), free(p->W), free(p->scale), free(p->bias);
}

static const void *x_of(const kernel_t *kn, const problem *p, int m0) {
    return kn->xbf16 ? (const void *)(p->xb + (size_t)m0 * p->K) : (const void *)(p->x + (size_t)m0 * p->K);
}

static int scaled(const kernel_t *kn) { return kn->w == WQ8 || kn->w == WQ4; }

/* x [M, K] @ W^T exactly (float64), times the scales, plus the bias. */
static double *exact_product(const kernel_t *kn, const problem *p) {
    double *e = (double *)alloc(sizeof(double) * p->M * p->N);
    for (int m = 0; m < p->M; m++)
        for (int n = 0; n < p->N; n++) {
            double acc = 0;
            for (int k = 0; k < p->K; k++) acc += (double)p->xw[(size_t)m * p->K + k] * weight_value(kn->w, p->W, p->K, n, k);
            e[(size_t)m * p->N + n] = acc * (scaled(kn) ? p->scale[n] : 1.0) + p->bias[n];
        }
    return e;
}

/* ---- gemv: the kernel against its reference and float64 --------------------------------------------- */
static void gemv_equals_reference(const kernel_t *kn, int M, int K, int N) {
    problem p = make_problem(kn, M, K, N, (uint64_t)M * 1000 + K + N);
    float *fast = (float *)alloc(sizeof(float) * M * N), *ref = (float *)alloc(sizeof(float) * M * N);
    kn->fast(x_of(kn, &p, 0), M, K, p.W, p.scale, p.bias, fast, N, 2);
    kn->ref(x_of(kn, &p, 0), M, K, p.W, p.scale, p.bias, ref, N);
    double *exact = exact_product(kn, &p);
    if (kn->x8) {
        check(same_bits(fast, ref, (size_t)M * N), "%s M=%d K=%d N=%d: the reference's bits", kn->name, M, K, N);
        /* ... and what rounding x to int8 costs against the exact product: about 0.5% of the output */
        double num = 0, den = 0;
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
                const size_t i = (size_t)m * N + n;
                num += (fast[i] - exact[i]) * (fast[i] - exact[i]);
                den += (exact[i] - p.bias[n]) * (exact[i] - p.bias[n]);
            }
        const double rel = sqrt(num / den);
        if (K >= 64) check(rel > 1e-4 && rel < 0.02, "%s M=%d K=%d N=%d: %.2g of the exact product", kn->name, M, K, N, rel);
    } else {
        const double tol = 1e-4 * (1 + max_abs(exact, (size_t)M * N));
        double fr = 0;
        for (size_t i = 0; i < (size_t)M * N; i++) fr = fabs((double)fast[i] - ref[i]) > fr ? fabs((double)fast[i] - ref[i]) : fr;
        const double fe = max_diff(fast, exact, (size_t)M * N), re = max_diff(ref, exact, (size_t)M * N);
        check(fe < tol && re < tol && fr < tol, "%s M=%d K=%d N=%d: |kernel - float64| %.2g, |ref - float64| %.2g, "
              "|kernel - ref| %.2g (< %.2g)", kn->name, M, K, N, fe, re, fr, tol);
    }
    /* without a bias: the same sums, the bias added after */
    float *no_bias = (float *)alloc(sizeof(float) * M * N);
    kn->fast(x_of(kn, &p, 0), M, K, p.W, p.scale, NULL, no_bias, N, 2);
    int ok = 1;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            const size_t i = (size_t)m * N + n;
            ok &= fabsf(no_bias[i] + p.bias[n] - fast[i]) <= 1e-4f * (1 + fabsf(fast[i]));
        }
    check(ok, "%s M=%d K=%d N=%d: no bias", kn->name, M, K, N);
    free(no_bias), free(exact), free(fast), free(ref);
    free_problem(&p);
}

/* Row m of an M-row call = the 1-row call on row m, bit for bit, for each M. */
static void gemv_rows_are_independent(const kernel_t *kn, int K, int N, int rows) {
    problem p = make_problem(kn, rows, K, N, (uint64_t)K + N + 7);
    float *alone = (float *)alloc(sizeof(float) * rows * N), *together = (float *)alloc(sizeof(float) * rows * N);
    for (int m = 0; m < rows; m++) kn->fast(x_of(kn, &p, m), 1, K, p.W, p.scale, NULL, alone + (size_t)m * N, N, 2);
    static const int counts[] = {2, 3, 4, 5, 7, 16, 64, 130};
    for (int c = 0; c < 8 && counts[c] <= rows; c++) {
        kn->fast(x_of(kn, &p, 0), counts[c], K, p.W, p.scale, NULL, together, N, 2);
        check(same_bits(together, alone, (size_t)counts[c] * N), "%s K=%d: %d rows together = each alone", kn->name, K,
              counts[c]);
    }
    free(alone), free(together);
    free_problem(&p);
}

/* Any number of threads: the same bits. */
static void gemv_threads(const kernel_t *kn) {
    const int M = 9, K = 1088, N = 301;
    problem p = make_problem(kn, M, K, N, 99);
    float *one = (float *)alloc(sizeof(float) * M * N), *many = (float *)alloc(sizeof(float) * M * N);
    kn->fast(x_of(kn, &p, 0), M, K, p.W, p.scale, p.bias, one, N, 1);
    static const int threads[] = {2, 3, 8, 300};
    for (int t = 0; t < 4; t++) {
        kn->fast(x_of(kn, &p, 0), M, K, p.W, p.scale, p.bias, many, N, threads[t]);
        check(same_bits(one, many, (size_t)M * N), "%s: %d threads = 1 thread", kn->name, threads[t]);
    }
    free(one), free(many);
    free_problem(&p);
}

/* A NaN (or an inf) in a row of x makes that row's outputs NaN (or non-finite), and no other row's. */
static void gemv_lets_nan_through(const kernel_t *kn, float bad) {
    const int M = 3, K = 160, N = 9;
    problem p = make_problem(kn, M, K, N, 5);
    p.x[K + 70] = bad;
    p.xb[K + 70] = to_bf16(bad);
    float *fast = (float *)alloc(sizeof(float) * M * N), *ref = (float *)alloc(sizeof(float) * M * N);
    kn->fast(x_of(kn, &p, 0), M, K, p.W, p.scale, NULL, fast, N, 2);
    kn->ref(x_of(kn, &p, 0), M, K, p.W, p.scale, NULL, ref, N);
    int ok = 1;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            const float f = fast[m * N + n], r = ref[m * N + n];
            if (m == 1) ok &= bad != bad ? f != f && r != r : !isfinite(f) && !isfinite(r);
            else ok &= isfinite(f) && isfinite(r);
        }
    if (kn->x8) ok &= same_bits(fast, ref, (size_t)M * N);
    check(ok, "%s: %s in row 1 of x reaches row 1 of y only", kn->name, bad != bad ? "NaN" : "inf");
    free(fast), free(ref);
    free_problem(&p);
}

/* Builds without bf16 pair products widen bf16 x and run the fp32 kernel: the same bits. */
static void bf16_x_is_widened(void) {
#ifndef XBF16_DP
    const int M = 7, K = 2048, N = 300;
    const kernel_t *pairs[3][2] = {{&KERNELS[2], &KERNELS[0]}, {&KERNELS[3], &KERNELS[1]}, {&KERNELS[8], &KERNELS[6]}};
    for (int i = 0; i < 3; i++) {
        const kernel_t *b = pairs[i][0], *f = pairs[i][1];
        problem p = make_problem(b, M, K, N, 11 + i);
        float *wide = NULL;
        const void *W = p.W;
        if (b->w == WBF16) {   /* the head: bf16 weights widened too */
            wide = (float *)alloc(sizeof(float) * N * K);
            for (size_t j = 0; j < (size_t)N * K; j++) wide[j] = bf16_to_f32(((const uint16_t *)p.W)[j]);
            W = wide;
        }
        float *yb = (float *)alloc(sizeof(float) * M * N), *yf = (float *)alloc(sizeof(float) * M * N);
        b->fast(p.xb, M, K, p.W, p.scale, NULL, yb, N, 2);
        f->fast(p.xw, M, K, W, p.scale, NULL, yf, N, 2);
        check(same_bits(yb, yf, (size_t)M * N), "%s = %s on x widened to fp32, bit for bit", b->name, f->name);
        free(yb), free(yf), free(wide);
        free_problem(&p);
    }
#endif
}

/* The fp16 head widens exactly: f16_gemv gives f32_gemv's bits on the widened weights. */
static void f16_head_is_exact(void) {
    const int M = 5, K = 1030, N = 37;
    problem p = make_problem(&KERNELS[7], M, K, N, 21);
    float *wide = (float *)alloc(sizeof(float) * N * K), *a = (float *)alloc(sizeof(float) * M * N),
          *b = (float *)alloc(sizeof(float) * M * N);
    for (size_t j = 0; j < (size_t)N * K; j++) wide[j] = f16_to_f32(((const uint16_t *)p.W)[j]);
    f16_gemv(p.x, M, K, (const uint16_t *)p.W, p.bias, a, N, 2);
    f32_gemv(p.x, M, K, wide, p.bias, b, N, 2);
    check(same_bits(a, b, (size_t)M * N), "f16_gemv = f32_gemv on the widened weights, bit for bit");
    free(wide), free(a), free(b);
    free_problem(&p);
}

/* ---- the vector primitives (vec.h) against the scalar helpers, every input value ------------------- */
static void primitives(void) {
#if VW > 1
    int ok = 1;
    float lanes[VW], hi[VW], lo[VW];
    int8_t bytes[VW];
    for (int v = 0; v < 256; v += VW) {
        for (int i = 0; i < VW; i++) bytes[i] = (int8_t)(v + i);
        vstore(lanes, load_q8(bytes));
        vf h, l;
        load_q4(bytes, &h, &l);
        vstore(hi, h), vstore(lo, l);
        for (int i = 0; i < VW; i++)
            ok &= lanes[i] == (float)bytes[i] && hi[i] == (float)int4_high(bytes[i]) && lo[i] == (float)int4_low(bytes[i]);
    }
    check(ok, "load_q8, load_q4: every byte");
    int bf = 1, f16 = 1;
    uint16_t halves[VW];
    for (uint32_t v = 0; v < 65536; v += VW) {
        for (int i = 0; i < VW; i++) halves[i] = (uint16_t)(v + i);
        vstore(lanes, load_bf16(halves));
        for (int i = 0; i < VW; i++) {
            const float e = bf16_to_f32(halves[i]);
            bf &= !memcmp(&lanes[i], &e, 4);
        }
        vstore(lanes, load_f16(halves));
        for (int i = 0; i < VW; i++) {   /* a signalling NaN may come back quiet: NaN = NaN */
            const float e = f16_to_f32(halves[i]);
            f16 &= !memcmp(&lanes[i], &e, 4) || (e != e && lanes[i] != lanes[i]);
        }
    }
    check(bf, "load_bf16: every bf16, bit for bit");
    check(f16, "load_f16: every fp16 (subnormals, inf, NaN), bit for bit");
    double worst = 0;
    int nan = 1;
    for (int i = 0; i < 100000; i += VW) {
        float x[VW], e[VW];
        for (int j = 0; j < VW; j++) x[j] = -87.0f * (float)(i + j) / 100000.0f;
        vstore(e, vexp(vload(x)));
        for (int j = 0; j < VW; j++) {
            const double r = fabs(e[j] - exp((double)x[j])) / exp((double)x[j]);
            worst = r > worst ? r : worst;
        }
        x[0] = NAN;
        vstore(e, vexp(vload(x)));
        nan &= e[0] != e[0];
    }
    /* ~2e-7 from the polynomial, plus t = x log2(e) rounded to fp32: up to 125 x 6e-8 in the exponent */
    check(worst < 1e-5 && nan, "vexp on [-87, 0]: relative error %.2g; NaN stays NaN", worst);
#if VW == 4
    float m[16], t[16];
    for (int i = 0; i < 16; i++) m[i] = (float)i;
    float32x4_t r[4];
    for (int i = 0; i < 4; i++) r[i] = vld1q_f32(m + 4 * i);
    transpose4(r);
    for (int i = 0; i < 4; i++) vst1q_f32(t + 4 * i, r[i]);
    ok = 1;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) ok &= t[4 * i + j] == m[4 * j + i];
    check(ok, "transpose4");
#endif
#endif
}

/* ---- attention over paged K/V --------------------------------------------------------------------- */
typedef struct {
    int nparts, H, G, d, rows, pages;
    long ldq, ld_slot;
    int *row0, *keys, *min_keys;     /* min_keys NULL: none */
    int32_t *slots;
    long *key_start;
    float *q, *k, *v;
    uint16_t *qb, *kb, *vb;
} paged_t;

/* parts[p] = {rows, keys, min_keys (0: none)}: random q rows (inside wider rows, as the QKV projection
 * leaves them), a pool of random K/V, each part's keys on pages in shuffled order. */
static paged_t make_paged(int nparts, const int (*parts)[3], int H, int G, int d, uint64_t s) {
    paged_t p = {nparts, H, G, d, 0, 0, (long)H * d + 2L * G * d, (long)G * d, NULL, NULL, NULL, NULL, NULL,
                 NULL, NULL, NULL, NULL, NULL, NULL};
    seed(s);
    int total = 0, any_min = 0;
    for (int i = 0; i < nparts; i++) total += parts[i][1], p.rows += parts[i][0], any_min |= parts[i][2] > 0;
    p.pages = total + 37;
    int32_t *order = (int32_t *)alloc(sizeof(int32_t) * p.pages);
    for (int i = 0; i < p.pages; i++) order[i] = i;
    for (int i = p.pages - 1; i > 0; i--) {
        const int j = (int)(rnd() % (uint32_t)(i + 1));
        const int32_t t = order[i];
        order[i] = order[j], order[j] = t;
    }
    p.slots = order;
    p.row0 = (int *)alloc(sizeof(int) * (nparts + 1));
    p.keys = (int *)alloc(sizeof(int) * (nparts + 1));
    p.min_keys = any_min ? (int *)alloc(sizeof(int) * (nparts + 1)) : NULL;
    p.key_start = (long *)alloc(sizeof(long) * (nparts + 1));
    p.row0[0] = 0;
    for (int i = 0, start = 0; i < nparts; i++) {
        p.row0[i + 1] = p.row0[i] + parts[i][0];
        p.keys[i] = parts[i][1];
        if (p.min_keys) p.min_keys[i] = parts[i][2];
        p.key_start[i] = start;
        start += parts[i][1];
    }
    const size_t nq = (size_t)p.rows * p.ldq, nkv = (size_t)p.pages * p.ld_slot;
    p.q = (float *)alloc(4 * nq), p.k = (float *)alloc(4 * nkv), p.v = (float *)alloc(4 * nkv);
    p.qb = (uint16_t *)alloc(2 * nq), p.kb = (uint16_t *)alloc(2 * nkv), p.vb = (uint16_t *)alloc(2 * nkv);
    for (size_t i = 0; i < nq; i++) p.q[i] = gauss();
    for (size_t i = 0; i < nkv; i++) p.k[i] = gauss(), p.v[i] = gauss();
    return p;
}

static void sync_bf16(paged_t *p) {
    for (size_t i = 0; i < (size_t)p->rows * p->ldq; i++) p->qb[i] = to_bf16(p->q[i]);
    for (size_t i = 0; i < (size_t)p->pages * p->ld_slot; i++) p->kb[i] = to_bf16(p->k[i]), p->vb[i] = to_bf16(p->v[i]);
}

static void free_paged(paged_t *p) {
    free(p->row0), free(p->keys), free(p->min_keys), free(p->slots), free(p->key_start);
    free(p->q), free(p->k), free(p->v), free(p->qb), free(p->kb), free(p->vb);
}

static size_t out_size(const paged_t *p) { return (size_t)p->rows * p->H * p->d; }

/* Rows [r0, r0 + rows of parts) of q as the call's; threads < 0: the reference. out fp32 (bf16 widened). */
static int attend(const paged_t *p, int bf16, int threads, float *out) {
    const size_t n = out_size(p);
    void *o = bf16 ? alloc(2 * n) : (void *)out;
    const void *q = bf16 ? (const void *)p->qb : (const void *)p->q, *k = bf16 ? (const void *)p->kb : (const void *)p->k,
               *v = bf16 ? (const void *)p->vb : (const void *)p->v;
    const float scale = 1.0f / sqrtf((float)p->d);
    int done;
    if (threads < 0)
        done = (bf16 ? attend_bf16_ref : attend_f32_ref)(q, p->ldq, p->nparts, p->row0, p->keys, p->min_keys, p->slots,
                                                          p->key_start, k, v, p->ld_slot, p->H, p->G, p->d, scale, o);
    else
        done = (bf16 ? attend_bf16 : attend_f32)(q, p->ldq, p->nparts, p->row0, p->keys, p->min_keys, p->slots,
                                                 p->key_start, k, v, p->ld_slot, p->H, p->G, p->d, scale, o, threads);
    if (bf16) {
        for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(((uint16_t *)o)[i]);
        free(o);
    }
    return done;
}

static void attention_equals_reference(int nparts, const int (*parts)[3], int H, int G, int d) {
    paged_t p = make_paged(nparts, parts, H, G, d, (uint64_t)nparts + H + d);
    sync_bf16(&p);
    const size_t n = out_size(&p);
    float *fast = (float *)alloc(4 * n), *ref = (float *)alloc(4 * n);
    for (int bf16 = 0; bf16 < 2; bf16++) {
        const int a = attend(&p, bf16, 2, fast), b = attend(&p, bf16, -1, ref);
        double worst = 0, mean = 0;
        for (size_t i = 0; i < n; i++) {
            const double e = fabs((double)fast[i] - ref[i]);
            worst = e > worst || e != e ? e : worst;
            mean += e / n;
        }
        const int ok = a == 1 && b == 1 && (bf16 ? worst < 2e-2 && mean < 2e-3 : worst < 2e-5);
        check(ok, "attend_%s: %d parts (%d rows, %d keys first), H=%d G=%d d=%d: |kernel - ref| max %.2g mean %.2g",
              bf16 ? "bf16" : "f32", nparts, parts[0][0], parts[0][1], H, G, d, worst, mean);
    }
    free(fast), free(ref);
    free_paged(&p);
}

/* One sequence's queries as one prompt, as chunks after the positions before them (every other chunk
 * beside another sequence's decode row, whose keys are other pages of the pool), on 1 or 3 threads: the
 * same bits. */
static void attention_chunks(int bf16) {
    const int S = 150, H = 8, G = 2, d = 128, other = 37;   /* make_paged leaves 37 pages past the S used */
    const int part[1][3] = {{S, S, 0}};
    paged_t p = make_paged(1, part, H, G, d, 5);
    sync_bf16(&p);
    const size_t row = (size_t)H * d;
    float *whole = (float *)alloc(4 * out_size(&p)), *out = (float *)alloc(4 * (out_size(&p) + row));
    attend(&p, bf16, 2, whole);
    static const int cuts[] = {0, 1, 17, 18, 64, 149, 150};
    int ok = 1;
    for (int c = 0; c + 1 < 7; c++) {
        const int a = cuts[c], b = cuts[c + 1], beside = c % 2, rows = beside + b - a;
        float *q = (float *)alloc(sizeof(float) * rows * p.ldq);
        uint16_t *qb = (uint16_t *)alloc(sizeof(uint16_t) * rows * p.ldq);
        if (beside) memcpy(q, p.q + (size_t)(S - 1) * p.ldq, sizeof(float) * p.ldq);   /* any row will do */
        memcpy(q + beside * p.ldq, p.q + (size_t)a * p.ldq, sizeof(float) * (b - a) * p.ldq);
        for (size_t i = 0; i < (size_t)rows * p.ldq; i++) qb[i] = to_bf16(q[i]);
        int row0[3] = {0, 1, 1 + b - a}, keys[2] = {other, b};
        long key_start[2] = {S, 0};
        if (!beside) row0[1] = b - a, keys[0] = b, key_start[0] = 0;
        paged_t chunk = p;
        chunk.q = q, chunk.qb = qb, chunk.rows = rows, chunk.nparts = 1 + beside;
        chunk.row0 = row0, chunk.keys = keys, chunk.key_start = key_start;
        ok &= attend(&chunk, bf16, 2, out) == 1 && same_bits(out + beside * row, whole + a * row, (b - a) * row);
        free(q), free(qb);
    }
    check(ok, "attend_%s: a query's bits in one prompt = in chunks, beside other sequences", bf16 ? "bf16" : "f32");
    for (int threads = 1; threads <= 3; threads += 2) {
        attend(&p, bf16, threads, out);
        check(same_bits(out, whole, out_size(&p)), "attend_%s: %d threads = 2 threads", bf16 ? "bf16" : "f32", threads);
    }
    free(whole), free(out);
    free_paged(&p);
}

/* A NaN in q, K or V reaches exactly the outputs that read it. */
static void attention_lets_nan_through(void) {
    const int H = 8, G = 2, d = 32, rows = 4;
    const int parts[1][3] = {{rows, 40, 0}};
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (int where = 0; where < 3; where++)
            for (int ref = 0; ref < 2; ref++) {
                paged_t p = make_paged(1, parts, H, G, d, 3);
                if (where == 0) p.q[2 * p.ldq + 5 * d + 3] = NAN;                  /* row 2, head 5 (group 1) */
                else (where == 1 ? p.k : p.v)[(size_t)p.slots[30] * p.ld_slot + 1 * d + 7] = NAN;   /* key 30, group 1 */
                sync_bf16(&p);
                float *out = (float *)alloc(4 * out_size(&p));
                const int done = attend(&p, bf16, ref ? -1 : 2, out);
                int ok = done == 1;
                for (int r = 0; r < rows; r++)
                    for (int h = 0; h < H; h++) {
                        int nan = 0;
                        for (int c = 0; c < d; c++) nan |= out[((size_t)r * H + h) * d + c] != out[((size_t)r * H + h) * d + c];
                        ok &= nan == (where == 0 ? r == 2 && h == 5 : h >= 4);
                    }
                check(ok, "attend_%s%s: NaN in %s reaches the outputs that read it", bf16 ? "bf16" : "f32",
                      ref ? "_ref" : "", where == 0 ? "q" : where == 1 ? "K" : "V");
                free(out);
                free_paged(&p);
            }
}

/* ---- SwiGLU (block_ops.c): vexp's lanes and exp_poly give the reference's bits ---------------------- */
static void swiglu_equals_reference(void) {
    static const int widths[] = {1, 37, 64, 13696};   /* all tail, vectors and a tail, vectors only, ChatGLM2-6B's */
    for (size_t w = 0; w < sizeof(widths) / sizeof(widths[0]); w++) {
        const int N = 20, F = widths[w];   /* 20 rows: on the threads */
        float *gu = (float *)alloc(sizeof(float) * N * 2 * F), *s = (float *)alloc(sizeof(float) * N * F),
              *e = (float *)alloc(sizeof(float) * N * F);
        uint16_t *gu16 = (uint16_t *)alloc(2 * (size_t)N * 2 * F), *s16 = (uint16_t *)alloc(2 * (size_t)N * F),
                 *e16 = (uint16_t *)alloc(2 * (size_t)N * F);
        seed(9 + F);
        for (int i = 0; i < N * 2 * F; i++) gu[i] = 4.0f * gauss();
        const float special[] = {0.0f, -0.0f, 90.0f, -90.0f, -200.0f, 200.0f, NAN, INFINITY};
        for (int i = 0; i < 8 && i < F; i++) gu[i] = special[i];   /* past exp's clamps, NaN, inf */
        for (int i = 0; i < N * 2 * F; i++) gu16[i] = to_bf16(gu[i]);
        swiglu_f32(gu, N, F, s, 2);
        swiglu_f32_ref(gu, N, F, e);
        swiglu_bf16(gu16, N, F, s16, 2);
        swiglu_bf16_ref(gu16, N, F, e16);
        int same = 1;   /* bit for bit, a NaN for a NaN (whose sign and payload the two paths may set apart) */
        for (int i = 0; i < N * F; i++) same &= (s[i] != s[i] && e[i] != e[i]) || memcmp(&s[i], &e[i], 4) == 0;
        const int nan_through = F <= 6 || s[6] != s[6];   /* gate NaN: NaN */
        check(same && nan_through, "swiglu_f32: the reference's bits, F = %d", F);
        check(memcmp(s16, e16, 2 * (size_t)N * F) == 0, "swiglu_bf16: the reference's bits, F = %d", F);
        free(gu), free(s), free(e), free(gu16), free(s16), free(e16);
    }
}

/* ---- the rest: dequantised tiles (plain C, compiled for this target), the lane layout --------------- */
static void dequant_tiles(void) {
    const int N = 70, K = 96, n0 = 20, n1 = 50;
    int8_t *W = (int8_t *)alloc((size_t)N * K);
    float *scale = (float *)alloc(sizeof(float) * N), *out = (float *)alloc(sizeof(float) * (n1 - n0) * K);
    uint16_t *out16 = (uint16_t *)alloc(2 * (size_t)(n1 - n0) * K);
    seed(8);
    for (int i = 0; i < N * K; i++) W[i] = (int8_t)rnd();
    for (int n = 0; n < N; n++) scale[n] = 0.01f + uniform();
    for (int bits = 8; bits >= 4; bits -= 4)
        for (int scaled = 0; scaled < 2; scaled++) {
            const float *s = scaled ? scale : NULL;
            (bits == 8 ? q8_dequant_rows_f32 : q4_dequant_rows_f32)(W, s, n0, n1, K, out, 2);
            (bits == 8 ? q8_dequant_rows_bf16 : q4_dequant_rows_bf16)(W, s, n0, n1, K, out16, 2);
            int ok = 1;
            for (int n = n0; n < n1; n++)
                for (int k = 0; k < K; k++) {
                    const int8_t b = bits == 8 ? W[n * K + k] : W[n * (K / 2) + k / 2];
                    const float e = (float)(bits == 8 ? b : k % 2 ? int4_low(b) : int4_high(b)) * (s ? s[n] : 1.0f);
                    const size_t i = (size_t)(n - n0) * K + k;
                    ok &= out[i] == e && out16[i] == to_bf16(e);
                }
            check(ok, "q%d_dequant_rows_f32 / _bf16%s", bits, scaled ? ", scaled" : "");
        }
#ifndef X8_LANES
    check(x8_relayout_weights(W, N, K, 8, 1, 2) == -1, "x8_relayout_weights: -1 (no lane layout on this build)");
#endif
    free(W), free(scale), free(out), free(out16);
}

int main(void) {
    printf("isa %s openmp %d\n", kernel_isa(), kernel_openmp());
    setvbuf(stdout, NULL, _IOLBF, 0);
    primitives();
    /* (M, K, N): odd N, N not a multiple of the tiles' 4 rows, K % 64 != 0 (a short last block), K past
     * one vector (2, 18), full width 4096, a last block of 4 columns (4100), up to 70 rows (x8: panels). */
    static const int shapes[][3] = {{1, 64, 48}, {3, 200, 37}, {1, 4096, 33}, {8, 1000, 130}, {5, 96, 1},
                                    {2, 2500, 9}, {64, 1104, 21}, {70, 4096, 5}, {4, 4100, 7}, {7, 18, 6}, {2, 2, 3}};
    for (int i = 0; i < NKERNELS; i++)
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            gemv_equals_reference(&KERNELS[i], shapes[s][0], shapes[s][1], shapes[s][2]);
    static const int row_k[] = {200, 2056, 4096};
    for (int i = 0; i < NKERNELS; i++)
        for (int j = 0; j < 3; j++) gemv_rows_are_independent(&KERNELS[i], row_k[j], 45, KERNELS[i].x8 && j == 2 ? 130 : 64);
    if (KERNEL_OPENMP)
        for (int i = 0; i < NKERNELS; i++) gemv_threads(&KERNELS[i]);
    for (int i = 0; i < NKERNELS; i++)
        if (KERNELS[i].w == WQ8 || KERNELS[i].w == WQ4) {
            gemv_lets_nan_through(&KERNELS[i], NAN);
            gemv_lets_nan_through(&KERNELS[i], INFINITY);
        }
    bf16_x_is_widened();
    f16_head_is_exact();
    /* A decode step, a prompt, chunks after cached positions (keys not a multiple of 4 or 16), ChatGLM2's
     * shape, heads per group not a multiple of 4, one head per group, d not a multiple of 4 (18: the scalar
     * packing and the tail dims) and over 128, ChatGLM-6B's bidirectional prompt (min_keys), parts of each
     * kind in one call. */
    static const int p1[][3] = {{1, 1, 0}}, p2[][3] = {{1, 300, 0}}, p3[][3] = {{37, 37, 0}}, p4[][3] = {{40, 133, 0}},
                     p5[][3] = {{5, 70, 0}}, p6[][3] = {{3, 50, 0}}, p7[][3] = {{16, 16, 0}},
                     p8[][3] = {{7, 19, 0}, {1, 5, 0}}, p9[][3] = {{12, 12, 9}, {1, 40, 0}}, p10[][3] = {{3, 21, 0}},
                     p11[][3] = {{1, 90, 0}, {20, 45, 0}, {1, 3, 0}, {9, 9, 6}};
    attention_equals_reference(1, p1, 32, 2, 128);
    attention_equals_reference(1, p2, 32, 2, 128);
    attention_equals_reference(1, p3, 4, 2, 16);
    attention_equals_reference(1, p4, 32, 2, 128);
    attention_equals_reference(1, p5, 6, 2, 32);
    attention_equals_reference(1, p6, 8, 8, 256);
    attention_equals_reference(1, p7, 2, 1, 64);
    attention_equals_reference(2, p8, 4, 2, 24);
    attention_equals_reference(2, p9, 4, 4, 32);
    attention_equals_reference(1, p10, 4, 2, 18);
    attention_equals_reference(4, p11, 32, 2, 128);
    attention_chunks(0);
    attention_chunks(1);
    attention_lets_nan_through();
    swiglu_equals_reference();
    dequant_tiles();
    printf("%s %d of %d checks\n", failed ? "FAILED" : "passed", checks - failed, checks);
    return failed ? 1 : 0;
}
