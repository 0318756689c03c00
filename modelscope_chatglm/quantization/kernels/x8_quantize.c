/*
 * The common ground of the int8-activation kernels: what they compute and why (below), x quantized to int8
 * per block of QK columns (quantize_x8), a block's exact integer sum (block_isum: the scalar code, and every
 * build's short last block), a row's sum as defined (row_x8), and the job that the strips of x8_strips.c, the
 * tiles of x8_neon.c or the rows of x8_scalar.c run. x8.c drives them; gemv_x8_ref (reference.c) is the
 * definition.
 * Part of the one translation unit quant_kernels.c (its top comment is the map); not compiled on its own.
 */

/* ---- int8 activations: integer dot products ------------------------------------------------- */
/*
 * The exact kernels (gemv_fp32.c) widen every weight to fp32 and multiply-add 8 (AVX2) at a time. Here x
 * is quantized too, the way ggml's q8_0 does it: each block of QK columns of a row of x gets one scale
 *
 *   d[m, b] = max_k |x[m, k]| / 127,   xq[m, k] = round(x[m, k] / d[m, b])   (k in block b, |xq| <= 127)
 *
 * and the products are summed exactly in integers, block by block, before one multiply by the scales:
 *
 *   y[m, n] = scale[n] * sum_b d[m, b] * isum[m, n, b] + bias[n],   isum = sum_{k in b} xq[m, k] * Q[n, k]
 *
 * On x86 `vpmaddubsw` (AVX2) and `vpdpbusd` (AVX512-VNNI) do 32 or 64 byte products per
 * instruction, and NEON's `sdot` 16: int4 decode is no longer bound by widening nibbles to floats,
 * and batched rows cost less multiply work. The price is the rounding of x to 8 bits (about 0.5% relative error on a
 * layer's output): results are close to, not equal to, the exact kernels (gemv.c), which stay one flag
 * away (`int8_activations=False`; the default for quantized CPU models is this path). Each row of y is
 * still computed the same way whatever the other rows are: batching never changes it.
 *
 * Every build sums the blocks as the definition does (row_x8, below): each block's exact integer sum,
 * converted, times d[m, b], added block after block in fp32. The x86 builds keep one weight row per
 * lane (x8_strips.c), NEON adds its lanes across at each block's end (x8_neon.c), the scalar build runs
 * row_x8 itself (x8_scalar.c): all give gemv_x8_ref's bits, so a model answers the same on every CPU.
 * The order in which xq stores a block's columns is the one its kernel consumes them in (x8_order).
 */
#define QK 64

/* The order in which a full block of xq stores its QK columns: the order the kernel consumes them. */
enum x8_order {
    X8_NATURAL,   /* int8 weights (and the scalar reference's int4) */
    X8_HALVES,    /* int4 on NEON: the QK/2 even columns, then the QK/2 odd ones */
    X8_OCTETS,    /* int4 on x86: in each 8 columns, the 4 even ones, then the 4 odd ones */
};

typedef struct {
    int M, K, nb;      /* nb = ceil(K / QK) blocks per row */
    int8_t *q;         /* [M, K] */
    float *d;          /* [M, nb] */
    int32_t *bsum;     /* [M, nb]: the sum of q over each block */
} x8_t;

/* v to the nearest integer in [-127, 127], ties to even (adding and subtracting 1.5 * 2^23 leaves no
 * fraction bits; no libm call, the same on every build). NaN becomes 0. v is in range but for a block
 * whose largest |x| is so small that 127 / it overflows to inf: clamped, never -128 (the kernels'
 * int16 bounds assume |xq| <= 127) and never an undefined conversion. */
static inline int8_t round_to_int8(float v) {
    const float r = (v + 12582912.0f) - 12582912.0f;
    return r != r ? 0 : r > 127.0f ? 127 : r < -127.0f ? -127 : (int8_t)r;
}

/* Where slot i of a block of `len` columns comes from (a short last block keeps the natural order). */
static inline int block_column(enum x8_order order, int len, int i) {
    if (len < QK || order == X8_NATURAL) return i;
    if (order == X8_HALVES) return i < QK / 2 ? 2 * i : 2 * (i - QK / 2) + 1;
    return (i & ~7) + (i % 8 < 4 ? 2 * (i % 8) : 2 * (i % 8 - 4) + 1);   /* X8_OCTETS */
}

/* Plain C for every instruction set (x is M x K, the weights N x K: this is not where the time goes),
 * so all builds quantize x identically. */
static void quantize_x8_row(const float *x, int K, enum x8_order order, int8_t *q, float *d, int32_t *bsum) {
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
    }
}

static x8_t quantize_x8(const float *x, int M, int K, enum x8_order order) {
    x8_t xq = {M, K, (K + QK - 1) / QK, NULL, NULL, NULL};
    xq.q = (int8_t *)malloc((size_t)M * K);
    xq.d = (float *)malloc(sizeof(float) * (size_t)M * xq.nb);
    xq.bsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)M * xq.nb);
    for (int m = 0; m < M; m++)
        quantize_x8_row(x + (size_t)m * K, K, order, xq.q + (size_t)m * K, xq.d + (size_t)m * xq.nb,
                        xq.bsum + (size_t)m * xq.nb);
    return xq;
}

static void free_x8(x8_t *xq) {
    free(xq->q);
    free(xq->d);
    free(xq->bsum);
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

/* Row m of xq against one weight row in the hub's layout: each block's isum times d[m, b], added block after
 * block (the definition: gemv_x8_ref sums so, and every SIMD build gives its bits). */
static float row_x8(const x8_t *xq, int m, const int8_t *w, int bits) {
    const int K = xq->K, nb = xq->nb;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const int k0 = b * QK, len = K - k0 < QK ? K - k0 : QK;
        acc = fmaf(xq->d[(size_t)m * nb + b], (float)block_isum(xq->q + (size_t)m * K, w, bits, X8_NATURAL, k0, len), acc);
    }
    return acc;
}

typedef struct {
    const x8_t *xq;
    int p0, p1, bits;   /* rows [p0, p1) of xq */
    int lanes;          /* W's full strips are in the lane layout (x8_relayout_weights), x86 builds only */
    const int8_t *W;
    const float *scale, *bias;
    float *y;
    int N;
} x8_job;

#define X8_PANEL_BYTES (256 << 10)
