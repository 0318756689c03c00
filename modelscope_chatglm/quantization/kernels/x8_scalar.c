/*
 * int8 activations on a build without SIMD (KERNEL_ISA "scalar": neither x86 SIMD, whose builds have
 * x8_strips.c, nor NEON, x8_neon.c): each output is row_x8, the definition, on the threads. The X8_*
 * macros at the end tell x8.c how to run it.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

#if !defined(X8_STRIPS) && !defined(KERNEL_NEON)
/* Weight rows [n0, n1) against rows [p0, p1) of xq. */
static void rows_x8(void *arg, int n0, int n1) {
    const x8_job *job = (const x8_job *)arg;
    const x8_t *xq = job->xq;
    const int KB = job->bits == 4 ? xq->K / 2 : xq->K;
    for (int n = n0; n < n1; n++)
        for (int m = job->p0; m < job->p1; m++)
            job->y[(size_t)m * job->N + n] = row_x8(xq, m, job->W + (size_t)n * KB, job->bits) * job->scale[n]
                                             + (job->bias ? job->bias[n] : 0.0f);
}

#define X8_ORDER(bits) X8_NATURAL
#define X8_TILE_ROWS(bits) 1    /* weight rows per work item */
#define X8_TILE_XROWS(bits) 1   /* rows of x per pass */
#define X8_TILES rows_x8
#endif  /* !X8_STRIPS && !KERNEL_NEON */
