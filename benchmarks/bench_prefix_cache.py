"""The prefix cache under a chat service's load: many conversations that open with one long system
prompt, coming back turn after turn, within a KV budget.

--users conversations (ChatGLM3, whose prompts have a system role) share a system prompt of about
--system-tokens tokens. Each runs --turns turns; the users take turns round-robin (every user's turn 1,
then every user's turn 2, ...), --batch at a time, as the server builds them: the next prompt is the
conversation so far (`ChatModel.prepare` / `respond`, the reply decoded and encoded again). The budget
(--budget-tokens pages of K/V, running sequences and prefix cache together) is smaller than all the
conversations' K/V, so the cache must choose what to keep.

Reported, exactly (token counts, not times): prompt tokens, how many were prefilled (the rest came from
the prefix cache), the cache's size in tokens of K/V at the end, and its entries (nodes). Then the time
one cache lookup takes with every conversation cached (median of 200, us).

--hostile: the prefix cache alone (page ids: what it costs does not depend on the model) against the
workloads an abusive client can send: --leaves requests that each cache one token of their own after a
shared 100-token prefix, then one request that needs them all evicted (the time to evict every leaf);
and --depth requests that each branch off one long prompt one token further than the last, so that the
long prompt's path is --depth nodes of one token (each insert, and the lookup that gives a new sequence
the path's pages: a hit copies no K/V).

The model is a tiny random checkpoint with ChatGLM3's real tokenizer layout: which tokens are prefilled
does not depend on the model's width. (On the 2-core CPU a full-size ChatGLM2/3 int4 prefills about
50 tokens/s: bench_serving.py.)

    python benchmarks/bench_prefix_cache.py [--users 24 --turns 3 --system-tokens 1000 --budget-tokens 24000]
    python benchmarks/bench_prefix_cache.py --hostile [--leaves 20000 --depth 2000]
To compare with another version of the package, run the same script with that checkout first on
PYTHONPATH; it prints which package it imported.
"""
import argparse
import os
import random
import statistics
import tempfile
import time

from modelscope_chatglm import openmp

openmp.set_for_this_process()   # before torch loads: what the server's process has (openmp.py)

import modelscope_chatglm  # noqa: E402
from modelscope_chatglm.testing import tiny  # noqa: E402

WORDS = ('river mountain cloud green quiet system model token memory light paper window garden music '
         'number letter silver orange simple future market winter summer street bridge planet forest').split()


def words(n, rng):
    return ' '.join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n))


def hostile(leaves, depth):
    from modelscope_chatglm.engine.kv_pages import PagePool
    from modelscope_chatglm.engine.prefix_cache import PrefixCache

    pool = PagePool(leaves + 200)
    cache, shared = PrefixCache(pool), list(range(1000, 1100))
    shared_pages = pool.take(100)
    t = time.perf_counter()
    for i in range(leaves):
        own = pool.take(2)
        known = cache.insert(shared + [i // 50000, 100000 + i % 50000], shared_pages + own)
        pool.give_back(own[:max(0, known - 100)])    # (positions the tree held already: duplicates)
    inserted = time.perf_counter() - t
    nodes = cache.nodes
    t = time.perf_counter()
    freed = cache.evict(cache.pages)
    print(f'{leaves} one-token leaves after a shared prefix: inserted in {inserted:.2f} s; evicting all '
          f'{nodes} nodes ({freed} pages) took {(time.perf_counter() - t) * 1e3:.0f} ms')

    pool = PagePool(2 * depth + 10)
    cache, long = PrefixCache(pool), list(range(1, depth + 2))
    pages = pool.take(depth + 1)
    cache.insert(long, pages)
    t = time.perf_counter()
    for k in range(1, depth):
        cache.insert(long[:k] + [10 ** 6 + k], pages[:k] + pool.take(1))
    inserted = time.perf_counter() - t
    t = time.perf_counter()
    n, path_pages, node = cache.match(long + [0])
    matched = time.perf_counter() - t
    assert path_pages == pages and n == depth + 1
    print(f'a {depth + 1}-token prompt split by {depth - 1} requests into a path of {cache.nodes - depth + 1} '
          f'nodes: {inserted / (depth - 1) * 1e3:.3f} ms per insert, lookup {matched * 1e3:.1f} ms (its '
          f'{n} pages shared, no K/V copied)')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--users', type=int, default=24)
    ap.add_argument('--turns', type=int, default=3)
    ap.add_argument('--system-tokens', type=int, default=1000)
    ap.add_argument('--budget-tokens', type=int, default=24000)
    ap.add_argument('--batch', type=int, default=8, help='conversations served at once')
    ap.add_argument('--new-tokens', type=int, default=32)
    ap.add_argument('--hostile', action='store_true', help='the abusive workloads (see above) instead')
    ap.add_argument('--leaves', type=int, default=20000)
    ap.add_argument('--depth', type=int, default=2000)
    args = ap.parse_args()
    print(f'package: {modelscope_chatglm.__file__}')
    if args.hostile:
        return hostile(args.leaves, args.depth)
    chat = modelscope_chatglm.load(tiny.build(tempfile.mkdtemp(prefix='bench-prefix-'), 'glm3', seq_length=32768),
                                   device='cpu', dtype='float32')
    rng = random.Random(0)
    system = words(1, rng)
    while len(chat.build_inputs('hi', system=system)) < args.system_tokens:
        system += ' ' + words(20, rng)
    per_token = chat.new_engine(kv_cache_bytes=1 << 20).scheduler.bytes_per_token
    sched = chat.new_engine(max_batch=args.batch, kv_cache_bytes=per_token * args.budget_tokens)
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
    snap = sched.scheduler.snapshot()
    cached = snap['kv_prefix_cache_bytes'] / sched.scheduler.bytes_per_token
    print(f'{args.users} conversations x {args.turns} turns, system prompt {args.system_tokens} tokens, '
          f'KV budget {args.budget_tokens} tokens, {args.batch} at a time')
    print(f'prompt tokens {prompt_tokens}, prefilled {prefilled} ({prefilled / prompt_tokens:.1%}), '
          f'from the cache {prompt_tokens - prefilled}; cache at the end: {cached:.0f} tokens of K/V in '
          f'{snap["prefix_cache_entries"]:.0f} entries; preempted {snap["preempted"]:.0f}')

    # One lookup with every conversation cached (a budget that evicts nothing).
    sched = chat.new_engine(max_batch=args.batch, kv_cache_bytes=per_token * 10 ** 6)   # (evicts nothing)
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
        keep = sched.scheduler._longest_prefix(probe)[0]
        times.append(time.perf_counter() - t)
    times.sort()
    print(f'lookup with {args.users} conversations cached ({sched.scheduler.snapshot()["prefix_cache_entries"]:.0f} entries), '
          f'a {len(probe.fill)}-token prompt ({keep} cached): {statistics.median(times) * 1e6:.0f} us '
          f'[p10 {times[20] * 1e6:.0f} - p90 {times[180] * 1e6:.0f}]')


if __name__ == '__main__':
    main()
