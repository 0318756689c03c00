"""The CPU's peak multiply-add rate per instruction kind: the ceiling the batched kernels are measured against.

Compiles a register-only loop of 12 independent accumulators (no loads, no stores) for each of
  - `vfmadd` (fp32 FMA, 16 multiply-adds per 512-bit instruction; 8 per 256-bit on AVX2),
  - `vdpbf16ps` (bf16 pairs, 32 per instruction; AVX512-BF16),
  - `vpdpbusd` (unsigned x signed bytes, 64 per instruction; AVX512-VNNI),
with gcc -O2 -march=native, and runs each on 1 and on all cores at once (one process per core).
Prints instructions/s and multiply-adds/s per core and in all, median of --repeats runs [min-max].

    python benchmarks/bench_cpu_peak.py [--repeats 5]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

SOURCE = r'''
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#define ITERS 50000000L
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
/* 12 accumulators with distinct starting values: the compiler cannot merge them. */
#define TWELVE(op) a0 = op(a0); a1 = op(a1); a2 = op(a2); a3 = op(a3); a4 = op(a4); a5 = op(a5); \
                   a6 = op(a6); a7 = op(a7); a8 = op(a8); a9 = op(a9); a10 = op(a10); a11 = op(a11);
#define RUN(T, init, op, sum, macs, name)                                                         \
    {                                                                                            \
        T a0 = init(0), a1 = init(1), a2 = init(2), a3 = init(3), a4 = init(4), a5 = init(5);     \
        T a6 = init(6), a7 = init(7), a8 = init(8), a9 = init(9), a10 = init(10), a11 = init(11); \
        double t = now();                                                                        \
        for (long i = 0; i < ITERS; i++) { TWELVE(op) __asm__ volatile("" ::: "memory"); }         \
        t = now() - t;                                                                           \
        printf("%s %.4f %d %g\n", name, ITERS * 12 / t / 1e9, macs, (double)sum);                 \
    }
int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : "";
#if defined(__AVX512F__)
    const __m512 fx = _mm512_set1_ps(1.0f), fy = _mm512_set1_ps(0.0f);
#define FINIT(i) _mm512_set1_ps((float)(i))
#define FMA(a) _mm512_fmadd_ps(a, fx, fy)
#define FSUM _mm512_reduce_add_ps(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11)
    if (!strcmp(only, "vfmadd")) RUN(__m512, FINIT, FMA, FSUM, 16, "vfmadd")
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 fx = _mm256_set1_ps(1.0f), fy = _mm256_set1_ps(0.0f);
#define FINIT(i) _mm256_set1_ps((float)(i))
#define FMA(a) _mm256_fmadd_ps(a, fx, fy)
#define FSUM 0
    if (!strcmp(only, "vfmadd")) RUN(__m256, FINIT, FMA, FSUM, 8, "vfmadd")
#endif
#if defined(__AVX512BF16__)
    const __m512bh bx = (__m512bh)_mm512_set1_epi16(0x3f80), by = (__m512bh)_mm512_set1_epi16(0x3f80);
#define BF16(a) _mm512_dpbf16_ps(a, bx, by)
    if (!strcmp(only, "vdpbf16ps")) RUN(__m512, FINIT, BF16, FSUM, 32, "vdpbf16ps")
#endif
#if defined(__AVX512VNNI__)
    const __m512i ix = _mm512_set1_epi8(1), iy = _mm512_set1_epi8(1);
#define IINIT(i) _mm512_set1_epi32(i)
#define VNNI(a) _mm512_dpbusd_epi32(a, ix, iy)
#define ISUM _mm512_reduce_add_epi32(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11)
    if (!strcmp(only, "vpdpbusd")) RUN(__m512i, IINIT, VNNI, ISUM, 64, "vpdpbusd")
#endif
    return 0;
}
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=5)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix='cpu-peak-')
    src, exe = os.path.join(work, 'peak.c'), os.path.join(work, 'peak')
    with open(src, 'w') as f:
        f.write(SOURCE)
    subprocess.run(['gcc', '-O2', '-march=native', src, '-o', exe], check=True)
    cores = os.cpu_count()
    print(f'{cores} cores; register-only loops, 12 accumulators; median of {args.repeats} [min-max]')
    print(f'{"instruction":>10s} {"cores":>5s} {"G instr/s per core":>26s} {"G multiply-adds/s, all":>26s}')
    for kind in ('vfmadd', 'vdpbf16ps', 'vpdpbusd'):
        for n in (1, cores):
            per_core, macs = [], 0
            for _ in range(args.repeats):
                procs = [subprocess.Popen([exe, kind], stdout=subprocess.PIPE, text=True) for _ in range(n)]
                lines = [p.communicate()[0].split() for p in procs]
                if not all(lines):
                    break
                rates = [float(line[1]) for line in lines]
                macs = int(lines[0][2])
                per_core.append(statistics.mean(rates))
            if not per_core:
                print(f'{kind:>10s}: not on this CPU')
                break
            med = statistics.median(per_core)
            print(f'{kind:>10s} {n:5d} {med:10.2f} [{min(per_core):.2f}-{max(per_core):.2f}]       '
                  f'{med * macs * n:10.0f} [{min(per_core) * macs * n:.0f}-{max(per_core) * macs * n:.0f}]',
                  flush=True)


if __name__ == '__main__':
    sys.exit(main())
