"""The prefix cache under a chat service's load: many conversations that open with one long system
prompt, coming back turn after turn, within a KV budget.

--users conversations (ChatGLM3, whose prompts have a system role) share a system prompt of about
--system-tokens tokens. Each runs --turns turns; the users take turns round-robin (every user's turn 1,
then every user's turn 2, ...), --batch at a time, as the server builds them: the next prompt is the
conversation so far (`ChatModel.prepare` / `respond`, the reply decoded and encoded again). The budget
(--budget-tokens of K/V, running sequences and prefix cache together) is smaller than all the
conversations' K/V, so the cache must choose what to keep.

Reported, exactly (token counts, not times): prompt tokens, how many were prefilled (the rest came from
the prefix cache), the cache's size in tokens of K/V at the end, and its entries (nodes). Then the time
one cache lookup takes with every conversation cached (median of 200, us).

The model is a tiny random checkpoint with ChatGLM3's real tokenizer layout: which tokens are prefilled
does not depend on the model's width. (On the 2-core CPU a full-size ChatGLM2/3 int4 prefills about
50 tokens/s: bench_serving.py.)

    python benchmarks/bench_prefix_cache.py [--users 24 --turns 3 --system-tokens 1000 --budget-tokens 24000]
To compare with another version of the package, run the same script with that checkout first on
PYTHONPATH; it prints which package it imported.
"""
import argparse
import random
import statistics
import tempfile
import time

import modelscope_chatglm
from modelscope_chatglm import tiny

WORDS = ('river mountain cloud green quiet system model token memory light paper window garden music '
         'number letter silver orange simple future market winter summer street bridge planet forest').split()


def words(n, rng):
    return ' '.join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--users', type=int, default=24)
    ap.add_argument('--turns', type=int, default=3)
    ap.add_argument('--system-tokens', type=int, default=1000)
    ap.add_argument('--budget-tokens', type=int, default=24000)
    ap.add_argument('--batch', type=int, default=8, help='conversations served at once')
    ap.add_argument('--new-tokens', type=int, default=32)
    args = ap.parse_args()
    print(f'package: {modelscope_chatglm.__file__}')
    chat = modelscope_chatglm.load(tiny.build(tempfile.mkdtemp(prefix='bench-prefix-'), 'glm3', seq_length=32768),
                                   device='cpu', dtype='float32')
    rng = random.Random(0)
    system = words(1, rng)
    while len(chat.build_inputs('hi', system=system)) < args.system_tokens:
        system += ' ' + words(20, rng)
    sched = chat.scheduler(max_batch=args.batch, kv_cache_bytes=None)
    sched.budget = sched.kv_bytes(args.budget_tokens)
    histories = [None] * args.users
    prompt_tokens = prefilled = 0
    for turn in range(args.turns):
        for first in range(0, args.users, args.batch):
            users = range(first, min(first + args.batch, args.users))
            requests = {u: chat.prepare(f'user {u}, turn {turn}: {words(12, rng)}', histories[u],
                                        system=system if histories[u] is None else None,
                                        max_new_tokens=args.new_tokens, do_sample=False) for u in users}
            seqs = {u: sched.submit(r.input_ids, r.params) for u, r in requests.items()}
            sched.run_until_done(list(seqs.values()))
            for u, seq in seqs.items():
                _, histories[u] = chat.respond(requests[u], seq.output)
                prompt_tokens += len(seq.prompt)
                prefilled += len(seq.prompt) - seq.reused
    snap = sched.snapshot()
    cached = snap['kv_prefix_cache_bytes'] / sched.bytes_per_token
    print(f'{args.users} conversations x {args.turns} turns, system prompt {args.system_tokens} tokens, '
          f'KV budget {args.budget_tokens} tokens, {args.batch} at a time')
    print(f'prompt tokens {prompt_tokens}, prefilled {prefilled} ({prefilled / prompt_tokens:.1%}), '
          f'from the cache {prompt_tokens - prefilled}; cache at the end: {cached:.0f} tokens of K/V in '
          f'{snap["prefix_cache_entries"]:.0f} entries; preempted {snap["preempted"]:.0f}')

    # One lookup with every conversation cached (a budget that evicts nothing).
    sched = chat.scheduler(max_batch=args.batch, kv_cache_bytes=None)
    sched.budget = 10 ** 15
    conversations = [histories[u] for u in range(args.users)]
    for first in range(0, args.users, args.batch):
        seqs = [sched.submit(chat.prepare('one more', h, max_new_tokens=4, do_sample=False).input_ids,
                             chat.sampling(max_new_tokens=4, do_sample=False)) for h in conversations[first:first + args.batch]]
        sched.run_until_done(seqs)
    probe = type(seqs[0])(chat.prepare('and now?', conversations[0], max_new_tokens=4).input_ids,
                          chat.sampling(max_new_tokens=4))
    times = []
    for _ in range(200):
        t = time.perf_counter()
        keep = sched._longest_prefix(probe)[0]
        times.append(time.perf_counter() - t)
    times.sort()
    print(f'lookup with {args.users} conversations cached ({sched.snapshot()["prefix_cache_entries"]:.0f} entries), '
          f'a {len(probe.fill)}-token prompt ({keep} cached): {statistics.median(times) * 1e6:.0f} us '
          f'[p10 {times[20] * 1e6:.0f} - p90 {times[180] * 1e6:.0f}]')


if __name__ == '__main__':
    main()
