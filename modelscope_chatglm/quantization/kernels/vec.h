/*
 * The vector abstraction of the CPU kernels: vf holds VW floats of the instruction set this build targets,
 * and the kernels of gemv_fp32.c and attention.c are written once on its operations, for AVX-512, AVX2,
 * Arm NEON and the scalar code alike. Also exp for the softmax and SiLU (vexp, and exp_poly, its scalar
 * twin), and the register transposes
 * (transpose16, transpose8, transpose4) with which the x86 int8-activation strips and the attention kernels
 * pack their operands.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#ifndef QUANT_KERNELS_VEC_H
#define QUANT_KERNELS_VEC_H

/* ---- one vector type for every instruction set ------------------------------------------------ */
/* vf holds VW floats: 16 (AVX-512), 8 (AVX2), 4 (NEON) or 1 (scalar). The kernels of gemv_fp32.c and
 * attention.c are written once on it. */

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
static inline vf load_f16(const uint16_t *w) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w)); }
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
static inline vf load_f16(const uint16_t *w) {
#ifdef __F16C__   /* every AVX2 CPU we know has F16C (x86-64-v3 includes it) */
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
#else
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = f16_to_f32(w[i]);
    return _mm256_loadu_ps(f);
#endif
}
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
}
#elif defined(KERNEL_NEON)
/* aarch64 NEON, 128 bits: the AVX2 code at half the width. The weights widen exactly as there: int8 and
 * int4 through int32, bf16 by a shift, fp16 by `fcvtl` (exact for every value, subnormals included: Linux
 * starts processes with flush-to-zero off). Each vector holds 4 consecutive columns, so the sums run in
 * the order gemv_fp32.c describes with VW = 4. */
#define VW 4
typedef float32x4_t vf;
static inline vf vzero(void) { return vdupq_n_f32(0.0f); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }   /* c + a * b, fused */
static inline float vhsum(vf v) { return vaddvq_f32(v); }                 /* (v0 + v1) + (v2 + v3) */
static inline int32x4_t load4_s8_s32(const int8_t *w) {                   /* 4 bytes, sign-extended */
    int32_t v;
    memcpy(&v, w, 4);
    return vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(v)))));
}
static inline vf load_q8(const int8_t *w) { return vcvtq_f32_s32(load4_s8_s32(w)); }
static inline vf load_bf16(const uint16_t *w) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w), 16)); }
static inline vf load_f16(const uint16_t *w) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w))); }
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) {
    const int32x4_t b = load4_s8_s32(w);
    *hi = vcvtq_f32_s32(vshrq_n_s32(b, 4));
    *lo = vcvtq_f32_s32(vshrq_n_s32(vshlq_n_s32(b, 28), 28));
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
static inline vf load_f16(const uint16_t *w) { return f16_to_f32(*w); }
static inline void load_q4(const int8_t *w, vf *hi, vf *lo) { *hi = (float)int4_high(*w); *lo = (float)int4_low(*w); }
#endif

/* More of vf, for the attention kernels (attention.c) and SwiGLU (block_ops.c). */
#if VW == 16
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
#elif VW == 8
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline float vhmax(vf x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
#elif VW == 4
static inline vf vset1(float x) { return vdupq_n_f32(x); }
static inline void vstore(float *p, vf x) { vst1q_f32(p, x); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }   /* `fmax`: NaN if either is NaN */
static inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
static inline float vhmax(vf x) { return vmaxvq_f32(x); }
#else
static inline vf vset1(float x) { return x; }
static inline void vstore(float *p, vf x) { *p = x; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vdiv(vf a, vf b) { return a / b; }
static inline float vhmax(vf x) { return x; }
#endif

/* exp(x), for the softmax (x <= 0) and SiLU (block_ops.c): e^x = 2^n e^r with n = round(x / ln 2) and
 * r = x - n ln 2 (|r| <= ln 2 / 2), taken in two parts (ln 2's high part has trailing zero bits, so n times
 * it is exact: Cody and Waite's reduction), e^r by its Taylor polynomial to r^7 (truncation under 1e-8;
 * about 1 ulp in all), then times 2^n in one rounding: AVX-512's scalef, elsewhere two factors 2^(n/2)
 * built in exponent bits (the first product exact), so that the result overflows to inf, and goes
 * subnormal and to 0, where e^x does. x is clamped to [EXP_MIN, EXP_MAX] first, past which e^x is 0 or
 * inf anyway, to keep n in range. NaN stays NaN (x86's min and max return their second operand when one
 * is NaN, NEON's return NaN). exp_poly, below, is the same arithmetic on one float: a lane's bits. */
#define EXP_MIN -104.0f                        /* e^x < 2^-150: rounds to 0 */
#define EXP_MAX 89.0f                          /* e^x > FLT_MAX: inf */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f          /* ln 2 to 16 bits */
#define EXP_LN2_LO 1.428606765330187045e-06f   /* ln 2 - EXP_LN2_HI */
static const float exp_taylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

static inline vf vexp(vf x) {
#if VW == 1
    return expf(x);
#else
    x = vmin(vset1(EXP_MAX), vmax(vset1(EXP_MIN), x));
    const vf t = vmul(x, vset1(EXP_LOG2E));
#if VW == 16
    const vf n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif VW == 8
    const vf n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const vf n = vrndnq_f32(t);   /* to nearest, ties to even, as x86's */
#endif
    const vf r = vfma(n, vset1(-EXP_LN2_LO), vfma(n, vset1(-EXP_LN2_HI), x));
    vf p = vset1(exp_taylor[0]);
    for (int i = 1; i < 8; i++) p = vfma(p, r, vset1(exp_taylor[i]));
#if VW == 16
    return _mm512_scalef_ps(p, n);
#elif VW == 8   /* 2^n1 2^n2, n1 = floor(n / 2), n2 = n - n1: both in [-75, 64], normal floats */
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 e2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, e1), e2);
#else           /* the same on NEON (n is an integer: truncating it is exact) */
    const int32x4_t ni = vcvtq_s32_f32(n), n1 = vshrq_n_s32(ni, 1), n2 = vsubq_s32(ni, n1);
    const int32x4_t bias = vdupq_n_s32(127);
    const float32x4_t e1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
    const float32x4_t e2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));
    return vmulq_f32(vmulq_f32(p, e1), e2);
#endif
#endif
}

/* vexp's arithmetic on one float, on every build (the scalar build's vexp is libm's expf): the bits of a
 * lane of vexp, for the elements past a row's last full vector. (A signalling NaN comes back as it came;
 * a lane would quiet it. No caller can tell.) */
static inline float exp_poly(float x) {
    if (x != x) return x;
    x = x > EXP_MAX ? EXP_MAX : x < EXP_MIN ? EXP_MIN : x;
    const float n = nearbyintf(x * EXP_LOG2E);   /* to nearest, ties to even (the default mode) */
    const float r = fmaf(n, -EXP_LN2_LO, fmaf(n, -EXP_LN2_HI, x));
    float p = exp_taylor[0];
    for (int i = 1; i < 8; i++) p = fmaf(p, r, exp_taylor[i]);
    const int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1;   /* (>> of a negative int: arithmetic in GCC) */
    union { uint32_t u; float f; } e1 = {(uint32_t)(n1 + 127) << 23}, e2 = {(uint32_t)(n2 + 127) << 23};
    return p * e1.f * e2.f;
}

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

#if VW == 4
/* Transpose 4 x 4 floats in registers: rows interleaved in pairs (trn on 32-bit lanes), then 64-bit halves swapped. */
static inline void transpose4(float32x4_t r[4]) {
    const float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r[0], r[1])), t1 = vreinterpretq_f64_f32(vtrn2q_f32(r[0], r[1]));
    const float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r[2], r[3])), t3 = vreinterpretq_f64_f32(vtrn2q_f32(r[2], r[3]));
    r[0] = vreinterpretq_f32_f64(vtrn1q_f64(t0, t2));
    r[1] = vreinterpretq_f32_f64(vtrn1q_f64(t1, t3));
    r[2] = vreinterpretq_f32_f64(vtrn2q_f64(t0, t2));
    r[3] = vreinterpretq_f32_f64(vtrn2q_f64(t1, t3));
}
#endif

#endif  /* QUANT_KERNELS_VEC_H */
