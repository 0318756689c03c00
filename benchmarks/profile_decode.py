"""Where a CPU decode step's time goes: each compiled kernel (by entry point), and the rest (Python, torch's
small ops, the engine), per token, for a model as a user loads it.

Every call into the kernel library is timed (a wrapper around each ctypes function: about a microsecond
each, a few hundred per token); a greedy reply of --new tokens after a short prompt is timed whole, and
the rest is the difference. Printed per round, then the kernels of the last round.

    python benchmarks/profile_decode.py --dir /var/tmp/chatglm2-6b-random --bits 4 [--rounds 5] [--new 32]
        [--march x86-64-v3]   # the kernels built for another instruction set, in an fp32 model (as --isa avx2
                              # of bench_vs_llamacpp.py; run it with ATEN_CPU_CAPABILITY=avx2 for torch's ops)
"""
import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', required=True, help='a checkpoint in the hub layout (benchmarks/fullsize.py builds one)')
    ap.add_argument('--bits', type=int, default=4, choices=[4, 8, 0], help='0: not quantized')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--new', type=int, default=32)
    ap.add_argument('--march', help="build the kernels with gcc's -march=MARCH in place of this CPU's own build, "
                                    'and load the model in fp32 (what a CPU without bf16 units gets)')
    args = ap.parse_args()

    from cpu_model import load
    chat = load(args.dir, args.bits, args.threads, args.march)
    import torch
    from modelscope_chatglm.quantization import build
    print(repr(chat), build.load_library().isa)

    seconds, calls = collections.defaultdict(float), collections.Counter()

    class Timed:   # the library, each exported function timed
        def __init__(self, lib):
            self._lib = lib

        def __getattr__(self, name):
            fn = getattr(self._lib, name)
            if not callable(fn):
                return fn

            def timed(*a):
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    seconds[name] += time.perf_counter() - t
                    calls[name] += 1
            return timed
    build.use_library(Timed(build.load_library()))

    g = torch.Generator().manual_seed(0)
    vocab = chat.model.cfg.vocab_size

    def ids(n):
        return torch.randint(100, min(60000, vocab), (n,), generator=g).tolist()
    for _ in chat.stream_tokens(ids(16), max_new_tokens=2, do_sample=False, stop_ids=[]):
        pass
    for r in range(args.rounds):
        stamps = []
        for _ in chat.stream_tokens(ids(8), max_new_tokens=args.new + 1, do_sample=False, stop_ids=[]):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:          # from the first token on: decode steps only
                seconds.clear()
                calls.clear()
        step = (stamps[-1] - stamps[0]) / args.new
        kernels = sum(seconds.values()) / args.new
        print(f'round {r + 1}: {1 / step:6.2f} tok/s, {step * 1e3:6.1f} ms a token: kernels {kernels * 1e3:6.1f} ms, '
              f'the rest {(step - kernels) * 1e3:5.1f} ms')
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f'  {name:28s} {s * 1e3 / args.new:7.2f} ms a token, {calls[name] / args.new:5.1f} calls')


if __name__ == '__main__':
    main()
