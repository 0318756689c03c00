"""Continuous batching (engine/scheduler.py, through the engine): sequences decoded together give
what each gives alone; the prefix cache, the KV budget, cancellation, seeded sampling, chat_batch
and list inputs to the pipeline."""
import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.engine.kv_pages import PagePool
from modelscope_chatglm.engine.prefix_cache import PrefixCache, common_prefix
from modelscope_chatglm.engine.scheduler import KVBudgetError
from modelscope_chatglm.loading import default_dtype
from modelscope_chatglm.models.kv_cache import PagedKV

QUERIES = ['你好', 'hello world, how are you today?', 'a b c d e f g h i j k l m n o p', 'x', '介绍下清华大学']


@pytest.fixture(scope='module')
def models(glm1_model, glm2_model, glm3_model, make_checkpoint):
    quantized = {f'glm{v}-int{bits}': modelscope_chatglm.load(
        make_checkpoint(f'glm{v}-int{bits}', f'glm{v}', 'safetensors', shards=1, quantization_bit=bits),
        device='cpu', dtype='float32', int8_activations=False) for v, bits in ((2, 4), (3, 8))}
    x8 = modelscope_chatglm.load(make_checkpoint('glm2-int4', 'glm2', 'safetensors', shards=1, quantization_bit=4),
                                 device='cpu', dtype='float32', int8_activations=True)
    return {'glm1': glm1_model, 'glm2': glm2_model, 'glm3': glm3_model, **quantized, 'glm2-int4-x8': x8}


def solo(chat, prompt, n, **gen):
    return chat.generate(prompt, max_new_tokens=n, **dict(dict(do_sample=False), **gen))


def run(sched, prompts, params):
    seqs = [sched.submit(p, params) for p in prompts]
    sched.run_until_done(seqs)
    return seqs


def held_by_running(sched) -> int:
    """Pages that running sequences hold of their own (not the prefix cache's), checked against the pool:
    every page is free, the prefix cache's, a running sequence's own, or the P-tuning prefix's."""
    scheduler = scheduler_of(sched)
    own = sum(len(s.table) - s.cached + len(s.pending) for s in scheduler.running)
    cached = scheduler.prefix_cache.pages if scheduler.prefix_cache else 0
    assert scheduler.pages.free + cached + own + len(scheduler.pages.reserved) == scheduler.pages.pages
    return own


def scheduler_of(sched):
    return sched.scheduler


@pytest.mark.parametrize('name', ['glm1', 'glm2', 'glm3', 'glm2-int4', 'glm3-int8', 'glm2-int4-x8'])
def test_batched_greedy_equals_each_alone(models, name):
    chat = models[name]
    prompts = [chat.build_inputs(q) for q in QUERIES]
    # Two at a time and 5-token prefill chunks: sequences join and leave the batch mid-way, and prompts
    # are spread over several steps beside the decode tokens.
    sched = chat.new_engine(max_batch=2, prefill_chunk=5)
    budgets = [24, 9, 17, 30, 5]
    seqs = [sched.submit(p, chat.sampling(max_new_tokens=n, do_sample=False)) for p, n in zip(prompts, budgets)]
    forwards, most_running = [], 0     # by step: what each forward held ({'prompt', 'decode'})
    execute = sched.runner.execute
    sched.runner.execute = lambda forward: (forwards[-1].append(part_kinds(forward)) or execute(forward))
    while not all(s.finished for s in seqs):
        forwards.append([])
        sched.step()
        most_running = max(most_running, len(sched.scheduler.running))
    assert most_running == 2
    for seq, prompt, n in zip(seqs, prompts, budgets):
        assert seq.output == solo(chat, prompt, n), name
        assert seq.finish_reason in ('stop', 'length')
    assert held_by_running(sched) == 0 and not sched.scheduler.running
    # The quantized models' CPU kernels keep each row's bits at any batch: a prompt chunk and a decode
    # token share a forward. A float model's matmuls do not: they run as two forwards of a step.
    shared = sum(f == {'prompt', 'decode'} for step in forwards for f in step)
    two_forwards = sum(len(step) == 2 for step in forwards)
    if 'int' in name:
        assert shared and two_forwards == 0, forwards
    else:
        assert not shared and two_forwards > 0, forwards


def part_kinds(forward):
    """{'prompt', 'decode'}: what the parts of a forward are."""
    return {'prompt' if row < forward.prompt_parts else 'decode' for row in range(len(forward.parts))}


def test_only_rows_that_keep_their_bits_share_a_forward(models):
    """The exact kernel runs up to 64 rows of fp32 x (longer inputs take dequantized tiles + matmul), the
    int8-activation kernel any number; float models go through torch's matmul."""
    assert models['glm2-int4'].model.rows_keep_their_bits(64)
    assert not models['glm2-int4'].model.rows_keep_their_bits(65)
    assert models['glm2-int4-x8'].model.rows_keep_their_bits(4096)
    assert not models['glm2'].model.rows_keep_their_bits(1)
    assert not models['glm1'].model.rows_keep_their_bits(1)


def test_max_batch_one_is_serial_and_batching_takes_fewer_steps(glm2_model):
    prompts = [glm2_model.build_inputs(q) for q in QUERIES]
    params = glm2_model.sampling(max_new_tokens=12, do_sample=False)
    serial, batched = glm2_model.new_engine(max_batch=1), glm2_model.new_engine(max_batch=8)
    outputs = [[s.output for s in run(sched, prompts, params)] for sched in (serial, batched)]
    assert outputs[0] == outputs[1]
    # A step prefills (giving the first token) and then decodes: 11 steps per request one at a time,
    # about one request's worth together.
    assert serial.scheduler.stats['steps'] >= 5 * 11 and batched.scheduler.stats['steps'] <= 13


def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_prefill(glm2_model):
    model = glm2_model.model
    first = glm2_model.build_inputs('hello world, how are you today?')
    sched = glm2_model.new_engine()
    seq = run(sched, [first], glm2_model.sampling(max_new_tokens=6, do_sample=False))[0]
    follow = first + seq.output[:-1] + glm2_model.tokenizer.encode('and then?')
    scheduler = sched.scheduler
    with torch.inference_mode():
        keep, pages, _ = scheduler._longest_prefix(type(seq)(follow, seq.params))
        assert keep == len(first) + len(seq.output) - 1
        new = scheduler.pages.take(len(follow) - keep)
        kv = PagedKV.build(sched.runner.kv.pool, [torch.tensor(pages[:keep] + new, dtype=torch.int32)], [len(follow) - keep])
        warm = model.forward_ragged([(None, keep, follow[keep:])], kv)[0]
        scheduler.pages.give_back(new)
        cold = model.full_logits(torch.tensor([follow]), None)[0, -1]
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-5)
    # Through the scheduler: the returning turn prefills only its new tokens, same greedy reply, and its
    # page table starts with turn 1's pages (a hit copies nothing).
    tables = []
    again = scheduler.submit(follow, glm2_model.sampling(max_new_tokens=10, do_sample=False),
                             on_token=lambda s, _: tables.append(s.table.pages()) and False)
    sched.run_until_done([again])
    assert again.reused == keep and again.output == solo(glm2_model, follow, 10)
    assert tables[0][:keep] == pages[:keep]
    # Turn 2's K/V extend turn 1's node (in place): nothing is held twice.
    assert scheduler.prefix_cache.pages == len(follow) + len(again.output) - 1
    assert scheduler.prefix_cache.nodes == 1 and held_by_running(sched) == 0


@pytest.fixture(scope='module', params=sorted({'float32', default_dtype(torch.device('cpu'), quantized=True)}))
def quantized_at(request, make_checkpoint):
    """The quantized models in float32 and in this CPU's default dtype for them (bfloat16 where its matrix
    units multiply bf16 natively)."""
    dtype = request.param
    load = modelscope_chatglm.load
    return {f'glm{v}-int{bits}': load(make_checkpoint(f'glm{v}-int{bits}', f'glm{v}', 'safetensors', shards=1,
                                                      quantization_bit=bits), device='cpu', dtype=dtype,
                   int8_activations=False)
            for v, bits in ((2, 4), (3, 8), (2, 8), (3, 4))} | {
        'glm2-int4-x8': load(make_checkpoint('glm2-int4', 'glm2', 'safetensors', shards=1, quantization_bit=4),
                             device='cpu', dtype=dtype, int8_activations=True)}


@pytest.mark.parametrize('name', ['glm2-int4', 'glm3-int8', 'glm2-int8', 'glm3-int4', 'glm2-int4-x8'])
def test_greedy_replies_do_not_depend_on_the_prefix_cache(quantized_at, name):
    """50 prompts that open alike: prefilled cold, every row of a long prompt goes through dequantized
    tiles; warm, the opening comes from the prefix cache and the rest through the decode kernel. Both
    multiply x by the same integer weights, round the sums alike and scale them, so the replies are
    the same; with int8 activations every row takes the integer kernel. In bfloat16 the decode kernel
    rounded its sums once where the tiles round twice, and 2 of 50 replies differed."""
    chat = quantized_at[name]
    opening = ' '.join(f'rule {i}: answer briefly.' for i in range(12))
    prompts = [chat.build_inputs(f'{opening} question {i}: {QUERIES[i % 5]} {i * 7}') for i in range(50)]
    params = chat.sampling(max_new_tokens=6, do_sample=False)
    warm = chat.new_engine(max_batch=8)
    run(warm, [prompts[0]], params)                     # caches the opening
    warm_seqs = run(warm, prompts, params)
    assert all(s.reused > 64 and len(p) - s.reused <= 64 for s, p in zip(warm_seqs, prompts))
    cold = [run(chat.new_engine(max_batch=1), [p], params)[0] for p in prompts]
    assert all(s.reused == 0 and len(p) > 64 for s, p in zip(cold, prompts))
    assert [s.output for s in warm_seqs] == [s.output for s in cold]


def test_a_shared_system_prompt_is_prefilled_once(glm3_model):
    system = ' '.join(f'rule {i}: be kind.' for i in range(40))
    prompts = [glm3_model.build_inputs(q, system=system) for q in QUERIES[:4]]
    shared = min(len(p) for p in prompts)
    while len({tuple(p[:shared]) for p in prompts}) > 1:
        shared -= 1
    assert shared > 100
    sched = glm3_model.new_engine(max_batch=8, prefill_chunk=64)
    seqs = run(sched, prompts, glm3_model.sampling(max_new_tokens=8, do_sample=False))
    # All four arrive together; the first prefills the system prompt, the others wait for it and copy.
    assert [s.reused >= shared - 1 for s in seqs] == [False, True, True, True]
    assert sched.scheduler.stats['prompt_tokens'] - sched.scheduler.stats['cached_prompt_tokens'] < sum(len(p) for p in prompts) - 2 * shared
    for seq, prompt in zip(seqs, prompts):
        assert seq.output == solo(glm3_model, prompt, 8)
    # Finished, the four conversations' K/V hold the system prompt once: a node they all branch off.
    kept = [p + s.output[:-1] for p, s in zip(prompts, seqs)]
    assert sched.scheduler.prefix_cache.pages == trie_size(kept)
    assert sched.scheduler.prefix_cache.pages < sum(map(len, kept)) - 2 * shared
    # Each comes back for a second turn: all of its history is served, from the shared node and its own.
    follows = [k + s.output[-1:] + glm3_model.tokenizer.encode('and then?') for k, s in zip(kept, seqs)]
    again = run(sched, follows, glm3_model.sampling(max_new_tokens=6, do_sample=False))
    assert [s.reused for s in again] == [len(k) for k in kept]
    for seq, follow in zip(again, follows):
        assert seq.output == solo(glm3_model, follow, 6)


def test_a_ptuning_model_shares_what_follows_its_learned_prefix(make_checkpoint):
    """Every page table of a P-tuning model opens with the learned prefix's pages (written once, when the
    engine starts); the prefix cache keeps only the positions after it."""
    chat = modelscope_chatglm.load(make_checkpoint('glm2-prefix', 'glm2', 'bin', shards=2, seed=3, pre_seq_len=4),
                                   device='cpu', dtype='float32')
    first = chat.build_inputs('hello world, how are you today?')
    sched = chat.new_engine()
    seq = run(sched, [first], chat.sampling(max_new_tokens=6, do_sample=False))[0]
    kept = first + seq.output[:-1]
    assert sched.scheduler.pre == 4 and sched.scheduler.prefix_cache.pages == len(kept)
    follow = kept + seq.output[-1:] + chat.tokenizer.encode('and then?')
    again = run(sched, [follow], chat.sampling(max_new_tokens=8, do_sample=False))[0]
    assert again.reused == len(kept) and again.output == solo(chat, follow, 8)


def trie_size(token_lists):
    """Positions a radix tree of these token lists holds: each list's tokens past its longest common
    prefix with the lists before it."""
    return sum(len(t) - max([common_prefix(t, u) for u in token_lists[:i]], default=0)
               for i, t in enumerate(token_lists))


def pages_of(tokens):
    """Each token's K/V in the page numbered after it (so that where a page went can be traced)."""
    return list(tokens)


def test_the_radix_tree_keeps_a_shared_prefix_once_and_evicts_the_least_recently_used_unlocked_leaf():
    pool = PagePool(200)
    assert pool.take(200) == list(range(200))         # (the pages the test hands the tree are taken)
    cache = PrefixCache(pool)
    a = list(range(1, 11))
    b = a[:5] + [20, 21, 22]
    assert cache.insert(a, pages_of(a)) == 0
    assert cache.insert(b, pages_of(b)) == 5                  # splits a's node after 5 tokens
    assert cache.nodes == 3 and cache.pages == 13
    assert cache.insert(a[:7], pages_of(a[:7])) == 7          # a prefix of what is held: nothing new
    for tokens, held in ((a + [99], 10), (b + [99], 8), (a[:7] + [50], 7), (a[:3], 3)):
        n, pages, node = cache.match(tokens)
        assert n == held and pages == pages_of(tokens[:n])    # the pages of exactly those tokens, in order
    assert cache.match([7, 8, 9])[:2] == (0, []) and cache.match(a, namespace=('lora', None))[0] == 0
    # A locked path is never evicted; unlocked, least recently used leaf first, and the shared head goes
    # only once no branch is left. Evicted pages go back to the pool.
    _, _, b_node = cache.match(b)
    cache.lock(b_node)
    assert cache.locked == 8 and cache.evictable == cache.pages - 8
    assert cache.evict(1) == 3 and pool.free == 3             # a's tail, 8 9 10 (b's path is locked)
    assert cache.evict(100) == 2 and pool.free == 5           # then 6 7; what is left is b's path
    assert cache.match(b)[0] == 8 and cache.pages == 8 and cache.evict(100) == 0
    cache.unlock(b_node)
    assert cache.evict(100) == 8 and cache.pages == 0 and cache.nodes == 0 and cache.match(a)[:2] == (0, [])
    assert sorted(pool.take(13)) == sorted(set(a + b))       # every page back in the pool, once


def test_the_eviction_heap_stays_bounded_while_leaves_are_used():
    """Each use of a leaf queues it again for eviction; the stale entries are dropped before they
    outgrow the leaves, and the order stays least recently used first."""
    pool = PagePool(1000)
    pool.take(1000)
    cache = PrefixCache(pool)
    for j in range(10):
        cache.insert([1, 2, 3, 100 + j], pages_of([1, 2, 3, 100 + j]))
    for r in range(1000):
        assert cache.match([1, 2, 3, 100 + r % 10, 7])[0] == 4
        assert len(cache._heap) <= 2 * 10 + 65
    for _ in range(3):
        cache.evict(1)
    assert [cache.match([1, 2, 3, 100 + j])[0] for j in range(5)] == [3, 3, 3, 4, 4]


def test_common_prefix():
    assert [common_prefix(x, y) for x, y in ((list(range(100)), list(range(100))), ([1, 2, 3], [1, 2, 4]),
                                             ([], [1]), ([5] * 64 + [1], [5] * 64 + [2]), ([1], [2]))] == [100, 2, 0, 64, 0]


def test_chatglm6b_batches_but_never_shares_prefixes(glm1_model):
    prompt = glm1_model.build_inputs('hello world, how are you today?')
    sched = glm1_model.new_engine()
    run(sched, [prompt, prompt], glm1_model.sampling(max_new_tokens=4, do_sample=False))
    assert sched.scheduler.prefix_cache is None and sched.scheduler.stats['cached_prompt_tokens'] == 0


def test_the_kv_budget_holds_under_a_burst_of_long_prompts(glm2_model):
    prompts = [glm2_model.build_inputs(f'{i} ' + f'{q} ' * 30) for i, q in enumerate(QUERIES * 2)]   # (no shared prefixes)
    params = glm2_model.sampling(max_new_tokens=16, do_sample=False)
    probe = glm2_model.new_engine()
    per_request = max(probe.scheduler.kv_bytes(len(p) + 16) for p in prompts)
    sched = glm2_model.new_engine(max_batch=16, kv_cache_bytes=int(per_request * 2.5))
    seqs = [sched.submit(p, params) for p in prompts]
    most_running, most_waiting = 0, 0
    while not all(s.finished for s in seqs):
        sched.step()
        held_by_running(sched)      # every page accounted for
        most_running, most_waiting = max(most_running, len(sched.scheduler.running)), max(most_waiting, len(sched.scheduler.waiting))
    assert 2 <= most_running < len(prompts) and most_waiting >= len(prompts) - most_running   # they waited for room
    assert [s.output for s in seqs] == [solo(glm2_model, p, 16) for p in prompts]
    with pytest.raises(KVBudgetError, match='kv-cache-gb'):
        sched.submit(prompts[0], glm2_model.sampling(max_new_tokens=4000, do_sample=False))


@pytest.mark.parametrize('name', ['glm1', 'glm2'])
def test_caches_grow_as_needed_and_a_full_budget_preempts_the_newest(models, name):
    """Sequences take a page per token; when the pool has none left, the newest sequence is preempted (its
    pages freed, what it computed kept in the prefix cache while it lasts) and every reply is still the one
    it gets alone."""
    chat = models[name]
    prompts = [chat.build_inputs(q) for q in QUERIES[:4]]
    params = chat.sampling(max_new_tokens=40, do_sample=False)
    probe = chat.new_engine()
    sched = chat.new_engine(kv_cache_bytes=probe.scheduler.kv_bytes(2 * max(len(p) for p in prompts) + 60))
    sched.scheduler.GROW_TOKENS = 4
    seqs = [sched.submit(p, params) for p in prompts]
    lengths = set()
    while not all(s.finished for s in seqs):
        sched.step()
        held_by_running(sched)
        lengths |= {len(s.table) for s in sched.scheduler.running}
    assert len(lengths) > 40 and sched.scheduler.stats['preempted'] > 0
    assert [s.output for s in seqs] == [solo(chat, p, 40) for p in prompts]
    assert sched.scheduler.stats['prompt_tokens'] == sum(len(p) for p in prompts)   # a preempted one is not new


def test_cancelling_mid_batch_frees_its_memory_at_once(glm2_model):
    prompts = [glm2_model.build_inputs(q) for q in QUERIES[:3]]
    params = glm2_model.sampling(max_new_tokens=20, do_sample=False)
    sched = glm2_model.new_engine()
    seqs = [sched.submit(p, params) for p in prompts]
    for _ in range(4):
        sched.step()
    assert len(sched.scheduler.running) == 3
    before, freed = held_by_running(sched), len(seqs[1].table) - seqs[1].cached + len(seqs[1].pending)
    seqs[1].cancel()
    sched.scheduler.drop_cancelled()
    assert freed > 0 and held_by_running(sched) == before - freed
    assert seqs[1].finish_reason == 'cancelled' and seqs[1] not in sched.scheduler.running
    sched.run_until_done(seqs)
    assert seqs[0].output == solo(glm2_model, prompts[0], 20) and seqs[2].output == solo(glm2_model, prompts[2], 20)
    # The cache holds the other two (their common opening once) and the cancelled one's prompt, which was
    # computed before it was cancelled; nothing of its own pages is left.
    kept = [prompts[i] + seqs[i].output[:-1] for i in (0, 2)] + [prompts[1]]
    assert sched.scheduler.prefix_cache.pages == trie_size(kept)


def test_seeded_sampling_is_the_same_alone_and_batched(glm3_model):
    prompts = [glm3_model.build_inputs(q) for q in QUERIES[:4]]
    gen = dict(do_sample=True, temperature=0.9, top_p=0.8, top_k=40, repetition_penalty=1.1)
    alone = [solo(glm3_model, p, 12, seed=100 + i, **gen) for i, p in enumerate(prompts)]
    sched = glm3_model.new_engine()
    seqs = [sched.submit(p, glm3_model.sampling(max_new_tokens=12, seed=100 + i, **gen)) for i, p in enumerate(prompts)]
    sched.run_until_done(seqs)
    assert [s.output for s in seqs] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_a_failing_consumer_ends_only_its_own_sequence(glm2_model):
    prompts = [glm2_model.build_inputs(q) for q in QUERIES[:2]]
    params = glm2_model.sampling(max_new_tokens=6, do_sample=False)
    sched = glm2_model.new_engine()

    def explode(seq, token):
        raise RuntimeError('consumer went away')
    bad = sched.submit(prompts[0], params, on_token=explode)
    good = sched.submit(prompts[1], params)
    sched.run_until_done([bad, good])
    assert bad.finish_reason == 'error' and 'went away' in str(bad.error)
    assert good.output == solo(glm2_model, prompts[1], 6) and held_by_running(sched) == 0


def test_a_sequence_whose_sampling_fails_ends_and_the_scheduler_goes_idle(glm2_model):
    """Parameters that pass no validation fail at submit; ones broken after it (a caller's bug) end
    their own sequence with the error. Such a sequence used to stay running with no next token and
    nothing to prefill: the server's engine thread stepped it 14 million times a minute."""
    from dataclasses import replace
    prompts = [glm2_model.build_inputs(q) for q in QUERIES[:2]]
    params = glm2_model.sampling(max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)
    sched = glm2_model.new_engine()
    with pytest.raises(ValueError, match='temperature must be finite'):
        sched.submit(prompts[0], replace(params, temperature=float('nan')))
    bad, good = sched.submit(prompts[0], params), sched.submit(prompts[1], params)
    bad.params = replace(params, repetition_penalty=0.0)   # logits / 0: inf, then inf - inf
    sched.run_until_done([bad, good])
    assert bad.finish_reason == 'error' and 'probability tensor' in str(bad.error)
    assert good.output == solo(glm2_model, prompts[1], 6, do_sample=True, temperature=0.7, seed=3)
    assert not sched.scheduler.has_work() and held_by_running(sched) == 0


def test_scheduler_rejects_bad_settings(glm2_model):
    for kwargs in (dict(max_batch=0), dict(prefill_chunk=0)):
        with pytest.raises(ValueError):
            glm2_model.new_engine(**kwargs)


def test_chat_batch_equals_chat_one_by_one(glm3_model):
    turns = ['你好', {'query': 'and then?', 'history': [('hi', 'hello')]},
             {'query': 'what time is it?', 'system': 'You are a clock.'}]
    batched = glm3_model.chat_batch(turns, do_sample=False, max_new_tokens=10)
    one_by_one = [glm3_model.chat(**({'query': t} if isinstance(t, str) else t), do_sample=False, max_new_tokens=10)
                  for t in turns]
    assert batched == one_by_one
    with pytest.raises(ValueError, match='query'):
        glm3_model.chat_batch([{'text': 'wrong key'}])


def test_pipeline_list_input_generates_together(glm2_dir, glm2_model):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.chat, model=glm2_dir, device='cpu')
    inputs = [{'text': q, 'history': []} for q in QUERIES[:3]] + [{'text': 'again', 'history': [('hi', 'hello')]}]
    stats = pipe.chat_model.engine.scheduler.stats
    outputs = pipe(inputs, max_new_tokens=8, do_sample=False)
    together = stats['steps']
    assert outputs == [pipe(i, max_new_tokens=8, do_sample=False) for i in inputs]
    assert together <= 10      # together (a step per token), not in a loop (up to 4 x 9 steps)
    assert pipe([]) == []


def test_the_default_kv_budget_counts_the_page_cache_as_available():
    """Just after a model is read from disk most RAM is page cache: 'free' would leave almost no KV budget."""
    from modelscope_chatglm.engine.scheduler import available_memory, default_kv_budget
    meminfo = {line.split(':')[0]: int(line.split()[1]) * 1024 for line in open('/proc/meminfo')}
    assert abs(available_memory() - meminfo['MemAvailable']) < 64 << 20     # (it moves between two reads)
    expected = min(meminfo['MemAvailable'] // 4, 16 << 30)
    assert abs(default_kv_budget(torch.device('cpu')) - expected) < 16 << 20


def test_a_sequences_token_tensor_follows_its_output_as_it_grows():
    """The penalties read prompt + output as a tensor that grows by the new tokens only."""
    from modelscope_chatglm.engine.scheduler import Sequence
    from modelscope_chatglm.engine.sampling import SamplingParams
    seq = Sequence(list(range(300)), SamplingParams(max_new_tokens=1000))
    for token in range(1000):
        if token % 97 == 0 or token > 990:
            assert seq.ids_tensor('cpu')[0].tolist() == seq.prompt + seq.output
        seq.output.append(token)
    assert seq.ids_tensor('cpu').shape == (1, 1300)


def test_logprobs_are_recorded_per_token_in_a_batch(glm2_model):
    prompts = [glm2_model.build_inputs(q) for q in QUERIES[:2]]
    params = glm2_model.sampling(max_new_tokens=5, do_sample=False)
    sched = glm2_model.new_engine()
    with pytest.raises(ValueError, match='logprobs must be the number of alternatives to report, 0 to 20'):
        sched.submit(prompts[0], params, logprobs=21)
    seqs = [sched.submit(prompts[0], params, logprobs=2), sched.submit(prompts[1], params)]
    sched.run_until_done(seqs)
    recorded = seqs[0].logprobs
    assert len(recorded) == len(seqs[0].output) and seqs[1].logprobs is None
    for token, (logprob, top) in zip(seqs[0].output, recorded):
        assert top[0] == (token, logprob) and len(top) == 2 and logprob < 0


def test_a_prompt_is_scored_chunk_by_chunk_beside_other_sequences(glm2_model, glm1_model):
    """prompt_logprobs: each prompt token's logprob given those before it, equal to the full forward's,
    with the prompt prefilled in 5-token chunks beside another sequence; the prefix cache already
    holds the prompt, and the scored sequence computes it anyway (the cache has K/V, no logits).
    max_new_tokens=0 only scores. ChatGLM-6B, whose prompt is bidirectional, refuses."""
    prompt = glm2_model.build_inputs(QUERIES[0])
    expected = glm2_model.logits(prompt)[0, :-1, :glm2_model.tokenizer.vocab_size].log_softmax(-1)
    sched = glm2_model.new_engine(prefill_chunk=5)
    greedy = glm2_model.sampling(max_new_tokens=3, do_sample=False)
    sched.run_until_done([sched.submit(prompt, greedy)])   # now the prefix cache holds the prompt
    assert sched.submit(prompt, greedy) and sched.step() and sched.scheduler.running[0].reused == len(prompt) - 1
    sched.scheduler.cancel_all()
    seqs = [sched.submit(prompt, greedy, prompt_logprobs=2),
            sched.submit(glm2_model.build_inputs(QUERIES[1]), greedy),
            sched.submit(prompt, glm2_model.sampling(max_new_tokens=0), prompt_logprobs=0)]
    sched.run_until_done(seqs)
    assert seqs[0].reused == seqs[2].reused == 0   # neither scored prompt took the cached K/V
    for seq, top in ((seqs[0], 2), (seqs[2], 0)):
        got = [logprob for logprob, _ in seq.prompt_logprobs]
        assert got == pytest.approx(expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist(), abs=1e-4)
        assert all(len(alternatives) == top for _, alternatives in seq.prompt_logprobs)
    assert seqs[0].output == solo(glm2_model, prompt, 3) and seqs[2].output == [] and seqs[2].finish_reason == 'length'
    assert [t for t, _ in seqs[0].prompt_logprobs[0][1]] == expected[0].topk(2).indices.tolist()
    with pytest.raises(ValueError, match='both directions'):
        glm1_model.new_engine().submit(glm1_model.build_inputs('hi'), greedy, prompt_logprobs=1)




def test_the_sampler_gives_each_row_of_a_batch_what_it_gives_that_row_alone(glm3_model):
    """One call over rows with different parameters (greedy, seeded top-k, top-p with a temperature,
    logit bias, repetition and OpenAI penalties): each row's token is the one it gets sampled alone, and
    each parameter changed the tokens it applies to."""
    from dataclasses import replace
    from modelscope_chatglm.engine.sampling import sample
    from modelscope_chatglm.engine.scheduler import Sequence
    vocab = glm3_model.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab + 7, generator=g) * 3
    base = glm3_model.sampling(max_new_tokens=4, do_sample=False)
    kinds = [base, replace(base, do_sample=True, top_k=5, temperature=4.0, seed=1), replace(base, do_sample=True, top_p=0.5, temperature=0.7, seed=2),
             replace(base, logit_bias={11: 100.0}), replace(base, repetition_penalty=50.0),
             replace(base, frequency_penalty=2.0, presence_penalty=2.0)]

    def seqs():
        out = []
        for row, params in enumerate(kinds):
            best = int(logits[row, :vocab].argmax())      # each row has seen (and generated) its own best token
            seq = Sequence([best, 5], params)
            seq.output = [best]
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.seed)
            out.append(seq)
        return out
    together, failures = sample(logits, seqs(), vocab)
    assert not failures
    alone = [sample(logits[row:row + 1], [seq], vocab)[0][0] for row, seq in enumerate(seqs())]
    assert [together[row] for row in range(6)] == alone
    greedy = logits[:, :vocab].argmax(-1).tolist()
    assert together[0] == greedy[0] and together[3] == 11
    assert together[4] != greedy[4] and together[5] != greedy[5]   # the penalised best token lost its place
    draws = set()
    for k in range(40):
        seq = Sequence([1], replace(kinds[1], seed=k))
        seq.generator = torch.Generator().manual_seed(k)
        draws.add(sample(logits[1:2], [seq], vocab)[0][0])
    assert 1 < len(draws) <= 5 and draws <= set(logits[1, :vocab].topk(5).indices.tolist())   # top_k=5
    nan = logits.clone()
    nan[2, 3] = float('nan')
    tokens, failures = sample(nan, seqs(), vocab)
    assert set(failures) == {2} and 'NaN' in str(failures[2]) and set(tokens) == {0, 1, 3, 4, 5}


def test_a_request_that_just_fits_the_pool_runs_and_one_token_more_is_refused(glm2_model):
    """A request whose prompt and new tokens (but the last, never fed back) fill every usable page was
    accepted, then never admitted: it waited at the head of the queue forever, and so did everyone
    behind it."""
    prompt = glm2_model.build_inputs('hello world')
    per_token = glm2_model.new_engine(kv_cache_bytes=1 << 20).scheduler.bytes_per_token
    engine = glm2_model.new_engine(kv_cache_bytes=per_token * (len(prompt) + 12))
    scheduler = engine.scheduler
    usable = scheduler.pages.pages - len(scheduler.pages.reserved)
    fits = usable - len(prompt) + 1
    seq = engine.submit(prompt, glm2_model.sampling(max_new_tokens=fits, do_sample=False, stop_ids=[]))
    behind = engine.submit(prompt[:4], glm2_model.sampling(max_new_tokens=2, do_sample=False))
    for _ in range(10 * fits):
        if seq.finished and behind.finished:
            break
        engine.step()
    assert seq.finish_reason == 'length' and len(seq.output) == fits and behind.finished
    with pytest.raises(KVBudgetError, match='kv-cache-gb'):
        engine.submit(prompt, glm2_model.sampling(max_new_tokens=fits + 1, do_sample=False))
