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
 * in the same order whatever M is (see "The summation order", gemv_fp32.c), so batching never changes a
 * result. For each kernel there is a plain scalar reference (`*_ref`, reference.c); the test suite checks
 * that they agree, on every instruction set the build can target here.
 *
 * The SIMD path is chosen when this file is compiled (-march=native): AVX-512 (F+BW), else AVX2+FMA; on
 * aarch64 NEON, with dotprod or without; else the scalar code (common.h). Rows are split across `nthreads`
 * OpenMP threads (torch's setting) in chunks (threads.c).
 * Prefill (many rows of x) uses `*_dequant_rows_*` on row tiles and a matrix multiply in torch.
 *
 * `*_gemv_xbf16` take a bf16 model's x in bf16: on AVX512-BF16 they multiply bf16 pairs (`vdpbf16ps`,
 * twice the products per instruction, the same exact products; gemv_avx512_bf16.c), elsewhere they
 * widen x and run the fp32 loop.
 *
 * `f32_gemv` (fp32 x and weights) and `bf16_gemv` (bf16 x and weights) are the same loops for the LM head
 * of a decode step (models/base.py): fp32 logits, summed in the same order for any number of rows.
 *
 * `*_gemv_x8` are the int8-activation kernels (the CPU default for quantized models) (x8_quantize.c says how): x is quantized to
 * int8 too and the dot products are exact integer sums (AVX512-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, NEON
 * `sdot` or widening multiplies, or the scalar code), the same bits on every build; they take every row of
 * x, prompt or decode.
 *
 * `rms_norm_*`, `rotary_*` and `swiglu_*` are the RMSNorm, RoPE and SwiGLU of a GLM2/3 block, one call per layer,
 * and `glm2_layers` every block of a forward with int8 activations in one call (block_ops.c).
 *
 * `attend_f32` and `attend_bf16` are the attention of every new row of a forward (prompt chunks and decode
 * tokens of many sequences) over their keys in the paged K/V pool, one call per layer (attention.c).
 *
 * ---- the map ----------------------------------------------------------------------------------------
 * build.py compiles this file alone, in one compiler invocation, into one library. It #includes the parts
 * below in this order, as one translation unit: the static inline helpers, the vector type and the #if
 * switches of common.h reach every part, and the compiler inlines across parts as within one file. Each
 * part uses what the parts above it define; none is compiled on its own. The library's cache key
 * (build.py) covers every .c and .h here, so editing any part rebuilds it.
 *
 *   common.h                 headers, this build's instruction set (KERNEL_ISA; X8_VNNI, XBF16_DP,
 *                            KERNEL_NEON), OpenMP, int4 nibbles, bf16 <-> fp32
 *   vec.h                    vf, one vector type for every instruction set (AVX-512, AVX2, NEON, scalar),
 *                            exp, register transposes
 *   threads.c                parallel_run / parallel_for on OpenMP's threads, forked children, per-thread
 *                            scratch buffers
 *   gemv_fp32.c              the exact weight-only kernels: up to ROW_BLOCK weight rows widened to fp32 in
 *                            registers against up to X_ROWS rows of x, written once on vf
 *   gemv_avx512_bf16.c       the same on bf16 x with bf16 pair products (AVX512-BF16 builds)
 *   gemv.c                   their driver and entry points: q8_gemv, q4_gemv, f32_gemv, *_xbf16, bf16_gemv
 *   x8_quantize.c            int8 activations: x quantized per block of QK columns, exact block sums, the job
 *   x8_strips.c              int8-activation strips, weight rows in lanes: vpdpbusd (AVX512-VNNI) or
 *                            vpmaddubsw (AVX2, AVX-512 without VNNI)
 *   x8_neon.c                int8-activation tiles by sdot, or widening multiplies without dotprod (aarch64
 *                            NEON builds)
 *   x8_scalar.c              int8 activations on the scalar build: the definition's loop on the threads
 *   x8.c                     their driver and entry points: q8_gemv_x8, q4_gemv_x8, and the `_lanes` pair
 *   relayout.c               weights into other layouts: the strips' lane layout (x8_relayout_weights) and
 *                            dequantised row tiles for prefill (*_dequant_rows_*)
 *   attention.c              attention over paged K/V: the job, the kernel on vf, attend_f32
 *   attention_avx512_bf16.c  attend_bf16: bf16 pair products (AVX512-BF16 builds), else attention.c's kernel
 *   block_ops.c              the per-row ops around a block's linears: rms_norm_*, rotary_*, swiglu_* (fp32,
 *                            bf16); glm2_layers, every int8-activation block of a forward in one call
 *   reference.c              the scalar references (`*_ref`) that the tests hold every build to
 */
#include "common.h"

/* What this build is (build.py asks). */
const char *kernel_isa(void) { return KERNEL_ISA; }
int kernel_openmp(void) { return KERNEL_OPENMP; }

#include "vec.h"
#include "threads.c"
#include "gemv_fp32.c"
#include "gemv_avx512_bf16.c"
#include "gemv.c"
#include "x8_quantize.c"
#include "x8_strips.c"
#include "x8_neon.c"
#include "x8_scalar.c"
#include "x8.c"
#include "relayout.c"
#include "attention.c"
#include "attention_avx512_bf16.c"
#include "block_ops.c"
#include "reference.c"
