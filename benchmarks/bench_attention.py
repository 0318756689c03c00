"""Attention of one ChatGLM2 sequence in bf16 on the CPU: the compiled kernel against torch's SDPA.

Shapes are ChatGLM2/3's (32 query heads, 2 K/V groups, d = 128) for s new tokens over t positions in
all (causal, lower-right): decode steps (s = 1), the 40-token turn of a returning conversation over
2,000 cached tokens, and prefill chunks (128 tokens for the batching server, 512 for a single
conversation) at growing depth. Methods, taken in turns for --rounds rounds:
  kernel    quant_kernels.c `attend_bf16` through glm2.compiled_attention (what the model runs now);
  sdpa      what the model ran before: SDPA with a bool mask and `enable_gqa` for chunks, the H/G heads
            folded into query rows for decode (models/glm2.py `attend` with the kernel unavailable).
Per shape: median [p10-p90] ms per call of each, the ratio of the medians of each round, and the
kernel's rate in G multiply-adds/s (q.K and p.V over the visible keys).

    python benchmarks/bench_attention.py [--rounds 7] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modelscope_chatglm.models.glm2 import compiled_attention  # noqa: E402
from modelscope_chatglm.quantization.build import load_library  # noqa: E402

H, G, D = 32, 2, 128
SHAPES = [(1, 160), (1, 1000), (1, 2040), (1, 8192), (40, 2040), (128, 128), (128, 1000), (128, 4096),
          (512, 512), (512, 4096), (512, 16384)]


def inputs(s, t):
    qkv = torch.randn(1, s, (H + 2 * G) * D).bfloat16()          # q as the QKV projection leaves it
    q = qkv[..., :H * D].view(1, s, H, D).transpose(1, 2)
    k, v = (torch.randn(1, G, t + 64, D).bfloat16()[:, :, :t] for _ in range(2))   # cache views
    return q, k, v


def sdpa(q, k, v):
    s, t = q.shape[2], k.shape[2]
    if s == 1:
        return F.scaled_dot_product_attention(q.reshape(1, G, H // G, D), k, v).view(1, H, 1, D)
    mask = torch.ones(s, t, dtype=torch.bool).tril(t - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = load_library()
    print(f'kernels: {lib.isa if lib else "none"}; torch {torch.__version__}, {args.threads} threads; '
          f'{args.rounds} rounds in turns; ms per call, median [p10-p90]')
    if lib is None or not lib.isa.endswith('-bf16'):
        sys.exit('the attention kernel needs a build with AVX512-BF16; this CPU runs SDPA only')
    print(f'{"s":>4} {"t":>6} {"kernel ms":>26} {"sdpa ms":>26} {"sdpa/kernel":>20} {"kernel G MAC/s":>15}')
    for s, t in SHAPES:
        q, k, v = inputs(s, t)
        assert (compiled_attention(q, k, v).double() - sdpa(q, k, v).double()).abs().max() < 2e-2
        times = {'kernel': [], 'sdpa': []}
        ratios = []
        for _ in range(args.rounds):
            times['kernel'].append(per_call(compiled_attention, (q, k, v), args.seconds))
            times['sdpa'].append(per_call(sdpa, (q, k, v), args.seconds))
            ratios.append(times['sdpa'][-1] / times['kernel'][-1])
        visible = sum(t - s + i + 1 for i in range(s))              # keys seen, over the chunk's queries
        macs = 2 * H * D * visible
        ratios.sort()
        print(f'{s:4d} {t:6d} {spread(times["kernel"]):>26} {spread(times["sdpa"]):>26} '
              f'{statistics.median(ratios):8.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}] '
              f'{macs / statistics.median(times["kernel"]) / 1e9:15.1f}', flush=True)


if __name__ == '__main__':
    main()
