/*
 * The common ground of the CPU kernels: the headers, the instruction set this build targets (chosen by the
 * compiler's -march: KERNEL_ISA, and the switches X8_VNNI, XBF16_DP and KERNEL_NEON that later parts test), OpenMP,
 * and the scalar helpers every part uses: int4 nibbles, bf16 <-> fp32.
 * Part of the one translation unit quant_kernels.c (its top comment is the map), the first; not compiled
 * on its own.
 */

#ifndef QUANT_KERNELS_COMMON_H
#define QUANT_KERNELS_COMMON_H

#include <math.h>     /* NAN, fmaf */
#include <pthread.h>  /* pthread_atfork */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define KERNEL_ISA "avx512-vnni-bf16"
#define X8_VNNI 1     /* the int8-activation kernel's dot products in one instruction (x8_strips.c) */
#define XBF16_DP 1    /* bf16 activations: bf16 pair products in one instruction (gemv_avx512_bf16.c) */
#define X8_STRIPS 1   /* the int8-activation kernel's weight rows in lanes (x8_strips.c): every x86 SIMD build */
#include <immintrin.h>
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KERNEL_ISA "avx512-vnni"
#define X8_VNNI 1
#define X8_STRIPS 1
#include <immintrin.h>
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define KERNEL_ISA "avx512"
#define X8_STRIPS 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define KERNEL_ISA "avx2"
#define X8_STRIPS 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define KERNEL_ISA "neon-dotprod"   /* -march=armv8.2-a+dotprod and later: Neoverse N1/V1, Graviton 2+, Apple M */
#define KERNEL_NEON 1   /* vf on 4 lanes (vec.h), the int8-activation tiles of x8_neon.c */
#include <arm_neon.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define KERNEL_ISA "neon"           /* plain Armv8-A (Cortex-A53/A72, Graviton 1): no sdot, x8_neon.c widens */
#define KERNEL_NEON 1
#include <arm_neon.h>
#else
#define KERNEL_ISA "scalar"
#endif

#ifdef _OPENMP
#include <omp.h>
#define KERNEL_OPENMP 1
#else
#define KERNEL_OPENMP 0
#endif

/* ---- int4 nibbles ---------------------------------------------------------------------------- */

static inline int int4_high(int8_t b) { return b >> 4; }                       /* column 2j   */
static inline int int4_low(int8_t b) { return (int8_t)((uint8_t)b << 4) >> 4; } /* column 2j+1 */

/* ---- bf16 <-> fp32 --------------------------------------------------------------------------- */

/* bf16 is the top half of an fp32: widening is exact. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* IEEE half -> float, exact for every value (the checkpoint's fp16 head and embedding, widened). */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union { uint32_t u; float f; } v;
    if (exp == 0x1f) v.u = sign | 0x7f800000u | (man << 13);           /* inf, nan */
    else if (exp) v.u = sign | ((exp + 112) << 23) | (man << 13);      /* normal: rebias 15 -> 127 */
    else {                                                             /* zero, subnormal: man x 2^-24 */
        v.f = (float)man * 5.9604644775390625e-8f;
        v.u |= sign;
    }
    return v.f;
}

static float *widen_bf16(const uint16_t *x, size_t n) {
    float *f = (float *)malloc(sizeof(float) * n);
    for (size_t i = 0; f && i < n; i++) f[i] = bf16_to_f32(x[i]);
    return f;
}

/* fp32 -> bf16, rounded to nearest even; a NaN stays a NaN (0x7FC0, as torch writes it: rounding a NaN whose
 * payload is all in the low half would carry into the exponent and give inf). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#endif  /* QUANT_KERNELS_COMMON_H */
