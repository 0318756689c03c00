"""The CPU's peak multiply-add rate per instruction kind: the ceiling the batched kernels are measured against.

Compiles a register-only loop of 12 independent accumulators (no loads, no stores) for each of
  - `vfmadd` (fp32 FMA, 16 multiply-adds per 512-bit instruction; 8 per 256-bit on AVX2),
  - `vdpbf16ps` (bf16 pairs, 32 per instruction; AVX512-BF16),
  - `vpdpbusd` (unsigned x signed bytes, 64 per instruction; AVX512-VNNI),
with gcc -O2 -march=native, and runs each on 1 and on all cores at once (one process per core).
Prints instructions/s and multiply-adds/s per core and in all, median of --repeats runs [min-max].

And the ceiling a decode step is measured against: the memory read bandwidth (`memory_read_gbs`), one
pass over a 1 GiB buffer at a time, each thread summing its own contiguous part (as each kernel thread
streams its own weight rows), on 1 thread and on all cores' threads. bench_vs_llamacpp.py runs it
between the engines, so that each round's decode speeds sit beside the bandwidth of that moment.

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


# Read-only streaming with vector loads (GCC's vector extension: the build's widest registers), 4
# independent sums so that the adds never wait on one another; OpenMP threads each take one contiguous part.
MEMORY_SOURCE = r'''
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef unsigned long long v4 __attribute__((vector_size(32)));   /* unsigned: the sums wrap, defined */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    const size_t bytes = (size_t)1 << 30, n = bytes / sizeof(v4);
    const int passes = atoi(argv[1]);
    v4 *a = aligned_alloc(64, bytes);
    memset(a, 1, bytes);
    for (int p = 0; p < passes; p++) {
        unsigned long long total = 0;
        const double t = now();
#pragma omp parallel reduction(+ : total)
        {
            const size_t part = n / omp_get_num_threads(), start = part * omp_get_thread_num();
            v4 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (size_t i = start; i + 4 <= start + part; i += 4) {
                s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
            }
            const v4 s = s0 + s1 + s2 + s3;
            total += s[0] + s[1] + s[2] + s[3];
        }
        printf("%.3f %llu\n", bytes / (now() - t) / 1e9, total);
    }
    return 0;
}
'''


def memory_read_gbs(threads: int, passes: int = 5) -> list:
    """GB/s of each of `passes` read passes over 1 GiB on `threads` threads (built once per process)."""
    global _memory_exe
    if _memory_exe is None:
        work = tempfile.mkdtemp(prefix='memory-read-')
        src, _memory_exe = os.path.join(work, 'read.c'), os.path.join(work, 'read')
        with open(src, 'w') as f:
            f.write(MEMORY_SOURCE)
        subprocess.run(['gcc', '-O2', '-march=native', '-fopenmp', src, '-o', _memory_exe], check=True)
    out = subprocess.run([_memory_exe, str(passes)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND='false')).stdout
    return [float(line.split()[0]) for line in out.splitlines()]


_memory_exe = None


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
    print(f'\nmemory read, 1 GiB passes; median of {args.repeats} [min-max]')
    for n in (1, cores):
        rates = memory_read_gbs(n, args.repeats)
        print(f'{n} thread(s): {statistics.median(rates):.1f} GB/s [{min(rates):.1f}-{max(rates):.1f}]', flush=True)


if __name__ == '__main__':
    sys.exit(main())
