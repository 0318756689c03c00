"""The continuous-batching scheduler in-process (no HTTP): what its choices cost on a full-size model.

- chunks: N new prompts at once (--prompt-tokens each, --new-tokens greedy tokens), one run per
  --prefill-chunk value, taken in turns --rounds times: output tokens/s, TTFT p50 and the p50/p99 gap
  between a sequence's tokens (a prompt chunk in a step pauses every decoding stream for that step).
- shared: the same burst with prompt chunks and decode tokens in one forward (where every row keeps its
  bits: `rows_keep_their_bits`) against two forwards per step, in turns.
- openmp: one stream's decode step, in turns: on the thread that loaded the model, on a second thread
  beside the loading thread's idle OpenMP pool, and on a second thread after `release_workers()`
  (what the server's engine does).
- steps: a decode step of 1 stream against one of --clients streams, two schedulers in one process,
  5 steps of each in turns for 12 rounds: the medians and each round's ratio. One stream is bound by
  memory bandwidth and many by compute, and the host's bandwidth drifts: only ratios taken in turns
  compare.

    python benchmarks/bench_scheduler.py --bits 4 --int8-activations [--only chunks|shared|openmp|steps]
"""
import argparse
import os
import queue
import random
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))


def burst(chat, n, prompt_tokens, new_tokens, chunk, seed=0):
    """n prompts at once -> dict(tokens_per_s, ttft_p50, gap_p50, gap_p99, steps)."""
    rng = random.Random(seed)
    sched = chat.new_engine(max_batch=16, prefill_chunk=chunk)
    seqs = [sched.submit([rng.randrange(100, 60000) for _ in range(prompt_tokens)],
                         chat.sampling(max_new_tokens=new_tokens, do_sample=False)) for _ in range(n)]
    start, times = time.perf_counter(), [[] for _ in seqs]
    while not all(s.finished for s in seqs):
        sched.step()
        now = time.perf_counter()
        for seq, t in zip(seqs, times):
            t.extend([now] * (len(seq.output) - len(t)))
    wall = time.perf_counter() - start
    gaps = sorted(b - a for t in times for a, b in zip(t, t[1:]))
    return dict(tokens_per_s=sum(len(s.output) for s in seqs) / wall,
                ttft_p50=statistics.median(t[0] - start for t in times),
                gap_p50=gaps[len(gaps) // 2], gap_p99=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
                steps=sched.scheduler.stats['steps'])


def show(label, r):
    print(f'{label:28s} tok/s {r["tokens_per_s"]:6.2f}  TTFT p50 {r["ttft_p50"]:6.2f} s  gap p50 '
          f'{r["gap_p50"]:.3f} / p99 {r["gap_p99"]:.2f} s  steps {r["steps"]}', flush=True)


def chunks(chat, args):
    print(f'\n{args.clients} prompts of {args.prompt_tokens} tokens at once, {args.new_tokens} new tokens each, '
          f'by --prefill-chunk ({args.rounds} rounds, in turns)')
    for r in range(args.rounds):
        for chunk in args.chunks:
            show(f'round {r + 1}, chunk {chunk}', burst(chat, args.clients, args.prompt_tokens, args.new_tokens, chunk))


def shared(chat, args):
    print('\nthe same burst (chunk 128): prompt chunks and decode tokens in one forward, or two forwards a step')
    model = chat.model
    for r in range(args.rounds):
        for label, apart in (('one forward', False), ('two forwards', True)):
            if apart:
                model.rows_keep_their_bits = lambda rows: False
            try:
                show(f'round {r + 1}, {label}', burst(chat, args.clients, args.prompt_tokens, args.new_tokens, 128))
            finally:
                model.__dict__.pop('rows_keep_their_bits', None)


def openmp(chat, args):
    from modelscope_chatglm.openmp import release_workers
    print('\none stream decoding: step ms, median [p10-p90] of 5 steps x 10 rounds, conditions in turns')
    sched = chat.new_engine(max_batch=16)
    rng = random.Random(0)
    sched.submit([rng.randrange(100, 60000) for _ in range(args.prompt_tokens)],
                 chat.sampling(max_new_tokens=10_000, do_sample=False))

    def steps(n):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sched.step()
            out.append(time.perf_counter() - t)
        return out
    orders, results = queue.Queue(), queue.Queue()

    def second_thread():
        while True:
            n = orders.get()
            out = steps(n)
            release_workers()     # its own pool goes before the loading thread computes again
            results.put(out)
    threading.Thread(target=second_thread, daemon=True).start()

    def on_second_thread(n):
        orders.put(n)
        return results.get()
    steps(3)
    times = {'loading thread': [], 'second thread, idle pool': [], 'second thread, released': []}
    for _ in range(10):
        times['loading thread'] += steps(5)            # (re)starts the loading thread's pool
        times['second thread, idle pool'] += on_second_thread(5)
        release_workers()
        times['second thread, released'] += on_second_thread(5)
    for label, t in times.items():
        t = sorted(t)
        print(f'{label:28s} {statistics.median(t) * 1e3:6.1f} ms [{t[len(t) // 10] * 1e3:.1f}-'
              f'{t[9 * len(t) // 10] * 1e3:.1f}]', flush=True)


def steps(chat, args):
    print(f'\ndecode step of 1 and of {args.clients} streams, 5 steps each in turns, 12 rounds')
    rng, scheds = random.Random(0), {}
    for n in (1, args.clients):
        sched = chat.new_engine(max_batch=max(16, n))
        for _ in range(n):
            sched.submit([rng.randrange(100, 60000) for _ in range(args.prompt_tokens)],
                         chat.sampling(max_new_tokens=10_000, do_sample=False))
        while any(s.prefilled < len(s.fill) for s in sched.scheduler.running + list(sched.scheduler.waiting)):
            sched.step()
        scheds[n] = sched
    times, ratios = {n: [] for n in scheds}, []
    for _ in range(12):
        medians = {}
        for n, sched in scheds.items():
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                sched.step()
                ts.append(time.perf_counter() - t)
            times[n] += ts
            medians[n] = statistics.median(ts)
        ratios.append(medians[args.clients] / medians[1])
    for n, t in times.items():
        t = sorted(t)
        print(f'{n:2d} streams: {statistics.median(t) * 1e3:6.1f} ms [p10-p90 {t[len(t) // 10] * 1e3:.1f}-'
              f'{t[9 * len(t) // 10] * 1e3:.1f}]')
    ratios.sort()
    print(f'ratio by round: median {statistics.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]', flush=True)
    for sched in scheds.values():
        sched.scheduler.cancel_all()
        sched.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dir', default='/var/tmp/chatglm2-6b-random', help='full-size checkpoint (built if missing)')
    ap.add_argument('--bits', type=int, choices=[4, 8], default=4)
    ap.add_argument('--int8-activations', action='store_true', help='int8 activations (the default)')
    ap.add_argument('--exact', action='store_true', help='fp32/bf16 activations (int8_activations=False)')
    ap.add_argument('--clients', type=int, default=8)
    ap.add_argument('--prompt-tokens', type=int, default=128)
    ap.add_argument('--new-tokens', type=int, default=64)
    ap.add_argument('--chunks', type=lambda s: [int(c) for c in s.split(',')], default=[128, 64, 32])
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--only', choices=['chunks', 'shared', 'openmp', 'steps'])
    args = ap.parse_args()
    import modelscope_chatglm
    from fullsize import build
    build(args.dir)
    chat = modelscope_chatglm.load(args.dir, device='cpu', quantization_bit=args.bits,
                                   int8_activations=False if args.exact else args.int8_activations or None)
    print(f'{chat} (the mode measured), {torch.get_num_threads()} threads')
    for name, fn in (('chunks', chunks), ('shared', shared), ('openmp', openmp), ('steps', steps)):
        if args.only in (None, name):
            fn(chat, args)


if __name__ == '__main__':
    main()
