/*
 * Weight-only int8 / int4 kernels for ChatGLM's quantized linear layers (CPU).
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * Q[n, k] + bias[n]
 *
 * Q is int8 [N, K], or int4 packed [N, K/2] with the HIGH nibble = even column (formats.py).
 * x is fp32 [M, K]; y is fp32 [M, N]. M is small (decode: 1, batched decode: a few rows).
 *
 * The weights are streamed once per call and never dequantised into a buffer: each 16/32 weights
 * are widened to fp32 in registers and fused into the dot product, so decode runs at memory
 * bandwidth. For each kernel there is a plain scalar reference (`*_ref`) next to the SIMD version;
 * the test suite checks that they agree, on every machine the build lands on.
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

/* ---- dot products of one fp32 vector with one quantized row (SIMD) ----------------------------- */

#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline float dot_q8(const float *x, const int8_t *w, int K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    float acc = hsum(_mm512_add_ps(a0, a1));
    for (; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

/* x_even / x_odd: x split by column parity, so a byte's two nibbles meet contiguous x values. */
static inline float dot_q4(const float *x_even, const float *x_odd, const int8_t *w, int KB) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= KB; j += 16) {
        __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j)));  /* sign-extended */
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
        a0 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x_even + j), a0);
        a1 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x_odd + j), a1);
    }
    float acc = hsum(_mm512_add_ps(a0, a1));
    for (; j < KB; j++) acc += x_even[j] * (float)int4_high(w[j]) + x_odd[j] * (float)int4_low(w[j]);
    return acc;
}
/* Four rows at once: each x chunk is loaded once for four weight rows, so x (which for K = 13696
 * no longer fits in L1) costs a quarter of the cache traffic. */
static inline void dot4_q8(const float *x, const int8_t *w, size_t stride, int K, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
#define ROW(r, acc) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32( \
            _mm_loadu_si128((const __m128i *)(w + (r) * stride + k)))), xv, acc)
        ROW(0, a0); ROW(1, a1); ROW(2, a2); ROW(3, a3);
#undef ROW
    }
    out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
    for (; k < K; k++)
        for (int r = 0; r < 4; r++) out[r] += x[k] * (float)w[r * stride + k];
}

static inline void dot4_q4(const float *x_even, const float *x_odd, const int8_t *w, size_t stride, int KB,
                           float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int j = 0;
    for (; j + 16 <= KB; j += 16) {
        __m512 xe = _mm512_loadu_ps(x_even + j), xo = _mm512_loadu_ps(x_odd + j);
        for (int r = 0; r < 4; r++) {
            __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * stride + j)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4)), xe, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), xo, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        out[r] = hsum(acc[r]);
        for (int jj = j; jj < KB; jj++) {
            int8_t b = w[r * stride + jj];
            out[r] += x_even[jj] * (float)int4_high(b) + x_odd[jj] * (float)int4_low(b);
        }
    }
}
#define HAVE_DOT4 1
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 load8_q8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

static inline float dot_q8(const float *x, const int8_t *w, int K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(load8_q8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8_q8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

static inline float dot_q4(const float *x_even, const float *x_odd, const int8_t *w, int KB) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= KB; j += 8) {
        __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
        a0 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x_even + j), a0);
        a1 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x_odd + j), a1);
    }
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; j < KB; j++) acc += x_even[j] * (float)int4_high(w[j]) + x_odd[j] * (float)int4_low(w[j]);
    return acc;
}
#else
static inline float dot_q8(const float *x, const int8_t *w, int K) {
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

static inline float dot_q4(const float *x_even, const float *x_odd, const int8_t *w, int KB) {
    float acc = 0.0f;
    for (int j = 0; j < KB; j++) acc += x_even[j] * (float)int4_high(w[j]) + x_odd[j] * (float)int4_low(w[j]);
    return acc;
}
#endif

/* ---- GEMV: the decode path ------------------------------------------------------------------- */

void q8_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    const int blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        for (int m = 0; m < M; m++) {
            float dots[ROW_BLOCK];
#ifdef HAVE_DOT4
            if (n1 - n0 == 4) {
                dot4_q8(x + (size_t)m * K, W + (size_t)n0 * K, (size_t)K, K, dots);
            } else
#endif
            for (int n = n0; n < n1; n++) dots[n - n0] = dot_q8(x + (size_t)m * K, W + (size_t)n * K, K);
            for (int n = n0; n < n1; n++) y[(size_t)m * N + n] = dots[n - n0] * scale[n] + (bias ? bias[n] : 0.0f);
        }
    }
}

void q4_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    const int KB = K / 2, blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    /* De-interleave each x row once: x_split[m] = [x[0], x[2], ... | x[1], x[3], ...]. */
    float *x_split = (float *)malloc(sizeof(float) * (size_t)M * K);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < KB; j++) {
            x_split[(size_t)m * K + j] = x[(size_t)m * K + 2 * j];
            x_split[(size_t)m * K + KB + j] = x[(size_t)m * K + 2 * j + 1];
        }
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        for (int m = 0; m < M; m++) {
            const float *xe = x_split + (size_t)m * K, *xo = xe + KB;
            float dots[ROW_BLOCK];
#ifdef HAVE_DOT4
            if (n1 - n0 == 4) {
                dot4_q4(xe, xo, W + (size_t)n0 * KB, (size_t)KB, KB, dots);
            } else
#endif
            for (int n = n0; n < n1; n++) dots[n - n0] = dot_q4(xe, xo, W + (size_t)n * KB, KB);
            for (int n = n0; n < n1; n++) y[(size_t)m * N + n] = dots[n - n0] * scale[n] + (bias ? bias[n] : 0.0f);
        }
    }
    free(x_split);
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
