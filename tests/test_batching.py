"""Continuous batching (engine/scheduler.py, through the engine): sequences decoded together give
what each gives alone; the prefix cache, the KV budget, cancellation, seeded sampling, chat_batch
and list inputs to the pipeline."""
import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.engine.prefix_cache import PrefixCache, common_prefix
from modelscope_chatglm.engine.scheduler import KVBudgetError
from modelscope_chatglm.loading import default_dtype
from modelscope_chatglm.models.kv_cache import KVSegment

QUERIES = ['你好', 'hello world, how are you today?', 'a b c d e f g h i j k l m n o p', 'x', '介绍下清华大学']


@pytest.fixture(scope='module')
def models(glm1_model, glm2_model, glm3_model, make_checkpoint):
    quantized = {f'glm{v}-int{bits}': modelscope_chatglm.load(
        make_checkpoint(f'glm{v}-int{bits}', f'glm{v}', 'safetensors', shards=1, quantization_bit=bits),
        device='cpu', dtype='float32') for v, bits in ((2, 4), (3, 8))}
    x8 = modelscope_chatglm.load(make_checkpoint('glm2-int4', 'glm2', 'safetensors', shards=1, quantization_bit=4),
                                 device='cpu', dtype='float32', int8_activations=True)
    return {'glm1': glm1_model, 'glm2': glm2_model, 'glm3': glm3_model, **quantized, 'glm2-int4-x8': x8}


def solo(chat, prompt, n, **gen):
    return chat.generate(prompt, max_new_tokens=n, **dict(dict(do_sample=False), **gen))


def run(sched, prompts, params):
    seqs = [sched.submit(p, params) for p in prompts]
    sched.run_until_done(seqs)
    return seqs


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
    run_forward = chat.model.forward_ragged
    chat.model.forward_ragged = lambda parts, every=(): (forwards[-1].append(part_kinds(sched, parts))
                                                         or run_forward(parts, every))
    try:
        while not all(s.finished for s in seqs):
            forwards.append([])
            sched.step()
            most_running = max(most_running, len(sched.scheduler.running))
    finally:
        del chat.model.forward_ragged
    assert most_running == 2
    for seq, prompt, n in zip(seqs, prompts, budgets):
        assert seq.output == solo(chat, prompt, n), name
        assert seq.finish_reason in ('stop', 'length')
    assert sched.scheduler.reserved == 0 and not sched.scheduler.running
    # The quantized models' CPU kernels keep each row's bits at any batch: a prompt chunk and a decode
    # token share a forward. A float model's matmuls do not: they run as two forwards of a step.
    shared = sum(f == {'prompt', 'decode'} for step in forwards for f in step)
    two_forwards = sum(len(step) == 2 for step in forwards)
    if 'int' in name:
        assert shared and two_forwards == 0, forwards
    else:
        assert not shared and two_forwards > 0, forwards


def part_kinds(sched, parts):
    """{'prompt', 'decode'}: what the parts of a forward are (a decode token follows a whole prompt)."""
    seqs = {id(s.state): s for s in sched.scheduler.running}
    return {'decode' if seqs[id(state)].prefilled == len(seqs[id(state)].fill) else 'prompt' for state, _ in parts}


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
    with torch.inference_mode():
        state = model.start(follow, 4)
        keep, segments = sched.scheduler._longest_prefix(type(seq)(follow, seq.params))
        assert keep == len(first) + len(seq.output) - 1
        model.adopt_prefix(state, segments, keep)
        warm = model.forward_ragged([(state, follow[keep:])])[0]
        cold = model.full_logits(torch.tensor([follow]), None)[0, -1]
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-5)
    # Through the scheduler: the returning turn prefills only its new tokens, same greedy reply.
    again = run(sched, [follow], glm2_model.sampling(max_new_tokens=10, do_sample=False))[0]
    assert again.reused == keep and again.output == solo(glm2_model, follow, 10)
    # Turn 2's K/V extend turn 1's node: nothing is held twice.
    assert sched.scheduler.prefix_cache.nbytes == sched.scheduler.kv_bytes(len(follow) + len(again.output) - 1)
    assert sched.scheduler.prefix_cache.nodes == 2


@pytest.fixture(scope='module', params=sorted({'float32', default_dtype(torch.device('cpu'), quantized=True)}))
def quantized_at(request, make_checkpoint):
    """The quantized models in float32 and in this CPU's default dtype for them (bfloat16 where its matrix
    units multiply bf16 natively)."""
    dtype = request.param
    load = modelscope_chatglm.load
    return {f'glm{v}-int{bits}': load(make_checkpoint(f'glm{v}-int{bits}', f'glm{v}', 'safetensors', shards=1,
                                                      quantization_bit=bits), device='cpu', dtype=dtype)
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
    assert sched.scheduler.prefix_cache.nbytes == sched.scheduler.kv_bytes(trie_size(kept))
    assert sched.scheduler.prefix_cache.nbytes < sched.scheduler.kv_bytes(sum(map(len, kept))) - sched.scheduler.kv_bytes(2 * shared)
    # Each comes back for a second turn: all of its history is served, from the shared node and its own.
    follows = [k + s.output[-1:] + glm3_model.tokenizer.encode('and then?') for k, s in zip(kept, seqs)]
    again = run(sched, follows, glm3_model.sampling(max_new_tokens=6, do_sample=False))
    assert [s.reused for s in again] == [len(k) for k in kept]
    for seq, follow in zip(again, follows):
        assert seq.output == solo(glm3_model, follow, 6)


def test_a_ptuning_model_shares_what_follows_its_learned_prefix(make_checkpoint):
    """Every cache of a P-tuning model opens with the learned prefix's K/V (written when the sequence
    starts); the prefix cache keeps and copies only the positions after it."""
    chat = modelscope_chatglm.load(make_checkpoint('glm2-prefix', 'glm2', 'bin', shards=2, seed=3, pre_seq_len=4),
                                   device='cpu', dtype='float32')
    first = chat.build_inputs('hello world, how are you today?')
    sched = chat.new_engine()
    seq = run(sched, [first], chat.sampling(max_new_tokens=6, do_sample=False))[0]
    kept = first + seq.output[:-1]
    assert sched.scheduler.pre == 4 and sched.scheduler.prefix_cache.nbytes == sched.scheduler.bytes_per_token * len(kept)
    follow = kept + seq.output[-1:] + chat.tokenizer.encode('and then?')
    again = run(sched, [follow], chat.sampling(max_new_tokens=8, do_sample=False))[0]
    assert again.reused == len(kept) and again.output == solo(chat, follow, 8)


def trie_size(token_lists):
    """Positions a radix tree of these token lists holds: each list's tokens past its longest common
    prefix with the lists before it."""
    return sum(len(t) - max([common_prefix(t, u) for u in token_lists[:i]], default=0)
               for i, t in enumerate(token_lists))


def segment(tokens, layers=2):
    """A KVSegment whose K and V at each position hold that position's token (so copies can be traced)."""
    values = torch.tensor(tokens, dtype=torch.float32)[None, None, None, :, None].expand(layers, 1, 2, len(tokens), 4)
    layer = torch.arange(layers, dtype=torch.float32)[:, None, None, None, None]
    return KVSegment(values + layer, -values - layer)


def spelled(segments, n):
    """The tokens whose K/V the first n positions of these segments hold (see `segment`)."""
    return torch.cat([s.k[0][0, 0, :, 0] for s in segments])[:n].long().tolist()


def test_the_radix_tree_keeps_a_shared_prefix_once_and_evicts_the_least_recently_used_leaf():
    cache, per_position = PrefixCache(), segment([0]).nbytes()
    a = list(range(1, 11))
    b = a[:5] + [20, 21, 22]
    assert cache.insert(a, segment(a)) == 10 * per_position
    assert cache.insert(b, segment(b)) == 3 * per_position    # splits a's node after 5 tokens
    assert cache.nodes == 3 and cache.nbytes == 13 * per_position
    assert cache.insert(a[:7], segment(a[:7])) == 0           # a prefix of what is held: nothing new
    for tokens, held in ((a + [99], 10), (b + [99], 8), (a[:7] + [50], 7), (a[:3], 3)):
        n, segments = cache.match(tokens)
        assert n == held
        assert spelled(segments, n) == tokens[:n]             # the K/V of exactly those tokens, in order
        assert all(torch.equal(s.v[1], -s.k[0] - 1) for s in segments)
    assert cache.match([7, 8, 9]) == (0, []) and cache.match(a, adapter='lora')[0] == 0
    # Least recently used leaf first; the shared head goes only once no branch is left.
    cache.match(a)
    assert cache.evict_oldest() == 3 * per_position           # b's tail (a was used after it)
    assert cache.evict_oldest() == 5 * per_position           # a's tail: now the head is a leaf
    assert cache.nodes == 1 and cache.match(b)[0] == 5
    assert cache.evict_oldest() == 5 * per_position and cache.evict_oldest() == 0
    assert cache.nbytes == 0 and cache.nodes == 0 and cache.match(a) == (0, [])


def test_the_eviction_heap_stays_bounded_while_leaves_are_used():
    """Each use of a leaf queues it again for eviction; the stale entries are dropped before they
    outgrow the leaves, and the order stays least recently used first."""
    cache = PrefixCache()
    for j in range(10):
        cache.insert([1, 2, 3, 100 + j], segment([1, 2, 3, 100 + j]))
    for r in range(1000):
        assert cache.match([1, 2, 3, 100 + r % 10, 7])[0] == 4
        assert len(cache._heap) <= 2 * 10 + 65
    for _ in range(3):
        cache.evict_oldest()
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
    prompts = [glm2_model.build_inputs(f'{q} ' * 30) for q in QUERIES] * 2
    params = glm2_model.sampling(max_new_tokens=16, do_sample=False)
    probe = glm2_model.new_engine()
    per_request = max(probe.scheduler.kv_bytes(len(p) + 16) for p in prompts)
    sched = glm2_model.new_engine(max_batch=16, kv_cache_bytes=int(per_request * 2.5))
    seqs = [sched.submit(p, params) for p in prompts]
    most_running, most_waiting = 0, 0
    while not all(s.finished for s in seqs):
        sched.step()
        assert sched.scheduler.reserved + sched.scheduler.prefix_cache.nbytes <= sched.scheduler.budget
        most_running, most_waiting = max(most_running, len(sched.scheduler.running)), max(most_waiting, len(sched.scheduler.waiting))
    assert 2 <= most_running < len(prompts) and most_waiting >= len(prompts) - most_running   # they waited for room
    assert [s.output for s in seqs] == [solo(glm2_model, p, 16) for p in prompts]
    with pytest.raises(KVBudgetError, match='kv-cache-gb'):
        sched.submit(prompts[0], glm2_model.sampling(max_new_tokens=4000, do_sample=False))


@pytest.mark.parametrize('name', ['glm1', 'glm2'])
def test_caches_grow_as_needed_and_a_full_budget_preempts_the_newest(models, name):
    """Sequences start small and grow; when the budget cannot take a growth, the newest sequence is
    preempted (memory freed, prefilled again later) and every reply is still the one it gets alone."""
    chat = models[name]
    prompts = [chat.build_inputs(q) for q in QUERIES[:4]]
    params = chat.sampling(max_new_tokens=40, do_sample=False)
    probe = chat.new_engine()
    sched = chat.new_engine(kv_cache_bytes=probe.scheduler.kv_bytes(2 * max(len(p) for p in prompts) + 60))
    sched.scheduler.GROW_TOKENS = 4
    seqs = [sched.submit(p, params) for p in prompts]
    capacities = set()
    while not all(s.finished for s in seqs):
        sched.step()
        cached = sched.scheduler.prefix_cache.nbytes if sched.scheduler.prefix_cache else 0
        assert sched.scheduler.reserved + cached <= sched.scheduler.budget
        assert sched.scheduler.reserved == sum(s.kv_bytes for s in sched.scheduler.running)
        capacities |= {s.state.cache.capacity for s in sched.scheduler.running}
    assert len(capacities) > 2 and sched.scheduler.stats['preempted'] > 0
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
    before, freed = sched.scheduler.reserved, seqs[1].kv_bytes
    seqs[1].cancel()
    sched.step()
    assert freed > 0 and sched.scheduler.reserved == before - freed
    assert seqs[1].finish_reason == 'cancelled' and seqs[1] not in sched.scheduler.running
    sched.run_until_done(seqs)
    assert seqs[0].output == solo(glm2_model, prompts[0], 20) and seqs[2].output == solo(glm2_model, prompts[2], 20)
    # A cancelled sequence leaves nothing behind: the cache holds the other two (their common opening once).
    kept = [prompts[i] + seqs[i].output[:-1] for i in (0, 2)]
    assert sched.scheduler.prefix_cache.nbytes == sched.scheduler.kv_bytes(trie_size(kept))


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
    assert good.output == solo(glm2_model, prompts[1], 6) and sched.scheduler.reserved == 0


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
    assert not sched.scheduler.has_work() and sched.scheduler.reserved == 0


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


def test_the_graph_capturable_decode_step_gives_the_eager_replies(glm2_model, monkeypatch):
    """On CUDA the runner decodes a lone sequence with the step CUDA graphs capture (`decode_static`: a
    fixed cache window, the new position in a device tensor). Run without capture on the CPU, it gives
    the eager step's greedy tokens and logprobs, while the cache grows under it and while a second
    sequence joins (those steps run batched and eager) and leaves."""
    calls = []
    static_step = glm2_model.model.decode_static
    monkeypatch.setattr(glm2_model.model, 'decode_static', lambda *a, **k: calls.append(1) or static_step(*a, **k))
    prompts = [glm2_model.build_inputs(q) for q in QUERIES[:2]]
    params = glm2_model.sampling(max_new_tokens=40, do_sample=False, stop_ids=[])

    def run(static):
        engine = glm2_model.new_engine()
        engine.runner.static_decode = static
        engine.scheduler.GROW_TOKENS = 8     # caches grow (new buffers) mid-reply
        first = engine.submit(prompts[0], params, logprobs=0)
        for _ in range(20):
            engine.step()
        second = engine.submit(prompts[1], glm2_model.sampling(max_new_tokens=10, do_sample=False, stop_ids=[]),
                               logprobs=0)
        engine.run_until_done([first, second])
        return [(s.output, [p for p, _ in s.logprobs]) for s in (first, second)]
    eager = run(False)
    assert not calls
    static = run(True)
    assert len(calls) >= 40 - 16 - 10   # the lone sequence's steps after its first 16, but the batched ones
    for (tokens, logprobs), (tokens_, logprobs_) in zip(static, eager):
        assert tokens == tokens_
        assert max(abs(a - b) for a, b in zip(logprobs, logprobs_)) < 1e-4
