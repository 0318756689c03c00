"""A decode step with every GLM2/3 block in one C call (cpu_ops.glm2_layers) against the same model running
its modules one by one, in one process, taking turns: this VM's memory bandwidth drifts by tens of
percent within minutes, so only turns a few seconds apart compare.

Each turn is a greedy reply of --new tokens after a short prompt (ms a token, from the first token on);
printed: both medians [min-max] and the paired ratio (modules / one call) of each round.

    python benchmarks/bench_whole_blocks.py --dir /var/tmp/chatglm2-6b-random [--bits 4] [--rounds 12]
        [--march x86-64-v3]   # the kernels for AVX2 in an fp32 model, as bench_vs_llamacpp.py --isa avx2
                              # (run it with ATEN_CPU_CAPABILITY=avx2 for torch's own ops)
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', required=True, help='a checkpoint in the hub layout (benchmarks/fullsize.py builds one)')
    ap.add_argument('--bits', type=int, default=4, choices=[4, 8])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=12)
    ap.add_argument('--new', type=int, default=16)
    ap.add_argument('--march', help="the kernels built with gcc's -march=MARCH, in an fp32 model")
    args = ap.parse_args()

    from cpu_model import load
    chat = load(args.dir, args.bits, args.threads, args.march)
    from modelscope_chatglm.models import cpu_ops
    from modelscope_chatglm.quantization import build
    print(repr(chat), build.load_library().isa)
    one_call = cpu_ops.glm2_layers
    ids = list(range(100, 108))

    def ms_a_token():
        stamps = []
        for _ in chat.stream_tokens(ids, max_new_tokens=args.new + 1, do_sample=False, stop_ids=[]):
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / args.new * 1e3

    ms_a_token()   # warm-up
    times = {'one call': [], 'modules one by one': []}
    for r in range(args.rounds):
        for way in (list(times) if r % 2 == 0 else list(times)[::-1]):   # each way first in every other round
            cpu_ops.glm2_layers = one_call if way == 'one call' else (lambda *a: None)
            times[way].append(ms_a_token())
    cpu_ops.glm2_layers = one_call
    for way, values in times.items():
        print(f'{way}: {statistics.median(values):.1f} ms a token [{min(values):.1f}-{max(values):.1f}]')
    ratios = [m / t for m, t in zip(times['modules one by one'], times['one call'])]
    print(f'modules / one call, paired by round: median {statistics.median(ratios):.3f} '
          f'[{min(ratios):.3f}-{max(ratios):.3f}]')


if __name__ == '__main__':
    main()
