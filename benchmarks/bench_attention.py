"""Attention over the paged K/V pool on the CPU: the compiled kernels against torch's SDPA.

Shapes are ChatGLM2/3's (32 query heads, 2 K/V groups, d = 128): s new tokens of one sequence over t
keys (causal, lower-right): decode steps (s = 1), the 40-token turn of a returning conversation over
2,000 cached tokens, prefill chunks (128 for the batching server, 512) at growing depth; and a decode
step of 8 sequences at once (the batching server's). fp32 (the default for quantized models on CPU) and
bf16. Methods, taken in turns for --rounds rounds:
  kernel    models/attention.py `compiled`: `attend_f32` / `attend_bf16` (quantization/kernels/attention*.c)
            over page tables (the keys on shuffled pages of a pool, as a server's are), every part in one call;
  sdpa      what the model ran before for fp32: SDPA per sequence over contiguous K/V (a bool mask and
            `enable_gqa` for chunks, the H/G heads folded into query rows for decode).
Per shape: median [p10-p90] ms per call, the ratio of the medians of each round, and the kernel's rate
in G multiply-adds/s (q.K and p.V over the visible keys).

    python benchmarks/bench_attention.py [--rounds 7] [--threads 2] [--dtype float32,bfloat16]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modelscope_chatglm.models.attention import compiled  # noqa: E402
from modelscope_chatglm.models.kv_cache import KVPool, PagedKV  # noqa: E402
from modelscope_chatglm.quantization.build import load_library  # noqa: E402

H, G, D = 32, 2, 128
# (sequences, new tokens each, keys each)
SHAPES = [(1, 1, 160), (1, 1, 1000), (1, 1, 2040), (1, 1, 8192), (8, 1, 1000), (1, 40, 2040), (1, 128, 128),
          (1, 128, 1000), (1, 128, 4096), (1, 512, 512), (1, 512, 4096)]


def inputs(seqs, s, t, dtype):
    """q of every sequence's new rows ([N, H, D] inside wider rows), a pool with each sequence's keys on
    shuffled pages, the PagedKV of the call, and the same K/V contiguous per sequence (for SDPA)."""
    pool = KVPool(1, G, D, seqs * t + 64, dtype, 'cpu')
    pool.k.normal_(), pool.v.normal_()
    order = torch.randperm(seqs * t + 64)[:seqs * t].to(torch.int32)
    tables = [order[i * t:(i + 1) * t] for i in range(seqs)]
    kv = PagedKV.build(pool, tables, [s] * seqs)
    qkv = torch.randn(seqs * s, (H + 2 * G) * D).to(dtype)
    q = qkv[:, :H * D].view(seqs * s, H, D)
    contiguous = [(pool.k[0][table.long()].transpose(0, 1)[None], pool.v[0][table.long()].transpose(0, 1)[None])
                  for table in tables]
    return q, pool, kv, contiguous


def kernel(q, pool, kv, _):
    return compiled(q, pool.k[0], pool.v[0], kv, D ** -0.5)


def sdpa(q, pool, kv, contiguous):
    s = q.shape[0] // len(contiguous)
    out = []
    for i, (k, v) in enumerate(contiguous):
        qi = q[i * s:(i + 1) * s].transpose(0, 1)[None]                 # [1, H, s, D]
        t = k.shape[2]
        if s == 1:
            o = F.scaled_dot_product_attention(qi.reshape(1, G, H // G, D), k, v).view(1, H, 1, D)
        else:
            mask = torch.ones(s, t, dtype=torch.bool).tril(t - s)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=True)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def per_call(fn, args, seconds):
    """Seconds per call, repeated for about `seconds` (at least 3 calls)."""
    fn(*args)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn(*args)
        n += 1
    return (time.perf_counter() - start) / n


def spread(xs):
    xs = sorted(xs)
    return f'{statistics.median(xs) * 1e3:8.3f} [{xs[len(xs) // 10] * 1e3:.3f}-{xs[(9 * len(xs)) // 10] * 1e3:.3f}]'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--seconds', type=float, default=0.3, help='time per method per round and shape')
    ap.add_argument('--dtype', default='float32,bfloat16')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = load_library()
    if lib is None:
        sys.exit('the CPU kernels could not be built here')
    print(f'kernels: {lib.isa}; torch {torch.__version__}, {args.threads} threads; {args.rounds} rounds in turns; '
          'ms per call, median [p10-p90]')
    for name in args.dtype.split(','):
        dtype = getattr(torch, name)
        print(f'\n{name}\n{"seqs":>4} {"s":>4} {"t":>6} {"kernel ms":>26} {"sdpa ms":>26} {"sdpa/kernel":>20} '
              f'{"kernel G MAC/s":>15}')
        for seqs, s, t in SHAPES:
            call = inputs(seqs, s, t, dtype)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert (kernel(*call).double() - sdpa(*call).double()).abs().max() < tol
            times, ratios = {'kernel': [], 'sdpa': []}, []
            for _ in range(args.rounds):
                times['kernel'].append(per_call(kernel, call, args.seconds))
                times['sdpa'].append(per_call(sdpa, call, args.seconds))
                ratios.append(times['sdpa'][-1] / times['kernel'][-1])
            visible = seqs * sum(t - s + i + 1 for i in range(s))        # keys seen, over every query
            macs = 2 * H * D * visible
            ratios.sort()
            print(f'{seqs:4d} {s:4d} {t:6d} {spread(times["kernel"]):>26} {spread(times["sdpa"]):>26} '
                  f'{statistics.median(ratios):8.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}] '
                  f'{macs / statistics.median(times["kernel"]) / 1e9:15.1f}', flush=True)


if __name__ == '__main__':
    main()
