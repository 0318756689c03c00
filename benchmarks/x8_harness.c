/*
 * The int8-activation kernels alone, without Python: q4/q8_gemv_x8 (hub layout) or *_x8_lanes (weights put
 * in the strips' lane layout first) on random weights, N x 4096, M rows of x, timed over `reps` calls,
 * three times. GB/s counts the weight bytes a call reads; Gop/s the integer multiply-adds. Where
 * bench_quant_gemv.py times the library this CPU builds, through torch, on ChatGLM2-6B's shapes, this
 * times the kernel code alone, for any -march (the AVX2 build on an AVX-512 CPU), with weights small
 * enough to stay in L2 if asked: what choosing a kernel's shape needs (benchmarks/README.md, "Design
 * choices", has the runs). Built like the library:
 *
 *   K=modelscope_chatglm/quantization/kernels
 *   gcc -O3 -march=x86-64-v3 -std=c11 -ffp-contract=off -fopenmp -I$K benchmarks/x8_harness.c -o /tmp/x8 -lm
 *   /tmp/x8 N bits M reps threads lanes      # e.g. /tmp/x8 27392 4 1 100 2 1: one decode row, DRAM
 *                                            #      /tmp/x8 256 4 1 3000 1 1: from L2, one core
 */
#include "quant_kernels.c"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
    const int N = argc > 1 ? atoi(argv[1]) : 256, K = 4096, bits = argc > 2 ? atoi(argv[2]) : 4;
    const int M = argc > 3 ? atoi(argv[3]) : 1, reps = argc > 4 ? atoi(argv[4]) : 2000;
    const int threads = argc > 5 ? atoi(argv[5]) : 1;
    int lanes = argc > 6 ? atoi(argv[6]) : 1;
    const size_t KB = bits == 4 ? K / 2 : K;
    int8_t *W = malloc((size_t)N * KB);
    float *x = malloc(sizeof(float) * M * K), *scale = malloc(sizeof(float) * N), *y = malloc(sizeof(float) * (size_t)M * N);
    for (size_t i = 0; i < (size_t)N * KB; i++) W[i] = (int8_t)(rand() & 0xff);
    for (size_t i = 0; bits == 8 && i < (size_t)N * KB; i++) W[i] = W[i] == -128 ? -127 : W[i];   /* q8's range */
    for (int i = 0; i < M * K; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int i = 0; i < N; i++) scale[i] = 0.01f;
    if (lanes && x8_relayout_weights(W, N, K, bits, 1, threads) != 0) {
        printf("this build has no lane layout: hub layout\n");
        lanes = 0;
    }
    void (*gemv)(const float *, int, int, const int8_t *, const float *, const float *, float *, int, int) =
        bits == 4 ? (lanes ? q4_gemv_x8_lanes : q4_gemv_x8) : (lanes ? q8_gemv_x8_lanes : q8_gemv_x8);
    for (int r = 0; r < 3; r++) {
        double t = now();
        for (int i = 0; i < reps; i++) gemv(x, M, K, W, scale, NULL, y, N, threads);
        t = now() - t;
        printf("%s N=%d bits=%d M=%d threads=%d lanes=%d: %.1f us a call, %.1f GB/s of weights, %.1f Gop/s\n", KERNEL_ISA,
               N, bits, M, threads, lanes, t / reps * 1e6, (double)N * KB * reps / t / 1e9, (double)N * K * M * reps / t / 1e9);
    }
    return 0;
}
