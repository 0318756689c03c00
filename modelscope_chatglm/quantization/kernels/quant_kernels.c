/*
 * The CPU kernels: weight-only int8 / int4 linear layers for ChatGLM's quantized blocks, the LM head of a
 * decode step, and bf16 attention.
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * Q[n, k] + bias[n]
 *
 * Q is int8 [N, K], or int4 packed [N, K/2] with the HIGH nibble = even column (formats.py).
 * x is fp32 [M, K] (bf16 for `*_xbf16`); y is fp32 [M, N]. M is small: decode (1), batched decode and short prompts (<= 64).
 *
 * The weights are streamed once per call for all M rows and never dequantised into a copy: each vector
 * of weights is widened to fp32 in registers and multiplied by up to X_ROWS rows of x at once (decode
 * runs at memory bandwidth; a batch pays the conversion once per X_ROWS rows). Each row of y is summed
 * in the same order whatever M is (see "The summation order"), so batching never changes a result.
 * For each kernel there is a plain scalar reference (`*_ref`) next to the SIMD version; the test suite
 * checks that they agree, on every instruction set the build can target here.
 *
 * The SIMD path is chosen when this file is compiled (-march=native): AVX-512 (F+BW), else AVX2+FMA,
 * else the scalar code. Rows are split across `nthreads` OpenMP threads (torch's setting) in chunks (see
 * "threads" below).
 * Prefill (many rows of x) uses `*_dequant_rows_*` on row tiles and a matrix multiply in torch.
 *
 * `*_gemv_xbf16` take a bf16 model's x in bf16: on AVX512-BF16 they multiply bf16 pairs (`vdpbf16ps`,
 * twice the products per instruction, the same exact products; see "bf16 activations"), elsewhere they
 * widen x and run the fp32 loop.
 *
 * `f32_gemv` (fp32 x and weights) and `bf16_gemv` (bf16 x and weights) are the same loops for the LM head
 * of a decode step (models/base.py): fp32 logits, summed in the same order for any number of rows.
 *
 * `*_gemv_x8` are the opt-in int8-activation kernels (see "int8 activations" below): x is quantized to
 * int8 too and the dot products are exact integer sums (AVX512-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, or
 * the scalar code); they take every row of x, prompt or decode.
 *
 * `attend_f32` and `attend_bf16` are the attention of every new row of a forward (prompt chunks and decode
 * tokens of many sequences) over their keys in the paged K/V pool, one call per layer (the last section).
 */
#include <math.h>     /* NAN, fmaf */
#include <pthread.h>  /* pthread_atfork */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define KERNEL_ISA "avx512-vnni-bf16"
#define X8_VNNI 1     /* the int8-activation kernel's dot products in one instruction (see there) */
#define XBF16_DP 1    /* bf16 activations: bf16 pair products in one instruction (see there) */
#include <immintrin.h>
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KERNEL_ISA "avx512-vnni"
#define X8_VNNI 1
#include <immintrin.h>
#elif defined(__AVX512F__) && defined(__AVX512BW__)
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

/* ---- threads ---------------------------------------------------------------------------------- */
/*
 * The work of a call is cut into chunks that the threads take from one shared counter, on OpenMP's
 * runtime: torch's own (libgomp.so.1 is loaded once per process), so torch's ops and ours run on the
 * same threads and never compete for the cores between them.
 *
 * Why chunks and not OpenMP's static split: on a machine shared with another busy process, one of our
 * threads is often descheduled. With half the rows each, the other finished its half and waited for it;
 * per-call times went from 2 ms to 6-8 ms (benchmarks/bench_quant_gemv.py --only shared). Now whoever
 * runs takes the next chunk, and a descheduled thread holds back only the chunk it took.
 *
 * An OpenMP region also ends only when every thread of it has run at least once. When the other
 * threads took no chunk of a call (another process had their cores), the next few calls run in the
 * caller's thread alone instead of waiting for them (see SERIAL_AFTER_IDLE_HELPERS).
 *
 * Which thread computes a chunk never changes a result: each output is written by one chunk, whose
 * code does not depend on the thread.
 *
 * A child forked after the threads ran (a DataLoader worker, a pre-forking server) cannot use them:
 * libgomp would wait for threads the child does not have. There the kernels run in the caller's thread.
 */
#define CHUNKS_PER_THREAD 8   /* small enough to balance, large enough that taking one costs nothing */

typedef void (*range_fn)(void *ctx, int begin, int end);

static volatile int in_forked_child = 0;
static void note_fork(void) { in_forked_child = 1; }
__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, note_fork); }

/* After a call in which the other threads took no chunk (all descheduled: another process has the
 * cores), the next calls run in the caller's thread alone: waiting for them at the end of a parallel
 * region would cost a time slice of the other process. Then threads are tried again. */
#ifdef _OPENMP
#define SERIAL_AFTER_IDLE_HELPERS 8
static _Atomic int serial_calls_left = 0;
#endif

/* fn(ctx, begin, end) over [0, items), in chunks, on up to `nthreads` threads. `brief`: a call short
 * enough to end before a sleeping helper thread wakes up (attention's, tens of microseconds), so that
 * its caller taking every chunk says nothing about the helpers: it neither starts the serial calls nor
 * counts them down. (Counted, attention's calls put the linears of a server's prefill on one thread:
 * with libgomp's short spin (__init__.py) the helpers sleep between calls, and a 128-token prompt's
 * first token took 3.0-3.7 s instead of 2.1-2.6.) */
static void parallel_run(int items, int nthreads, range_fn fn, void *ctx, int brief) {
    if (items <= 0) return;
    if (nthreads > items) nthreads = items;
#ifdef _OPENMP
    if (nthreads > 1 && !in_forked_child && atomic_load_explicit(&serial_calls_left, memory_order_relaxed) <= 0) {
        int grain = items / (nthreads * CHUNKS_PER_THREAD);
        grain = grain < 1 ? 1 : grain;
        const int chunks = (items + grain - 1) / grain;
        _Atomic int next = 0, by_caller = 0;
#pragma omp parallel num_threads(nthreads)
        {
            int taken = 0;
            for (int c; (c = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed)) < chunks; taken++)
                fn(ctx, c * grain, (c + 1) * grain < items ? (c + 1) * grain : items);
            if (omp_get_thread_num() == 0) by_caller = taken;
        }
        if (by_caller == chunks && !brief)
            atomic_store_explicit(&serial_calls_left, SERIAL_AFTER_IDLE_HELPERS, memory_order_relaxed);
        return;
    }
    if (!brief) atomic_fetch_sub_explicit(&serial_calls_left, 1, memory_order_relaxed);
#else
    (void)brief;
#endif
    fn(ctx, 0, items);
}

static void parallel_for(int items, int nthreads, range_fn fn, void *ctx) { parallel_run(items, nthreads, fn, ctx, 0); }

/* Each thread's scratch buffer (weights widened or rearranged for a work item, attention's scores), kept between calls: a
 * fresh malloc of a few hundred KB is an mmap whose pages fault in again on every call. Freed when its
 * thread exits. One user at a time per thread: a work item takes it and gives it back. */
typedef struct {
    void *data;
    size_t size;
} scratch_t;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void free_scratch(void *p) {
    free(((scratch_t *)p)->data);
    free(p);
}

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static void *thread_scratch(size_t bytes) {
    pthread_once(&scratch_once, make_scratch_key);
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof(scratch_t));
        pthread_setspecific(scratch_key, s);
    }
    if (bytes > s->size) {
        free(s->data);
        s->data = malloc(bytes);
        s->size = s->data ? bytes : 0;
    }
    return s->data;
}

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

void f32_gemv_ref(const float *x, int M, int K, const float *W, const float *bias, float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * W[(size_t)n * K + k];
            y[(size_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
}

/* bf16 is the top half of an fp32: widening is exact. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static float *widen_bf16(const uint16_t *x, size_t n) {
    float *f = (float *)malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) f[i] = bf16_to_f32(x[i]);
    return f;
}

/* bf16 activations (a bf16 model): the same sums on x widened to fp32. */
void q8_gemv_xbf16_ref(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                       float *y, int N) {
    float *xf = widen_bf16(x, (size_t)M * K);
    q8_gemv_ref(xf, M, K, W, scale, bias, y, N);
    free(xf);
}

void q4_gemv_xbf16_ref(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                       float *y, int N) {
    float *xf = widen_bf16(x, (size_t)M * K);
    q4_gemv_ref(xf, M, K, W, scale, bias, y, N);
    free(xf);
}

/* bf16 weights and bf16 x (a bf16 model's LM head), fp32 logits. */
void bf16_gemv_ref(const uint16_t *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += bf16_to_f32(x[(size_t)m * K + k]) * bf16_to_f32(W[(size_t)n * K + k]);
            y[(size_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
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
static inline vf load_bf16(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) {   /* VW bytes -> 2*VW weights */
    /* Each nibble indexes a table of the 16 values: vpermps reads only an index's low 4 bits, so the
     * low nibble needs no mask, and the lookup replaces the int -> float conversion (one shift and two
     * lookups per 32 weights instead of three shifts and two converts; the same floats). */
    const __m512 value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), value);
    *lo = _mm512_permutexvar_ps(b, value);
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
static inline vf load_bf16(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
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
static inline vf load_bf16(const uint16_t *w) { return bf16_to_f32(*w); }
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) { *hi = (float)int4_high(*w); *lo = (float)int4_low(*w); }
#endif

#if VW == 16
/* Transpose 16 x 16 int32 in registers: at s = 8, 4, 2, 1, element (i, j) trades places with (i ^ s, j ^ s)
 * where bit s of i and of j differ. Each stage is one vpermt2d per register. */
static inline void transpose16(__m512i r[16]) {
    static const int32_t index[4][2][16] = {
        /* s = 8 */ {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                     {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
        /* s = 4 */ {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                     {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
        /* s = 2 */ {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                     {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
        /* s = 1 */ {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                     {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}}};
    for (int stage = 0, s = 8; stage < 4; stage++, s /= 2) {
        const __m512i lo = _mm512_loadu_si512(index[stage][0]), hi = _mm512_loadu_si512(index[stage][1]);
        for (int i = 0; i < 16; i++)
            if (!(i & s)) {
                const __m512i a = r[i], b = r[i + s];
                r[i] = _mm512_permutex2var_epi32(a, lo, b);
                r[i + s] = _mm512_permutex2var_epi32(a, hi, b);
            }
    }
}

#endif

#if VW == 8
/* Transpose 8 x 8 floats in registers. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
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
static inline __attribute__((always_inline)) void interleave_cols(const char *x, int K, char *out, int width,
                                                                  size_t size) {
    const int KB = K / 2, full = KB - KB % width;
    for (int j0 = 0; j0 < full; j0 += width)
        for (int i = 0; i < width; i++) {
            memcpy(out + (2 * (size_t)j0 + i) * size, x + 2 * (size_t)(j0 + i) * size, size);
            memcpy(out + (2 * (size_t)j0 + width + i) * size, x + (2 * (size_t)(j0 + i) + 1) * size, size);
        }
    memcpy(out + 2 * (size_t)full * size, x + 2 * (size_t)full * size, 2 * (size_t)(KB - full) * size);
}

static void interleave_q4(const float *x, int K, float *out) {
    interleave_cols((const char *)x, K, (char *)out, VW, sizeof(float));
}

/* Up to ROW_BLOCK weight rows against up to X_ROWS rows of x: each weight vector is widened in registers
 * once and multiplied by all of them (X_ROWS x ROW_BLOCK accumulators + X_ROWS x values + one weight
 * vector fill the 16 AVX2 registers). More rows of x take more passes over the same ROW_BLOCK weight
 * rows, which by then sit in L1/L2: DRAM sees the weights once per call. out[m * ROW_BLOCK + r]. */
#define X_ROWS 3

/* One weight per column, of type `wt`: int8 (widened in registers), or fp32 or bf16 (the LM head); `stride`
 * in bytes. Inlined with a constant `wt`, so each caller gets its own straight loop. */
enum weight_type { W_INT8, W_F32, W_BF16 };

static inline __attribute__((always_inline)) float widened_weight(const int8_t *wr, int k, enum weight_type wt) {
    return wt == W_F32 ? ((const float *)wr)[k] : wt == W_BF16 ? bf16_to_f32(((const uint16_t *)wr)[k]) : (float)wr[k];
}

static inline __attribute__((always_inline)) vf widened_weights(const int8_t *wr, int k, enum weight_type wt) {
    return wt == W_F32 ? vload((const float *)wr + k) : wt == W_BF16 ? load_bf16((const uint16_t *)wr + k)
                                                                     : load_q8(wr + k);
}

static inline __attribute__((always_inline)) void rows_wide(const float *x, size_t ldx, int mb, const int8_t *w,
                                                            size_t stride, int K, int rows, float *out,
                                                            enum weight_type wt) {
    vf acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = vzero();
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[X_ROWS];
        for (int m = 0; m < mb; m++) xv[m] = vload(x + m * ldx + k);
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            vf wv = widened_weights(wr, k, wt);
            for (int m = 0; m < mb; m++) acc[m][r] = vfma(wv, xv[m], acc[m][r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            float d = vhsum(acc[m][r]);
            for (int kk = k; kk < K; kk++) d += x[m * ldx + kk] * widened_weight(wr, kk, wt);
            out[m * ROW_BLOCK + r] = d;
        }
}

static inline __attribute__((always_inline)) void rows_q4(const float *xi, size_t ldx, int mb, const int8_t *w,
                                                          size_t stride, int K, int rows, float *out,
                                                          int unused /* ROWS_WITH_CONSTANT_SHAPES passes a weight type */) {
    (void)unused;
    const int KB = K / 2;
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

/* ---- bf16 activations: a bf16 model's decode rows -------------------------------------------- */
/*
 * In a bf16 model x arrives in bf16. AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later) has
 * `vdpbf16ps`: 32 products of bf16 pairs per instruction, each adjacent pair added into one fp32 lane,
 * twice the products of an fp32 FMA. Every weight value here is exact in bf16 (int8, an int4 nibble, a
 * bf16 head weight), and so is the product of two bf16 in fp32: these are the exact sums of the kernels
 * above, in another order (pairs of columns), with bf16 denormals (below 1e-38) read as zero, the
 * instruction's rule. Each row of y is still summed in the same order whatever M is.
 *
 * The weights are widened in registers:
 * - int8: 32 bytes -> two fp32 vectors -> 32 bf16 in column order (vcvtne2ps2bf16, exact);
 * - int4: 32 bytes -> 64 nibbles by two 32-entry table lookups, the high nibbles (even columns) and the
 *   low ones (odd columns). vpermw reads an index's low 5 bits and the table holds the 16 values twice,
 *   so the low nibble needs no mask. x is rearranged to match once per call (interleave_q4_bf16);
 * - bf16 (the LM head): as they are.
 *
 * Every build other than "avx512-vnni-bf16" has no `vdpbf16ps`: there the same entry points widen x to
 * fp32 and run the kernels above.
 */
#ifdef XBF16_DP
static void interleave_q4_bf16(const uint16_t *x, int K, uint16_t *out) {
    interleave_cols((const char *)x, K, (char *)out, 32, sizeof(uint16_t));
}

static inline __m512bh as_bf16(__m512i v) { return (__m512bh)v; }

static inline __m512bh load_q8_bf16(const int8_t *w) {   /* 32 bytes -> 32 bf16 */
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(b, a);   /* words 0-15 from a (columns 0-15), 16-31 from b */
}

static inline void load_q4_bf16(const int8_t *w, __m512bh *hi, __m512bh *lo) {   /* 32 bytes -> 2 x 32 bf16 */
    const __m512 value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(value, value);
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)w));
    *hi = as_bf16(_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table));
    *lo = as_bf16(_mm512_permutexvar_epi16(b, table));
}

/* A batch of more than X_ROWS rows of x passes the same weight rows several times. Widening int8 to bf16
 * costs 5 instructions per 32 weights, as much as the products it feeds in a pass of X_ROWS rows, so
 * then the block's int8 weights are widened once into the thread's scratch buffer (L1/L2) and every pass
 * reads them from there: vectors wb[((t * ROW_BLOCK + r) * nvec + v) * 32] for step t, weight row r and
 * vector v, then each row's tail columns in natural order. The same values in the same operations: the
 * results do not change. (int4 too could, with nvec = 2 for the high and low nibbles; but its two
 * table lookups are cheaper than reading 4x the bytes back: int4 at 16 rows measured 27 ms a block
 * widened once, 22 widened per pass. So int4 widens per pass.) */
static void widen_rows_bf16(const int8_t *w, size_t stride, int K, int rows, int bits, uint16_t *wb) {
    const int step = bits == 4 ? 64 : 32, nvec = bits == 4 ? 2 : 1, steps = K / step, tail = K - steps * step;
    for (int t = 0; t < steps; t++)
        for (int r = 0; r < rows; r++) {
            uint16_t *v = wb + ((size_t)t * ROW_BLOCK + r) * nvec * 32;
            __m512bh w0, w1;
            if (bits == 4) {
                load_q4_bf16(w + r * stride + t * step / 2, &w0, &w1);
                _mm512_storeu_si512(v + 32, (__m512i)w1);
            } else {
                w0 = load_q8_bf16(w + r * stride + t * step);
            }
            _mm512_storeu_si512(v, (__m512i)w0);
        }
    uint16_t *tails = wb + (size_t)steps * ROW_BLOCK * nvec * 32;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < tail; i++) {
            const int col = steps * step + i;
            const int8_t *wr = w + r * stride;
            const float f = (float)(bits == 4 ? (col % 2 ? int4_low(wr[col / 2]) : int4_high(wr[col / 2])) : wr[col]);
            uint32_t u;
            memcpy(&u, &f, 4);
            tails[r * tail + i] = (uint16_t)(u >> 16);   /* a small integer: exact in bf16 */
        }
}

static size_t widened_bytes(int K) { return sizeof(uint16_t) * ((size_t)ROW_BLOCK * K + 64); }

/* Up to ROW_BLOCK weight rows (bits: 8, 4, or 16 for bf16 weights) against up to X_ROWS rows of bf16 x.
 * Per row of y: one accumulator, 32 (int8, bf16) or 64 (int4: high nibbles, then low) columns a step,
 * then the horizontal sum, then the scalar tail. out[m * ROW_BLOCK + r]. wb: the rows already widened
 * (widen_rows_bf16), or NULL to widen them here. (X_ROWS = 3 here too: 4 or more rows of x per pass
 * measured slower on Zen 4, int4 M = 16: 24-31 ms a block against 21.) */
static inline __attribute__((always_inline)) void rows_xbf16(const uint16_t *x, size_t ldx, int mb, const int8_t *w,
                                                             size_t stride, int K, int rows, float *out, int bits,
                                                             const uint16_t *wb) {
    __m512 acc[X_ROWS][ROW_BLOCK];
    for (int m = 0; m < X_ROWS; m++)
        for (int r = 0; r < ROW_BLOCK; r++) acc[m][r] = _mm512_setzero_ps();
    const int step = bits == 4 ? 64 : 32, nvec = bits == 4 ? 2 : 1, tail = K % step;
    int k = 0;
    for (; k + step <= K; k += step) {
        __m512bh x0[X_ROWS], x1[X_ROWS];   /* loaded once for all weight rows */
        for (int m = 0; m < mb; m++) {
            x0[m] = as_bf16(_mm512_loadu_si512(x + m * ldx + k));
            if (bits == 4) x1[m] = as_bf16(_mm512_loadu_si512(x + m * ldx + k + 32));
        }
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            __m512bh w0, w1;
            if (wb) {
                const uint16_t *v = wb + ((size_t)(k / step) * ROW_BLOCK + r) * nvec * 32;
                w0 = as_bf16(_mm512_loadu_si512(v));
                if (bits == 4) w1 = as_bf16(_mm512_loadu_si512(v + 32));
            }
            else if (bits == 4) load_q4_bf16(wr + k / 2, &w0, &w1);
            else if (bits == 8) w0 = load_q8_bf16(wr + k);
            else w0 = as_bf16(_mm512_loadu_si512((const uint16_t *)wr + k));
            for (int m = 0; m < mb; m++) {
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], w0, x0[m]);
                if (bits == 4) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], w1, x1[m]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < rows; r++) {
            const int8_t *wr = w + r * stride;
            const uint16_t *xm = x + m * ldx;
            float d = _mm512_reduce_add_ps(acc[m][r]);
            for (int kk = k; kk < K; kk++) {   /* int4: the tail keeps the natural column order */
                const float wv = wb ? bf16_to_f32(wb[(size_t)(K / step) * ROW_BLOCK * nvec * 32 + r * tail + kk - k])
                               : bits == 4 ? (float)(kk % 2 ? int4_low(wr[kk / 2]) : int4_high(wr[kk / 2]))
                               : bits == 8 ? (float)wr[kk] : bf16_to_f32(((const uint16_t *)wr)[kk]);
                d += bf16_to_f32(xm[kk]) * wv;
            }
            out[m * ROW_BLOCK + r] = d;
        }
}
#endif

/* ---- GEMV / skinny GEMM: decode and batched decode ------------------------------------------- */

/* The usual shapes (a full block of weight rows against 1, 2 or X_ROWS rows of x) as calls with constant
 * trip counts: inlined, GCC unrolls them and keeps the accumulators in registers instead of on the
 * stack. The same code computes the same sums in the same order, whichever call runs. */
#define ROWS_WITH_CONSTANT_SHAPES(fn, x, ...)                                                    \
    do {                                                                                        \
        if (rows == ROW_BLOCK && mb == 1) fn(x, (size_t)K, 1, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__);     \
        else if (rows == ROW_BLOCK && mb == 2) fn(x, (size_t)K, 2, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__); \
        else if (rows == ROW_BLOCK && mb == X_ROWS)                                             \
            fn(x, (size_t)K, X_ROWS, w, row_bytes, K, ROW_BLOCK, out, __VA_ARGS__);             \
        else fn(x, (size_t)K, mb, w, row_bytes, K, rows, out, __VA_ARGS__);                    \
    } while (0)

typedef struct {
    const void *x;    /* [M, K], fp32, or bf16 with xbf16 set; for int4 rearranged (interleave_q4*) */
    int xbf16;
    int M, K, bits;   /* bits: 8 or 4 (quantized rows, times scale[n]), or 32 / 16 (fp32 / bf16 rows: the LM head) */
    const int8_t *W;
    const float *scale, *bias;
    float *y;
    int N;
} gemv_job;

/* Blocks [b0, b1) of ROW_BLOCK weight rows against every row of x. */
static void gemv_blocks(void *arg, int b0, int b1) {
    const gemv_job *job = (const gemv_job *)arg;
    const int M = job->M, K = job->K, N = job->N, bits = job->bits, KB = bits == 4 ? K / 2 : K;
    const size_t row_bytes = bits == 32 ? sizeof(float) * (size_t)K : bits == 16 ? sizeof(uint16_t) * (size_t)K
                                                                                   : (size_t)KB;
    const float *scale = job->scale, *bias = job->bias;
    float *d = (float *)malloc(sizeof(float) * (size_t)M * ROW_BLOCK);
#ifdef XBF16_DP
    /* more rows of x than one pass takes: widen each block's int8 weights once (widen_rows_bf16) */
    uint16_t *wb = job->xbf16 && bits == 8 && M > X_ROWS ? (uint16_t *)thread_scratch(widened_bytes(K)) : NULL;
#endif
    for (int blk = b0; blk < b1; blk++) {
        const int n0 = blk * ROW_BLOCK, rows = n0 + ROW_BLOCK < N ? ROW_BLOCK : N - n0;
        const int8_t *w = job->W + n0 * row_bytes;
#ifdef XBF16_DP
        if (wb) widen_rows_bf16(w, row_bytes, K, rows, bits, wb);
#endif
        for (int m0 = 0; m0 < M; m0 += X_ROWS) {
            const int mb = M - m0 < X_ROWS ? M - m0 : X_ROWS;
            float *out = d + m0 * ROW_BLOCK;
#ifdef XBF16_DP
            if (job->xbf16) {
                const uint16_t *xm = (const uint16_t *)job->x + (size_t)m0 * K;
                if (bits == 4) ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 4, wb);
                else if (bits == 8) ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 8, wb);
                else ROWS_WITH_CONSTANT_SHAPES(rows_xbf16, xm, 16, NULL);
                continue;
            }
#endif
            const float *xm = (const float *)job->x + (size_t)m0 * K;
            if (bits == 4) ROWS_WITH_CONSTANT_SHAPES(rows_q4, xm, 0);
            else if (bits == 8) ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_INT8);
            else if (bits == 16) ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_BF16);
            else ROWS_WITH_CONSTANT_SHAPES(rows_wide, xm, W_F32);
        }
        for (int m = 0; m < M; m++)
            for (int r = 0; r < rows; r++)
                job->y[(size_t)m * N + n0 + r] = d[m * ROW_BLOCK + r] * (scale ? scale[n0 + r] : 1.0f) +
                                                 (bias ? bias[n0 + r] : 0.0f);
    }
    free(d);
}

/* x is fp32, or bf16 with xbf16 set (the `*_xbf16` entry points and the bf16 head). */
static void gemv(const void *x, int xbf16, int M, int K, const int8_t *W, int bits, const float *scale,
                 const float *bias, float *y, int N, int nthreads) {
#ifndef XBF16_DP
    if (xbf16) {   /* no bf16 pair products on this build: widen x and run the fp32 loop */
        float *xf = widen_bf16((const uint16_t *)x, (size_t)M * K);
        gemv(xf, 0, M, K, W, bits, scale, bias, y, N, nthreads);
        free(xf);
        return;
    }
#endif
    void *xi = NULL;
    if (bits == 4) {   /* rearrange each x row once: see interleave_q4 */
        const size_t row = (size_t)K * (xbf16 ? sizeof(uint16_t) : sizeof(float));
        xi = malloc(row * M);
        for (int m = 0; m < M; m++) {
#ifdef XBF16_DP
            if (xbf16) {
                interleave_q4_bf16((const uint16_t *)x + (size_t)m * K, K, (uint16_t *)xi + (size_t)m * K);
                continue;
            }
#endif
            interleave_q4((const float *)x + (size_t)m * K, K, (float *)xi + (size_t)m * K);
        }
    }
    gemv_job job = {xi ? xi : x, xbf16, M, K, bits, W, scale, bias, y, N};
    parallel_for((N + ROW_BLOCK - 1) / ROW_BLOCK, nthreads, gemv_blocks, &job);
    free(xi);
}

void q8_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, 0, M, K, W, 8, scale, bias, y, N, nthreads);
}

void q4_gemv(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
             float *y, int N, int nthreads) {
    gemv(x, 0, M, K, W, 4, scale, bias, y, N, nthreads);
}

/* fp32 weights: the LM head of a batched decode step, so that a row's logits do not depend on the
 * other rows either (MKL's sgemm sums in an order that changes with the number of rows). */
void f32_gemv(const float *x, int M, int K, const float *W, const float *bias, float *y, int N, int nthreads) {
    gemv(x, 0, M, K, (const int8_t *)W, 32, NULL, bias, y, N, nthreads);
}

void q8_gemv_xbf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                   float *y, int N, int nthreads) {
    gemv(x, 1, M, K, W, 8, scale, bias, y, N, nthreads);
}

void q4_gemv_xbf16(const uint16_t *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                   float *y, int N, int nthreads) {
    gemv(x, 1, M, K, W, 4, scale, bias, y, N, nthreads);
}

/* bf16 weights and x (a bf16 model's LM head), fp32 logits: half the bytes of f32_gemv, and no bf16
 * rounding of the logits (two candidates 1 ulp apart in bf16 would tie, and which won would depend
 * on summation order). */
void bf16_gemv(const uint16_t *x, int M, int K, const uint16_t *W, const float *bias, float *y, int N, int nthreads) {
    gemv(x, 1, M, K, (const int8_t *)W, 16, NULL, bias, y, N, nthreads);
}

/* ---- int8 activations: integer dot products ------------------------------------------------- */
/*
 * The kernels above widen every weight to fp32 and multiply-add 8 (AVX2) at a time. Here x is quantized
 * too, the way ggml's q8_0 does it: each block of QK columns of a row of x gets one scale
 *
 *   d[m, b] = max_k |x[m, k]| / 127,   xq[m, k] = round(x[m, k] / d[m, b])   (k in block b, |xq| <= 127)
 *
 * and the products are summed exactly in integers, block by block, before one multiply by the scales:
 *
 *   y[m, n] = scale[n] * sum_b d[m, b] * isum[m, n, b] + bias[n],   isum = sum_{k in b} xq[m, k] * Q[n, k]
 *
 * On AVX2 `vpmaddubsw` does 32 byte products per instruction (4x an fp32 FMA), so int4 decode is no
 * longer bound by widening nibbles to floats and batched rows cost less multiply work. The price is
 * the rounding of x to 8 bits (about 0.5% relative error on a layer's output): results are close to,
 * not equal to, the exact kernels above, so this path is a separate choice (`int8_activations`).
 * Each row of y is still computed the same way whatever the other rows are: batching never changes it.
 *
 * vpmaddubsw multiplies UNSIGNED bytes by signed ones, summing pairs into int16:
 * - int4: the weight nibble n in [-8, 7] is taken as u = n + 8 in [0, 15] and the excess is taken back
 *   in integers: sum u * xq - 8 * sum xq. The second sum depends on x alone, so it is computed once per
 *   block of x (`minus8`, per int32 lane of the block sums) and not once per weight row.
 * - int8: |w| times xq with w's sign (`vpsignb`), as ggml does; |w| <= 128 and |xq| <= 127 keep every
 *   pair sum inside int16.
 * For int4 each block of xq is stored as its QK/2 even columns, then its QK/2 odd ones: the order in
 * which the high and low nibbles of QK/2 weight bytes come out. A last block shorter than QK (K not a
 * multiple of QK) keeps the natural order and is summed by the scalar code.
 *
 * On AVX2 the lanes of a vector hold columns: one weight row's products against one row of x, and each
 * block's lane sums are converted and scaled before the next block (two more instructions per block and
 * pair of rows, as many as the products themselves). The AVX-512 builds without VNNI run this code.
 *
 * AVX512-VNNI (see "int8 activations on AVX512-VNNI" below) turns it around: the lanes hold 16 weight
 * rows and one instruction (`vpdpbusd`) adds 4 columns' products of each, so a block's 64 columns are
 * 16 instructions per 16 rows before its one conversion and scaling. Its float sums run block by block
 * in the reference's order: it gives the scalar reference's bits.
 */
#define QK 64
#define LANES 8   /* int32 sums per block in the SIMD kernels: lane j covers bytes 4j..4j+3 of each half */

/* The order in which a full block of xq stores its QK columns: the order the kernel consumes them. */
enum x8_order {
    X8_NATURAL,   /* int8 weights (and the scalar reference's int4) */
    X8_HALVES,    /* int4 on AVX2: the QK/2 even columns, then the QK/2 odd ones */
    X8_OCTETS,    /* int4 on AVX512-VNNI: in each 8 columns, the 4 even ones, then the 4 odd ones */
};

typedef struct {
    int M, K, nb;      /* nb = ceil(K / QK) blocks per row */
    int8_t *q;         /* [M, K] */
    float *d;          /* [M, nb] */
    int32_t *bsum;     /* [M, nb]: the sum of q over each block */
    int32_t *minus8;   /* [M, nb, LANES], X8_HALVES only: -8 * sum of q over each lane of a full block */
} x8_t;

/* v in [-127, 127] to the nearest integer, ties to even (adding and subtracting 1.5 * 2^23 leaves no
 * fraction bits; no libm call, the same on every build). NaN becomes 0. */
static inline int8_t round_to_int8(float v) {
    const float r = (v + 12582912.0f) - 12582912.0f;
    return r == r ? (int8_t)r : 0;
}

/* Where slot i of a block of `len` columns comes from (a short last block keeps the natural order). */
static inline int block_column(enum x8_order order, int len, int i) {
    if (len < QK || order == X8_NATURAL) return i;
    if (order == X8_HALVES) return i < QK / 2 ? 2 * i : 2 * (i - QK / 2) + 1;
    return (i & ~7) + (i % 8 < 4 ? 2 * (i % 8) : 2 * (i % 8 - 4) + 1);   /* X8_OCTETS */
}

/* Plain C for every instruction set (x is M x K, the weights N x K: this is not where the time goes),
 * so all builds quantize x identically. */
static void quantize_x8_row(const float *x, int K, enum x8_order order, int8_t *q, float *d, int32_t *bsum,
                            int32_t *minus8) {
    for (int k0 = 0, b = 0; k0 < K; k0 += QK, b++) {
        const int len = K - k0 < QK ? K - k0 : QK;
        float amax = 0.0f;
        int nan = 0;
        for (int i = 0; i < len; i++) {
            const float a = x[k0 + i] < 0 ? -x[k0 + i] : x[k0 + i];
            amax = a > amax ? a : amax;
            nan |= a != a;
        }
        const float inv = amax > 0 ? 127.0f / amax : 0.0f;
        /* A NaN in x must reach y, as in the exact kernels, not vanish into a rounded 0. */
        d[b] = nan ? NAN : amax / 127.0f;
        bsum[b] = 0;
        for (int i = 0; i < len; i++) {
            q[k0 + i] = round_to_int8(x[k0 + block_column(order, len, i)] * inv);
            bsum[b] += q[k0 + i];
        }
        for (int j = 0; j < LANES && order == X8_HALVES; j++) {
            int32_t sum = 0;
            for (int i = 4 * j; i < 4 * j + 4 && len == QK; i++) sum += q[k0 + i] + q[k0 + QK / 2 + i];
            minus8[b * LANES + j] = -8 * sum;
        }
    }
}

static x8_t quantize_x8(const float *x, int M, int K, enum x8_order order) {
    x8_t xq = {M, K, (K + QK - 1) / QK, NULL, NULL, NULL, NULL};
    xq.q = (int8_t *)malloc((size_t)M * K);
    xq.d = (float *)malloc(sizeof(float) * (size_t)M * xq.nb);
    xq.bsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * xq.nb);
    xq.minus8 = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * xq.nb * LANES);
    for (int m = 0; m < M; m++)
        quantize_x8_row(x + (size_t)m * K, K, order, xq.q + (size_t)m * K, xq.d + (size_t)m * xq.nb,
                        xq.bsum + (size_t)m * xq.nb, xq.minus8 + (size_t)m * xq.nb * LANES);
    return xq;
}

static void free_x8(x8_t *xq) {
    free(xq->q);
    free(xq->d);
    free(xq->bsum);
    free(xq->minus8);
}

/* The weight of row w at slot i of the block starting at column k0 (in the order xq stores it). */
static inline int weight_at(const int8_t *w, int bits, enum x8_order order, int k0, int len, int i) {
    const int col = k0 + block_column(order, len, i);
    if (bits == 8) return w[col];
    return col % 2 ? int4_low(w[col / 2]) : int4_high(w[col / 2]);
}

/* isum of one block, exactly. */
static inline int32_t block_isum(const int8_t *q, const int8_t *w, int bits, enum x8_order order, int k0, int len) {
    int32_t s = 0;
    for (int i = 0; i < len; i++) s += (int32_t)q[k0 + i] * weight_at(w, bits, order, k0, len, i);
    return s;
}

/* Scalar reference: quantize, then sum the blocks in order. */
static void gemv_x8_ref(const float *x, int M, int K, const int8_t *W, int bits, const float *scale,
                        const float *bias, float *y, int N) {
    const int KB = bits == 4 ? K / 2 : K;
    x8_t xq = quantize_x8(x, M, K, X8_NATURAL);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int b = 0; b < xq.nb; b++) {
                const int k0 = b * QK, len = K - k0 < QK ? K - k0 : QK;
                acc = fmaf(xq.d[(size_t)m * xq.nb + b],
                           (float)block_isum(xq.q + (size_t)m * K, W + (size_t)n * KB, bits, X8_NATURAL, k0, len), acc);
            }
            y[(size_t)m * N + n] = acc * scale[n] + (bias ? bias[n] : 0.0f);
        }
    free_x8(&xq);
}

void q8_gemv_x8_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                    float *y, int N) {
    gemv_x8_ref(x, M, K, W, 8, scale, bias, y, N);
}

void q4_gemv_x8_ref(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                    float *y, int N) {
    gemv_x8_ref(x, M, K, W, 4, scale, bias, y, N);
}

typedef struct {
    const x8_t *xq;
    int p0, p1, bits;   /* rows [p0, p1) of xq */
    int lanes;          /* W's full strips are in the lane layout (x8_pack_weights), AVX512-VNNI only */
    const int8_t *W;
    const float *scale, *bias;
    float *y;
    int N;
} x8_job;

#define X8_PANEL_BYTES (256 << 10)

#ifndef X8_VNNI
/* A register tile: X8_WROWS weight rows against up to X8_ROWS rows of xq. For each block of columns,
 * the weight rows are loaded (int4: also unpacked) once and each row of xq once: every product pair
 * shares both loads. Registers (AVX2: 16): X8_ROWS x X8_WROWS accumulators, the weight blocks (2 per
 * weight row), one block of xq and the products in flight. */
#define X8_ROWS 3
#define X8_WROWS 2

#if defined(__AVX2__)
static inline float vhsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One block's exact integer sums in LANES int32 lanes (lane j: bytes 4j..4j+3 of both halves), from the
 * two halves of the block's unsigned weight bytes (u0, u1) and signed xq bytes (x0, x1), started at
 * `init`. int4: u = nibble + 8 and init = minus8; int8: u = |w|, x carries w's sign and init = 0. */
static inline __m256i block_sums(__m256i u0, __m256i u1, __m256i x0, __m256i x1, __m256i init, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 4)   /* the two halves' int16 pair sums can be added first: each <= 2 * 2 * 15 * 127 */
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, x0),
                                                                   _mm256_maddubs_epi16(u1, x1)), ones), init);
    /* int8 pair sums reach 2 * 128 * 127: widen each half to int32 before adding */
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x1), ones));
}
#endif

static inline __attribute__((always_inline)) void tile_x8(const x8_t *xq, int m0, int mb, const int8_t *w, size_t stride,
                                                          int nr, int bits, float *out /* [mb][X8_WROWS] */) {
    const int K = xq->K, nb = xq->nb, full = K / QK;
    const int8_t *q = xq->q + (size_t)m0 * K;
    const float *d = xq->d + (size_t)m0 * nb;
    float sum[X8_ROWS][X8_WROWS] = {{0}};
#if defined(__AVX2__)
    const int32_t *minus8 = xq->minus8 + (size_t)m0 * nb * LANES;
    __m256 acc[X8_ROWS][X8_WROWS];
    for (int m = 0; m < X8_ROWS; m++)
        for (int r = 0; r < X8_WROWS; r++) acc[m][r] = _mm256_setzero_ps();
    for (int b = 0; b < full; b++) {
        const int k0 = b * QK;
        /* The block's two halves of weights, in xq's order: signed (int8, for the signs) and unsigned. */
        __m256i w0[X8_WROWS], w1[X8_WROWS], u0[X8_WROWS], u1[X8_WROWS];
        for (int r = 0; r < nr; r++) {
            if (bits == 8) {
                w0[r] = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0));
                w1[r] = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0 + 32));
                u0[r] = _mm256_abs_epi8(w0[r]);
                u1[r] = _mm256_abs_epi8(w1[r]);
            } else {   /* 32 bytes: high nibbles (even columns), low nibbles (odd columns), each + 8 */
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + r * stride + k0 / 2));
                const __m256i nib = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
                u0[r] = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib), eight);
                u1[r] = _mm256_xor_si256(_mm256_and_si256(bytes, nib), eight);
            }
        }
        for (int m = 0; m < mb; m++) {
            const int8_t *xb = q + (size_t)m * K + k0;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb), x1 = _mm256_loadu_si256((const __m256i *)(xb + 32));
            const __m256 dm = _mm256_broadcast_ss(d + (size_t)m * nb + b);
            const __m256i init = bits == 4 ? _mm256_loadu_si256((const __m256i *)(minus8 + ((size_t)m * nb + b) * LANES))
                                           : _mm256_setzero_si256();
            for (int r = 0; r < nr; r++) {
                const __m256i s = bits == 4 ? block_sums(u0[r], u1[r], x0, x1, init, 4)
                                            : block_sums(u0[r], u1[r], _mm256_sign_epi8(x0, w0[r]),
                                                         _mm256_sign_epi8(x1, w1[r]), init, 8);
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dm, acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) sum[m][r] = vhsum8(acc[m][r]);
#else
    for (int b = 0; b < full; b++)
        for (int m = 0; m < mb; m++)
            for (int r = 0; r < nr; r++)
                sum[m][r] = fmaf(d[(size_t)m * nb + b], (float)block_isum(q + (size_t)m * K, w + r * stride, bits,
                                                                          bits == 4 ? X8_HALVES : X8_NATURAL, b * QK, QK),
                                 sum[m][r]);
#endif
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < nr; r++) {
            if (full < nb)   /* the short last block */
                sum[m][r] = fmaf(d[(size_t)m * nb + full],
                                 (float)block_isum(q + (size_t)m * K, w + r * stride, bits, X8_NATURAL, full * QK, K - full * QK),
                                 sum[m][r]);
            out[m * X8_WROWS + r] = sum[m][r];
        }
}

/* Tiles [t0, t1) of X8_WROWS weight rows against rows [p0, p1) of xq. */
static void tiles_x8(void *arg, int t0, int t1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int p0 = job->p0, p1 = job->p1, N = job->N, KB = job->bits == 4 ? xq->K / 2 : xq->K;
    const float *scale = job->scale, *bias = job->bias;
    for (int t = t0; t < t1; t++) {
        const int n0 = t * X8_WROWS, nr = N - n0 < X8_WROWS ? N - n0 : X8_WROWS;
        const int8_t *w = job->W + (size_t)n0 * KB;
        float out[X8_ROWS * X8_WROWS];
        for (int m0 = p0; m0 < p1; m0 += X8_ROWS) {
            const int mb = p1 - m0 < X8_ROWS ? p1 - m0 : X8_ROWS;
            /* Constant shapes for the usual cases (as ROWS_WITH_CONSTANT_SHAPES above). One row of x
             * (decode) takes the weight rows one at a time: a single stream is bound by memory, and
             * one weight row leaves the compiler more registers. */
#define X8_SHAPES(B)                                                                          \
            if (nr == X8_WROWS && mb == 1) {                                                  \
                tile_x8(xq, m0, 1, w, KB, 1, B, out);                                         \
                tile_x8(xq, m0, 1, w + KB, KB, 1, B, out + 1);                                \
            } else if (nr == X8_WROWS && mb == 2) tile_x8(xq, m0, 2, w, KB, X8_WROWS, B, out); \
            else if (nr == X8_WROWS && mb == 3) tile_x8(xq, m0, 3, w, KB, X8_WROWS, B, out);  \
            else tile_x8(xq, m0, mb, w, KB, nr, B, out);
            if (job->bits == 8) { X8_SHAPES(8) } else { X8_SHAPES(4) }
#undef X8_SHAPES
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < nr; r++)
                    job->y[(size_t)(m0 + m) * N + n0 + r] = out[m * X8_WROWS + r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

#define X8_ORDER(bits) ((bits) == 4 ? X8_HALVES : X8_NATURAL)
#define X8_TILE_ROWS(bits) X8_WROWS   /* weight rows per work item */
#define X8_TILE_XROWS(bits) X8_ROWS   /* rows of x per pass */
#define X8_TILES tiles_x8
#else  /* X8_VNNI */

/* ---- int8 activations on AVX512-VNNI ---------------------------------------------------------- */
/*
 * `vpdpbusd` adds to each of 16 int32 lanes the products of 4 unsigned bytes of one operand with 4 signed
 * bytes of the other. Here lane i is weight row n0 + i and the signed bytes are 4 columns of one row of
 * xq, the same in every lane: one instruction is 4 columns of 16 weight rows, and no lane ever needs a
 * horizontal sum. A block's 64 columns are 16 instructions per 16 rows (2 x 8 for int4), then one
 * conversion and one fused multiply-add: acc = fma(d[m, b], isum, acc), block after block, as the scalar
 * reference sums (these builds give the reference's bits).
 *
 * The weights are the unsigned side: u = nibble + 8 (int4) or w + 128 (int8), both one XOR of the sign
 * bit, and each block's sums start at -8 (or -128) times the block's sum of xq (bsum) to take the
 * excess back, exactly.
 *
 * Lanes want group c (4 bytes along k) of 16 rows side by side, where W stores each row's groups in
 * sequence. A model loaded with int8 activations has its weights rearranged so once (the lane layout,
 * x8_relayout_weights), with the sign bits already flipped: each strip of 16 G rows (below) is read as it is,
 * one sequential stream, and goes straight into the products. Weights in the hub's layout (and a model's
 * last strip of fewer rows) are transposed per call, 16 x 16 groups at a time in registers, into a buffer
 * that stays in L1/L2 while every row of x passes it; that costs about as much as reading them (int4:
 * 4 ms a block). For int4 a group is 8 columns, the high nibbles the even ones and the low nibbles the
 * odd ones, so xq stores each 8 columns as 4 even, then 4 odd (X8_OCTETS). A last block shorter than QK
 * is summed by the scalar code.
 *
 * Where the time goes (Zen 4, one 512-bit vpdpbusd per cycle and core): besides the products, each
 * int4 weight vector is split into its nibbles (3 instructions) and each 4 columns of a row of x are
 * broadcast to all lanes (1 instruction, about as costly as a product). A pass takes R rows of x against
 * G vectors of 16 weight rows (a strip of 16 G rows), so a broadcast feeds G products and a split vector
 * 2 R. Of the shapes that fit the 32 registers (R x G int32 and float accumulators), the fastest, in
 * runs taken in turns (2 threads, ChatGLM2's 27392 x 4096):
 * - int4: G = 4, R = 3. Against G = 2, R = 5: 8 rows of x 3.0 against 4.3 ms, 16 rows 6.3 against 7.1,
 *   one row 1.56 against 1.77. (G = 1, R = 8 was slower than both: one broadcast per product.)
 * - int8 (no nibbles to split): G = 2, R = 5. G = 4, R = 3 took 5.6 against 4.5 ms at 8 rows and 4.3
 *   against 3.7 at one.
 * Software prefetches (of the strip ahead, or of the next strip during a strip's later passes) made int4
 * slower or no faster at 1, 8 and 16 rows; int8 was not tried.
 */
static inline int vnni_groups(int bits) { return bits == 4 ? 4 : 2; }   /* G: vectors of 16 weight rows per strip */
static inline int vnni_rows(int bits) { return bits == 4 ? 3 : 5; }     /* R: rows of x per pass */
#define VNNI_MAX_G 4
#define VNNI_MAX_R 5

/* The sign bit of every weight in a 4-byte group: 0x88888888 (two nibbles a byte) or 0x80808080. */
static inline int32_t sign_bits(int bits) { return bits == 4 ? (int32_t)0x88888888u : (int32_t)0x80808080u; }

/* Groups [0, groups) of `rows` weight rows (row_bytes apart) of a strip of 16 G, lanes side by side, XOR
 * `flip`: out[(c * G + g) * 16 + i] = (group c of row 16 g + i) ^ flip. Lanes past `rows` hold flip
 * (their sums are never used). The same XOR again gives the weights back. */
static void pack_strip(const int8_t *W, size_t row_bytes, int rows, int groups, int G, int32_t flip, int32_t *out) {
    const __m512i f = _mm512_set1_epi32(flip);
    for (int g = 0; g < G; g++) {
        int c = 0;
        for (; c + 16 <= groups; c += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = 16 * g + i < rows ? _mm512_loadu_si512(W + (16 * g + i) * row_bytes + 4 * (size_t)c)
                                         : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++)
                _mm512_storeu_si512(out + ((size_t)(c + i) * G + g) * 16, _mm512_xor_si512(r[i], f));
        }
        for (; c < groups; c++)
            for (int i = 0; i < 16; i++) {
                int32_t v = 0;
                if (16 * g + i < rows) memcpy(&v, W + (16 * g + i) * row_bytes + 4 * (size_t)c, 4);
                out[((size_t)c * G + g) * 16 + i] = v ^ flip;
            }
    }
}

/* The full blocks of rows [m0, m0 + mb) of xq against a packed strip: out[m * 16 G + n]. bits and mb are
 * constants where this is inlined, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void strip_x8(const int32_t *packed, const x8_t *xq, int m0, int mb,
                                                           int bits, float *out) {
    const int K = xq->K, nb = xq->nb, full = K / QK, per_block = bits == 4 ? QK / 8 : QK / 4;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int excess = bits == 4 ? -8 : -128, G = vnni_groups(bits);
    __m512 accf[VNNI_MAX_R][VNNI_MAX_G];
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) accf[m][g] = _mm512_setzero_ps();
    for (int b = 0; b < full; b++) {
        const int32_t *wb = packed + (size_t)b * per_block * 16 * G;
        const int8_t *xb = xq->q + (size_t)m0 * K + (size_t)b * QK;
        __m512i acc[VNNI_MAX_R][VNNI_MAX_G];
        for (int m = 0; m < mb; m++)
            for (int g = 0; g < G; g++) acc[m][g] = _mm512_set1_epi32(excess * xq->bsum[(size_t)(m0 + m) * nb + b]);
        for (int c = 0; c < per_block; c++) {
            __m512i x0[VNNI_MAX_R], x1[VNNI_MAX_R];
            for (int m = 0; m < mb; m++) {
                const int8_t *xc = xb + (size_t)m * K + 4 * (bits == 4 ? 2 * c : c);
                int32_t v;
                memcpy(&v, xc, 4);
                x0[m] = _mm512_set1_epi32(v);
                if (bits == 4) {
                    memcpy(&v, xc + 4, 4);
                    x1[m] = _mm512_set1_epi32(v);
                }
            }
            for (int g = 0; g < G; g++) {
                const __m512i u = _mm512_loadu_si512(wb + (c * G + g) * 16);
                if (bits == 4) {   /* high nibbles: the 4 even columns; low nibbles: the 4 odd ones */
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(u, 4), low4), lo = _mm512_and_si512(u, low4);
                    for (int m = 0; m < mb; m++)
                        acc[m][g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][g], hi, x0[m]), lo, x1[m]);
                } else {
                    for (int m = 0; m < mb; m++) acc[m][g] = _mm512_dpbusd_epi32(acc[m][g], u, x0[m]);
                }
            }
        }
        for (int m = 0; m < mb; m++) {
            const __m512 dm = _mm512_set1_ps(xq->d[(size_t)(m0 + m) * nb + b]);
            for (int g = 0; g < G; g++) accf[m][g] = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(acc[m][g]), accf[m][g]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int g = 0; g < G; g++) _mm512_storeu_ps(out + (m * G + g) * 16, accf[m][g]);
}

/* One pass with bits and mb constants (mb: 1 to vnni_rows(bits)). */
static void strip_pass(const int32_t *packed, const x8_t *xq, int m0, int mb, int bits, float *out) {
#define PASS(n, B) case n: strip_x8(packed, xq, m0, n, B, out); break;
    if (bits == 4) switch (mb) { PASS(1, 4) PASS(2, 4) PASS(3, 4) }
    else switch (mb) { PASS(1, 8) PASS(2, 8) PASS(3, 8) PASS(4, 8) PASS(5, 8) }
#undef PASS
}

/* 4-byte groups in a row's full blocks. */
static inline int full_groups(int K, int bits) { return K / QK * (bits == 4 ? QK / 8 : QK / 4); }

/*
 * The lane layout: each full strip of 16 G rows holds, in its own bytes, its groups as pack_strip
 * writes them, then each row's short last block (as in the hub layout). A last strip of fewer rows keeps
 * the hub's row layout (it is transposed per call). to_lanes = 0 restores the hub layout.
 * -> 0, or -1 on builds without this kernel (the weights keep the hub layout there).
 */
typedef struct {
    int8_t *W;
    int K, bits, to_lanes;
} relayout_job;

static void relayout_strips(void *arg, int s0, int s1) {
    const relayout_job *job = (const relayout_job *)arg;
    const int groups = full_groups(job->K, job->bits);
    const int32_t flip = sign_bits(job->bits);
    const size_t KB = job->bits == 4 ? (size_t)job->K / 2 : (size_t)job->K, full_bytes = 4 * (size_t)groups;
    const int G = vnni_groups(job->bits), strip_rows = 16 * G;
    const size_t tail = KB - full_bytes, strip_bytes = KB * strip_rows;
    int8_t *copy = (int8_t *)malloc(strip_bytes);
    for (int s = s0; s < s1; s++) {
        int8_t *strip = job->W + (size_t)s * strip_bytes;
        memcpy(copy, strip, strip_bytes);
        if (job->to_lanes) {
            pack_strip(copy, KB, strip_rows, groups, G, flip, (int32_t *)strip);
            for (int r = 0; r < strip_rows; r++) memcpy(strip + full_bytes * strip_rows + r * tail, copy + r * KB + full_bytes, tail);
        } else {
            const int32_t *packed = (const int32_t *)copy;
            for (int r = 0; r < strip_rows; r++) {
                for (int c = 0; c < groups; c++) {
                    const int32_t v = packed[((size_t)c * G + r / 16) * 16 + r % 16] ^ flip;
                    memcpy(strip + r * KB + 4 * (size_t)c, &v, 4);
                }
                memcpy(strip + r * KB + full_bytes, copy + full_bytes * strip_rows + r * tail, tail);
            }
        }
    }
    free(copy);
}

int x8_relayout_weights(int8_t *W, int N, int K, int bits, int to_lanes, int nthreads) {
    relayout_job job = {W, K, bits, to_lanes};
    parallel_for(N / (16 * vnni_groups(bits)), nthreads, relayout_strips, &job);
    return 0;
}

/* Strips [s0, s1) of 16 G weight rows against rows [p0, p1) of xq. */
static void strips_x8(void *arg, int s0, int s1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int K = xq->K, nb = xq->nb, full = K / QK, bits = job->bits, N = job->N, groups = full_groups(K, bits);
    const size_t KB = bits == 4 ? (size_t)K / 2 : (size_t)K, full_bytes = 4 * (size_t)groups, tail = KB - full_bytes;
    const int G = vnni_groups(bits), strip_rows = 16 * G, R = vnni_rows(bits);
    int32_t *scratch = (int32_t *)thread_scratch(sizeof(int32_t) * ((size_t)groups * strip_rows + 1));
    float out[VNNI_MAX_R * 16 * VNNI_MAX_G];
    for (int s = s0; s < s1; s++) {
        const int n0 = s * strip_rows, rows = N - n0 < strip_rows ? N - n0 : strip_rows;
        const int8_t *w = job->W + (size_t)n0 * KB;
        const int ready = job->lanes && rows == strip_rows;   /* a full strip already in the lane layout */
        const int32_t *packed = ready ? (const int32_t *)w : scratch;
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
                    job->y[(size_t)(m0 + m) * N + n0 + r] = sum * job->scale[n0 + r] + (job->bias ? job->bias[n0 + r] : 0.0f);
                }
        }
    }
}

#define X8_LANES 1
#define X8_ORDER(bits) ((bits) == 4 ? X8_OCTETS : X8_NATURAL)
#define X8_TILE_ROWS(bits) (16 * vnni_groups(bits))
#define X8_TILE_XROWS(bits) vnni_rows(bits)
#define X8_TILES strips_x8
#endif  /* X8_VNNI */

#ifndef X8_LANES
int x8_relayout_weights(int8_t *W, int N, int K, int bits, int to_lanes, int nthreads) {
    (void)W, (void)N, (void)K, (void)bits, (void)to_lanes, (void)nthreads;
    return -1;
}
#endif

static void gemv_x8(const float *x, int M, int K, const int8_t *W, int bits, int lanes, const float *scale,
                    const float *bias, float *y, int N, int nthreads) {
    x8_t xq = quantize_x8(x, M, K, X8_ORDER(bits));
    /* Rows of x in panels that stay in L2 while every weight row passes them (a long prompt would
     * otherwise bring all of x from L3 for each work item). The weights are read once per panel; a
     * decode batch is one panel. */
    const int pass = X8_TILE_XROWS(bits), tile = X8_TILE_ROWS(bits);
    int panel = X8_PANEL_BYTES / K / pass * pass;
    panel = panel < pass ? pass : panel;
    for (int p0 = 0; p0 < M; p0 += panel) {
        x8_job job = {&xq, p0, p0 + panel < M ? p0 + panel : M, bits, lanes, W, scale, bias, y, N};
        parallel_for((N + tile - 1) / tile, nthreads, X8_TILES, &job);
    }
    free_x8(&xq);
}

void q8_gemv_x8(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 8, 0, scale, bias, y, N, nthreads);
}

void q4_gemv_x8(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 4, 0, scale, bias, y, N, nthreads);
}

/* W in the lane layout (x8_relayout_weights). */
void q8_gemv_x8_lanes(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                      float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 8, 1, scale, bias, y, N, nthreads);
}

void q4_gemv_x8_lanes(const float *x, int M, int K, const int8_t *W, const float *scale, const float *bias,
                      float *y, int N, int nthreads) {
    gemv_x8(x, M, K, W, 4, 1, scale, bias, y, N, nthreads);
}

/* ---- dequantised row tiles: the prefill path ------------------------------------------------- */
/* Rows [n0, n1) of W into `out` ([n1-n0, K]), as fp32 or bf16 (round to nearest even), times scale[n];
 * with scale NULL, the integer values themselves (exact in both). linear.py passes NULL for fp32 and
 * bf16 models and multiplies the matmul's output by the scales, as the kernels above do: a prompt's
 * rows and a decode step's multiply x by the same numbers, whichever path they take. */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

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
 * `attend_f32_ref` / `attend_bf16_ref` are the definition, one loop per formula; the tests compare
 * every instruction-set build with them.
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

static int attend_paged_ref(paged_job *job, int bf16) {
    if (!paged_shapes_ok(job)) return 0;
    const int H = job->H, d = job->d, per_group = H / job->G;
    int most = 1;
    for (int p = 0; p < job->nparts; p++) most = job->keys[p] > most ? job->keys[p] : most;
    float *score = (float *)malloc(sizeof(float) * most), *o = (float *)malloc(sizeof(float) * d);
    if (!score || !o) {   /* -> 0: not computed (out of memory) */
        free(score);
        free(o);
        return 0;
    }
    for (int p = 0; p < job->nparts; p++)
        for (int r = job->rows[p]; r < job->rows[p + 1]; r++) {
            const int n = visible_keys(job, p, r);
            for (int h = 0; h < H; h++) {
                const int g = h / per_group;
                const size_t qh = (size_t)r * job->ldq + (size_t)h * d;
                float max = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {
                    const size_t kj = key_offset(job, p, j, g);
                    float acc = 0.0f;
                    for (int c = 0; c < d; c++) acc += element(job->q, qh + c, bf16) * element(job->k, kj + c, bf16);
                    score[j] = acc * job->scale;
                    max = score[j] > max ? score[j] : max;
                }
                for (int c = 0; c < d; c++) o[c] = 0.0f;
                for (int j = 0; j < n; j++) {
                    const size_t vj = key_offset(job, p, j, g);
                    const float e = bf16 ? bf16_to_f32(to_bf16(expf(score[j] - max))) : expf(score[j] - max);
                    sum += e;
                    for (int c = 0; c < d; c++) o[c] += e * element(job->v, vj + c, bf16);
                }
                const size_t out = ((size_t)r * H + h) * d;
                for (int c = 0; c < d; c++) {
                    if (bf16) ((uint16_t *)job->out)[out + c] = to_bf16(o[c] / sum);
                    else ((float *)job->out)[out + c] = o[c] / sum;
                }
            }
        }
    free(score);
    free(o);
    return 1;
}

#define PAGED_ARGS const void *q, long ldq, int nparts, const int *rows, const int *keys, const int *min_keys, \
    const int32_t *slots, const long *key_start, const void *k, const void *v, long ld_slot, int H, int G, int d, \
    float scale, void *out
#define PAGED_JOB {q, ldq, nparts, rows, keys, min_keys, slots, key_start, k, v, ld_slot, H, G, d, scale, out, 0, 0}

int attend_f32_ref(PAGED_ARGS) {
    paged_job job = PAGED_JOB;
    return attend_paged_ref(&job, 0);
}

int attend_bf16_ref(PAGED_ARGS) {
    paged_job job = PAGED_JOB;
    return attend_paged_ref(&job, 1);
}

/* -- on the vector type of this build (vf: 16, 8 or 1 lanes) ---------------------------------------- */
/* fp32, and bf16 on builds without bf16 dot products (widened to fp32 as they are read; p and the output
 * rounded to bf16 as the definition says). */
#if VW == 16
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
#elif VW == 8
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vhmax(vf x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#else
static inline vf vset1(float x) { return x; }
static inline void vstore(float *p, vf x) { *p = x; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline float vhmax(vf x) { return x; }
#endif

/* exp(x) for the softmax (x <= 0): 2^(x log2 e) = 2^n 2^f, n an integer and |f| <= 1/2, 2^f by a degree-6
 * polynomial (relative error ~2e-7). NaN stays NaN (max returns its second operand when one is NaN). */
static inline vf vexp(vf x) {
#if VW == 1
    return expf(x);
#else
    const vf t = vmul(vmax(vset1(-87.0f), x), vset1(1.44269504088896341f));
#if VW == 16
    const vf n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm512_sub_ps(t, n);
#else
    const vf n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm256_sub_ps(t, n);
#endif
    vf p = vset1(1.535336188319500e-4f);
    p = vfma(p, f, vset1(1.339887440266574e-3f));
    p = vfma(p, f, vset1(9.618437357674640e-3f));
    p = vfma(p, f, vset1(5.550332471162809e-2f));
    p = vfma(p, f, vset1(2.402264791363012e-1f));
    p = vfma(p, f, vset1(6.931472028550421e-1f));
    p = vfma(p, f, vset1(1.0f));
#if VW == 16
    return _mm512_scalef_ps(p, n);
#else   /* times 2^n, built in the exponent bits (n >= -126 after the clamp) */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#endif
#endif
}

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
#else
            transpose8(r);
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

/* -- bf16 with bf16 dot products (AVX512-BF16) ----------------------------------------------------- */
#ifdef XBF16_DP
/*
 * The same items, with bf16 pair products (`vdpbf16ps`): the scores of a query's H/G heads are a small GEMM
 * (ATT_HEADS heads x ATT_BLOCKS blocks of 16 keys per pass, K packed so that one vector holds one pair of
 * dims of 16 keys), then the softmax row by row, then P V (ATT_PV_HEADS heads x 128 dims per pass, V packed
 * so that one vector holds 16 dims of a pair of keys). K and V are packed from the pool once per part and
 * group, for all of its queries. (torch's bf16 SDPA took 12-15 ms per layer for a 40-token chunk over 2,040
 * cached positions, a fifth of what `vdpbf16ps` does.)
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

/* exp(x) on 16 lanes, as vexp above (kept apart: a build with AVX512-BF16 has VW 16 anyway). */
static inline __m512 exp_ps(__m512 x) { return vexp(x); }

/* Block b of 16 keys of group g, K and V, into their packed layouts; keys past the part's keys become
 * zeros. With d a multiple of 32 in vectors: K by 16 x 16 transposes of dim pairs (transpose16, above), V by
 * interleaving two keys' rows. (Scalar loops took 60% of a decode step's attention.) */
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
 * the vector kernel above on bf16 widened to fp32. */
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
