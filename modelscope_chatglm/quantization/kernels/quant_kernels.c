/*
 * Weight-only int8 / int4 kernels for ChatGLM's quantized linear layers (CPU).
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * Q[n, k] + bias[n]
 *
 * Q is int8 [N, K], or int4 packed [N, K/2] with the HIGH nibble = even column (formats.py).
 * x is fp32 [M, K]; y is fp32 [M, N]. M is small: decode (1), batched decode and short prompts (<= 64).
 *
 * The weights are streamed once per call for all M rows and never dequantised into a copy: each vector
 * of weights is widened to fp32 in registers and multiplied by up to X_ROWS rows of x at once (decode
 * runs at memory bandwidth; a batch pays the conversion once per X_ROWS rows). Each row of y is summed
 * in the same order whatever M is (see "The summation order"), so batching never changes a result.
 * For each kernel there is a plain scalar reference (`*_ref`) next to the SIMD version; the test suite
 * checks that they agree, on every instruction set the build can target here.
 *
 * The SIMD path is chosen when this file is compiled (-march=native): AVX-512 (F+BW), else AVX2+FMA,
 * else the scalar code. Rows are split across OpenMP threads (`nthreads` follows torch's setting).
 * Prefill (many rows of x) uses `*_dequant_rows_*` on row tiles and a matrix multiply in torch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KERNEL_ISA "avx512"
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define KERNEL_ISA "avx2"
#include <immintrin.h>
#else
#define KERNEL_ISA "scalar"
#endif

#ifdef _OPENMP
#include <omp.h>
#define KERNEL_OPENMP 1
#else
#define KERNEL_OPENMP 0
#endif

#define ROW_BLOCK 4   /* output rows per work item: their weights stay in L1 across the M rows of x */

const char *kernel_isa(void) { return KERNEL_ISA; }
int kernel_openmp(void) { return KERNEL_OPENMP; }

/* ---- int4 nibbles ---------------------------------------------------------------------------- */

static inline int int4_high(int8_t b) { return b >> 4; }                       /* column 2j   */
static inline int int4_low(int8_t b) { return (int8_t)((uint8_t)b << 4) >> 4; } /* column 2j+1 */

/* ---- scalar references ----------------------------------------------------------------------- */

void q8_gemv_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                 float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * (float)W[(size_t)n * K + k];
            y[(size_t)m * N + n] = acc * scale[n] + (bias ? bias[n] : 0.0f);
        }
}

void q4_gemv_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                 float *y, int N) {
    const int KB = K / 2;   /* bytes per row */
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int j = 0; j < KB; j++) {
                int8_t b = W[(size_t)n * KB + j];
                acc += x[(size_t)m * K + 2 * j] * (float)int4_high(b);
                acc += x[(size_t)m * K + 2 * j + 1] * (float)int4_low(b);
            }
            y[(size_t)m * N + n] = acc * scale[n] + (bias ? bias[n] : 0.0f);
        }
}

/* ---- one vector type for every instruction set ------------------------------------------------ */
/* vf holds VW floats: 16 (AVX-512), 8 (AVX2) or 1 (scalar). Every kernel below is written once on it. */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf load_q8(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) {   /* VW bytes -> 2*VW weights */
    __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w));   /* sign-extended bytes */
    *hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
    *lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vhsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline vf load_q8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
}
#else
#define VW 1
typedef float vf;
static inline vf vzero(void) { return 0.0f; }
static inline vf vload(const float *p) { return *p; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vhsum(vf v) { return v; }
static inline vf load_q8(const int8_t *w) { return (float)*w; }
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) { *hi = (float)int4_high(*w); *lo = (float)int4_low(*w); }
#endif

/*
 * The summation order, the same for every number of rows M: y[m, n] accumulates in one vector per
 * (m, n), VW weights at a time in increasing k (int4: per VW bytes, the high nibbles against the even
 * columns, then the low nibbles against the odd ones), then the horizontal sum, then the scalar tail.
 * So a row's result never depends on the other rows in the call: a sequence decoded in a batch gets
 * exactly the numbers it gets alone. The scalar build (VW = 1) is the plain sequential sum.
 *
 * int4 activations are rearranged once per call ("interleaved"): for each block of VW bytes, the VW
 * even columns then the VW odd ones, so the kernel reads x in the order it consumes it.
 */
static void interleave_q4(const float *x, int K, float *out) {
    const int KB = K / 2, full = KB - KB % VW;
    for (int j0 = 0; j0 < full; j0 += VW)
        for (int i = 0; i < VW; i++) {
            out[2 * j0 + i] = x[2 * (j0 + i)];
            out[2 * j0 + VW + i] = x[2 * (j0 + i) + 1];
        }
    for (int j = full; j < KB; j++) { out[2 * j] = x[2 * j]; out[2 * j + 1] = x[2 * j + 1]; }
}

/* Up to ROW_BLOCK weight rows against up to X_ROWS rows of x: each weight vector is widened in registers
 * once and multiplied by all of them (X_ROWS x ROW_BLOCK accumulators + X_ROWS x values + one weight
 * vector fill the 16 AVX2 registers). More rows of x take more passes over the same ROW_BLOCK weight
 * rows, which by then sit in L1/L2: DRAM sees the weights once per call. out[m * ROW_BLOCK + r]. */
#define X_ROWS 3

static inline __attribute__((always_inline)) void rows_q8(const float *x, size_t ldx, int mb, const int8_t *w, size_t stride, int K, int rows,
                           float *out) {
    vf acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = vzero();
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[X_ROWS];
        for (int m = 0; m < mb; m++) xv[m] = vload(x + m * ldx + k);
        for (int r = 0; r < rows; r++) {
            vf wv = load_q8(w + r * stride + k);
            for (int m = 0; m < mb; m++) acc[m][r] = vfma(wv, xv[m], acc[m][r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            float d = vhsum(acc[m][r]);
            for (int kk = k; kk < K; kk++) d += x[m * ldx + kk] * (float)w[r * stride + kk];
            out[m * ROW_BLOCK + r] = d;
        }
}

static inline __attribute__((always_inline)) void rows_q4(const float *xi, size_t ldx, int mb, const int8_t *w, size_t stride, int KB, int rows,
                           float *out) {
    vf acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = vzero();
    int j = 0;
    for (; j + VW <= KB; j += VW)
        for (int r = 0; r < rows; r++) {
            vf hi, lo;
            load_q4(w + r * stride + j, &hi, &lo);
            for (int m = 0; m < mb; m++) {
                acc[m][r] = vfma(hi, vload(xi + m * ldx + 2 * j), acc[m][r]);
                acc[m][r] = vfma(lo, vload(xi + m * ldx + 2 * j + VW), acc[m][r]);
            }
        }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const float *xm = xi + m * ldx;
            float d = vhsum(acc[m][r]);
            for (int jj = j; jj < KB; jj++) {
                int8_t b = w[r * stride + jj];
                d += xm[2 * jj] * (float)int4_high(b) + xm[2 * jj + 1] * (float)int4_low(b);
            }
            out[m * ROW_BLOCK + r] = d;
        }
}

/* ---- GEMV / skinny GEMM: decode and batched decode ------------------------------------------- */

/* The usual shapes (a full block of weight rows against 1, 2 or X_ROWS rows of x) as calls with constant
 * trip counts: inlined, GCC unrolls them and keeps the accumulators in registers instead of on the
 * stack. The same code computes the same sums in the same order, whichever call runs. */
#define ROWS_WITH_CONSTANT_SHAPES(fn)                                                           \
    do {                                                                                      \
        if (rows == ROW_BLOCK && mb == 1) fn(xm, (size_t)K, 1, w, (size_t)KB, KB, ROW_BLOCK, out);  \
        else if (rows == ROW_BLOCK && mb == 2) fn(xm, (size_t)K, 2, w, (size_t)KB, KB, ROW_BLOCK, out); \
        else if (rows == ROW_BLOCK && mb == X_ROWS)                                           \
            fn(xm, (size_t)K, X_ROWS, w, (size_t)KB, KB, ROW_BLOCK, out);                     \
        else fn(xm, (size_t)K, mb, w, (size_t)KB, KB, rows, out);                            \
    } while (0)

static void gemv(const float *x, int M, int K, const int8_t *W, int bits, const float *scale, const float *bias,
                 float *y, int N, int nthreads) {
    const int KB = bits == 4 ? K / 2 : K, blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    const float *xs = x;
    float *xi = NULL;
    if (bits == 4) {   /* rearrange each x row once: see interleave_q4 */
        xi = (float *)malloc(sizeof(float) * (size_t)M * K);
        for (int m = 0; m < M; m++) interleave_q4(x + (size_t)m * K, K, xi + (size_t)m * K);
        xs = xi;
    }
    (void)nthreads;
#pragma omp parallel num_threads(nthreads)
    {
        float *d = (float *)malloc(sizeof(float) * (size_t)M * ROW_BLOCK);   /* per thread */
#pragma omp for schedule(static)
        for (int blk = 0; blk < blocks; blk++) {
            const int n0 = blk * ROW_BLOCK, rows = n0 + ROW_BLOCK < N ? ROW_BLOCK : N - n0;
            for (int m0 = 0; m0 < M; m0 += X_ROWS) {
                const int mb = M - m0 < X_ROWS ? M - m0 : X_ROWS;
                const float *xm = xs + (size_t)m0 * K;
                const int8_t *w = W + (size_t)n0 * KB;
                float *out = d + m0 * ROW_BLOCK;
                if (bits == 4) ROWS_WITH_CONSTANT_SHAPES(rows_q4);
                else ROWS_WITH_CONSTANT_SHAPES(rows_q8);
            }
            for (int m = 0; m < M; m++)
                for (int r = 0; r < rows; r++)
                    y[(size_t)m * N + n0 + r] = d[m * ROW_BLOCK + r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
        free(d);
    }
    free(xi);
}

void q8_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, M, K, W, 8, scale, bias, y, N, nthreads);
}

void q4_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, M, K, W, 4, scale, bias, y, N, nthreads);
}

/* ---- dequantised row tiles: the prefill path ------------------------------------------------- */
/* Rows [n0, n1) of W into `out` ([n1-n0, K]), as fp32 or bf16 (round to nearest even). */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

void q8_dequant_rows_f32(const int8_t *W, const float *scale, int n0, int n1, int K, float *out, int nthreads) {
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++)
        for (int k = 0; k < K; k++) out[(size_t)(n - n0) * K + k] = (float)W[(size_t)n * K + k] * scale[n];
}

void q8_dequant_rows_bf16(const int8_t *W, const float *scale, int n0, int n1, int K, uint16_t *out, int nthreads) {
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++)
        for (int k = 0; k < K; k++) out[(size_t)(n - n0) * K + k] = to_bf16((float)W[(size_t)n * K + k] * scale[n]);
}

void q4_dequant_rows_f32(const int8_t *W, const float *scale, int n0, int n1, int K, float *out, int nthreads) {
    const int KB = K / 2;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++)
        for (int j = 0; j < KB; j++) {
            int8_t b = W[(size_t)n * KB + j];
            out[(size_t)(n - n0) * K + 2 * j] = (float)int4_high(b) * scale[n];
            out[(size_t)(n - n0) * K + 2 * j + 1] = (float)int4_low(b) * scale[n];
        }
}

void q4_dequant_rows_bf16(const int8_t *W, const float *scale, int n0, int n1, int K, uint16_t *out, int nthreads) {
    const int KB = K / 2;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++)
        for (int j = 0; j < KB; j++) {
            int8_t b = W[(size_t)n * KB + j];
            out[(size_t)(n - n0) * K + 2 * j] = to_bf16((float)int4_high(b) * scale[n]);
            out[(size_t)(n - n0) * K + 2 * j + 1] = to_bf16((float)int4_low(b) * scale[n]);
        }
}
