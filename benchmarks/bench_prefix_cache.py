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

--hostile: the prefix cache alone, with ChatGLM2/3-6B's K/V shapes (28 layers, 2 groups of 128, bf16),
against the workloads an abusive client can send: --leaves requests that each cache one token of their
own after a shared 100-token prefix, then one request that needs them all evicted (the time to evict
every leaf); and --depth requests that each branch off one long prompt one token further than the last,
so that the long prompt's path is --depth nodes of one token (each insert, the lookup, and copying the
path's K/V into a sequence's cache).

--replay N: the K/V allocations of N requests as the server makes them (200 conversations, half opening
with a 1,000-token system prompt; per request a cache for its prompt and 256 tokens, grown when its
reply is longer, the prefix cache's copy of its new tokens, then the cache freed), the prefix cache held
to --replay-gib: resident memory against the cache's bytes every 500 requests. --malloc serves every
K/V buffer from malloc instead of mapping the large ones (kv_cache.new_buffer), for comparison.

The model is a tiny random checkpoint with ChatGLM3's real tokenizer layout: which tokens are prefilled
does not depend on the model's width. (On the 2-core CPU a full-size ChatGLM2/3 int4 prefills about
50 tokens/s: bench_serving.py.)

    python benchmarks/bench_prefix_cache.py [--users 24 --turns 3 --system-tokens 1000 --budget-tokens 24000]
    python benchmarks/bench_prefix_cache.py --hostile [--leaves 20000 --depth 2000]
    python benchmarks/bench_prefix_cache.py --replay 3000 [--malloc]
To compare with another version of the package, run the same script with that checkout first on
PYTHONPATH; it prints which package it imported.
"""
import argparse
import os
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


def hostile(leaves, depth):
    import torch
    from modelscope_chatglm.models.kv_cache import KVCache, KVSegment
    from modelscope_chatglm.engine.prefix_cache import PrefixCache

    def kv(tokens):   # a finished sequence's K/V of that many positions, in a cache's memory
        cache = KVCache(28, 1, 2, tokens, 128, torch.bfloat16, 'cpu')
        cache.k_all.zero_(), cache.v_all.zero_()
        return KVSegment.of(cache, 0, tokens)

    cache, shared, finished = PrefixCache(), list(range(1000, 1100)), kv(102)
    t = time.perf_counter()
    for i in range(leaves):
        cache.insert(shared + [i // 50000, 100000 + i % 50000], finished)
    inserted = time.perf_counter() - t
    t = time.perf_counter()
    evicted = 0
    while cache.evict_oldest():
        evicted += 1
    print(f'{leaves} one-token leaves after a shared prefix: inserted in {inserted:.2f} s; evicting all '
          f'{evicted} nodes took {(time.perf_counter() - t) * 1e3:.0f} ms')

    cache, long = PrefixCache(), list(range(1, depth + 2))
    whole = kv(depth + 1)
    cache.insert(long, whole)
    t = time.perf_counter()
    for k in range(1, depth):
        cache.insert(long[:k] + [10 ** 6 + k], whole.slice(0, k + 1))
    inserted = time.perf_counter() - t
    t = time.perf_counter()
    n, segments = cache.match(long + [0])
    matched = time.perf_counter() - t
    target = KVCache(28, 1, 2, depth + 2, 128, torch.bfloat16, 'cpu')
    t = time.perf_counter()
    target.copy_prefix(segments, 0, n)
    copied = time.perf_counter() - t
    print(f'a {depth + 1}-token prompt split by {depth - 1} requests into a path of {len(segments)} nodes: '
          f'{inserted / (depth - 1) * 1e3:.2f} ms per insert, lookup {matched * 1e3:.1f} ms, copying its '
          f'K/V {copied * 1e3:.0f} ms')
    rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    print(f'resident memory now: {rss / 2**30:.2f} GiB')


def replay(requests, budget_gib, use_malloc):
    import torch
    from modelscope_chatglm.models import kv_cache
    from modelscope_chatglm.models.kv_cache import KVCache, KVSegment
    from modelscope_chatglm.engine.prefix_cache import PrefixCache
    # What a mapped buffer costs: its pages fault in on first write (malloc maps buffers over 32 MB too).
    src, times = torch.ones(21 << 20, dtype=torch.bfloat16), {'mapped': [], 'malloc': []}
    for _ in range(30):
        for name, make in (('mapped', kv_cache.new_buffer), ('malloc', torch.empty)):
            t = time.perf_counter()
            make(src.shape, torch.bfloat16, 'cpu').copy_(src) if name == 'mapped' else \
                make(src.shape, dtype=torch.bfloat16).copy_(src)
            times[name].append(time.perf_counter() - t)
    print('allocate and write 42 MB, median of 30 in turns: ' + ', '.join(
        f'{name} {statistics.median(ts) * 1e3:.1f} ms' for name, ts in times.items()))
    if use_malloc:
        kv_cache.MAPPED_BYTES = float('inf')
    rng, cache, conversations = random.Random(0), PrefixCache(), {}
    system = [rng.randrange(60000) for _ in range(1000)]

    def tokens(n):
        return [rng.randrange(60000) for _ in range(n)]
    for i in range(requests):
        user = rng.randrange(200)
        history = conversations.get(user) or (system if rng.random() < 0.5 else [])
        prompt = history + tokens(rng.randrange(20, 400))
        n, segments = cache.match(prompt)
        kv = KVCache(28, 1, 2, len(prompt) + 256, 128, torch.bfloat16, 'cpu')
        kv.copy_prefix(segments, 0, n)
        kv.k_all[:, :, :, n:len(prompt)] = 1        # its prefill writes the rest
        kv.v_all[:, :, :, n:len(prompt)] = 1
        reply = rng.randrange(10, 600)
        kv.reserve(len(prompt) + reply, block=1)
        kv.k_all[:, :, :, len(prompt):] = 1
        kv.v_all[:, :, :, len(prompt):] = 1
        conversations[user] = prompt + tokens(reply - 1)
        cache.insert(conversations[user], KVSegment.of(kv, 0, len(conversations[user])))
        while cache.nbytes > budget_gib * 2**30 and cache.evict_oldest():
            pass
        del kv
        if (i + 1) % 500 == 0:
            rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
            print(f'{i + 1} requests: resident {rss / 2**30:.2f} GiB, prefix cache {cache.nbytes / 2**30:.2f} GiB '
                  f'in {cache.nodes} nodes', flush=True)


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
    ap.add_argument('--replay', type=int, default=0, help='replay the K/V allocations of this many requests')
    ap.add_argument('--replay-gib', type=float, default=2.0)
    ap.add_argument('--malloc', action='store_true', help='with --replay: every K/V buffer from malloc')
    args = ap.parse_args()
    print(f'package: {modelscope_chatglm.__file__}')
    if args.hostile:
        return hostile(args.leaves, args.depth)
    if args.replay:
        return replay(args.replay, args.replay_gib, args.malloc)
    chat = modelscope_chatglm.load(tiny.build(tempfile.mkdtemp(prefix='bench-prefix-'), 'glm3', seq_length=32768),
                                   device='cpu', dtype='float32')
    rng = random.Random(0)
    system = words(1, rng)
    while len(chat.build_inputs('hi', system=system)) < args.system_tokens:
        system += ' ' + words(20, rng)
    sched = chat.new_engine(max_batch=args.batch, kv_cache_bytes=None)
    sched.scheduler.budget = sched.scheduler.kv_bytes(args.budget_tokens)
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
    sched = chat.new_engine(max_batch=args.batch, kv_cache_bytes=None)
    sched.scheduler.budget = 10 ** 15
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
