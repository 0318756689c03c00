"""Chunked prefill and KV reuse across chat turns give the same numbers as the plain computation."""
import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.engine.kv_pages import PagePool, PageTable
from modelscope_chatglm.models.kv_cache import KVPool

GREEDY = dict(do_sample=False, max_new_tokens=12)


@pytest.fixture
def model(glm2_dir):
    return modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')


def scored(chat, prompts, chunk):
    """Every prompt position's log-probabilities (the prompt's next token's, and the 20 best) through an
    engine prefilling `chunk` tokens per step, the prompts side by side; and the greedy replies."""
    engine = chat.new_engine(prefill_chunk=chunk)
    params = chat.sampling(max_new_tokens=8, do_sample=False)
    seqs = [engine.submit(p, params, prompt_logprobs=20) for p in prompts]
    engine.run_until_done(seqs)
    return [torch.tensor([[lp] + [v for _, v in top] for lp, top in s.prompt_logprobs]) for s in seqs], \
        [s.output for s in seqs]


@pytest.mark.parametrize('chunk', [1, 5, 64])
def test_chunked_prefill_matches_one_pass(model, chunk):
    long = model.build_inputs('介绍下清华大学。' + 'The quick brown fox jumps over the lazy dog. ' * 30)
    short = model.build_inputs('hi')
    (whole_long,), (reply,) = scored(model, [long], 10 ** 6)
    (chunked_long,), (chunked_reply,) = scored(model, [long], chunk)
    diff = (chunked_long - whole_long).abs().max().item()
    print(f'\n[chunked prefill, chunk {chunk}] max |logprob diff| = {diff:.3g} ({len(long)} tokens)')
    assert diff < 1e-4 and chunked_reply == reply
    # beside another prompt: the same numbers and the same greedy tokens
    (_, batch_long), replies = scored(model, [short, long], chunk)
    assert (batch_long - whole_long).abs().max() < 1e-4 and replies[1] == reply
    assert replies[0] == scored(model, [short], 10 ** 6)[1][0]


def test_chunked_prefill_with_ptuning_prefix(make_checkpoint):
    chat = modelscope_chatglm.load(make_checkpoint('glm2-prefix', 'glm2', 'bin', shards=2, seed=3, pre_seq_len=4),
                                   device='cpu', dtype='float32')
    ids = chat.build_inputs('The quick brown fox jumps over the lazy dog. ' * 10)
    (chunked,), _ = scored(chat, [ids], 7)
    (whole,), _ = scored(chat, [ids], 10 ** 6)
    assert (chunked - whole).abs().max() < 1e-4
    # against the plain computation of every position at once
    expected = torch.log_softmax(chat.logits(ids)[0, :-1, :chat.tokenizer.vocab_size], -1)
    assert (whole[:, 0] - expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max() < 1e-4


def conversation(chat, queries, reuse):
    """Chat through `queries`; -> replies, history, prompt tokens taken from the prefix cache per turn.
    Without reuse, every turn runs on a new engine (an empty prefix cache)."""
    history, replies, reused = [], [], []
    for q in queries:
        engine = chat.engine if reuse else chat.configure_engine()
        before = engine.scheduler.stats['cached_prompt_tokens']
        reply, history = chat.chat(q, history, **GREEDY)
        replies.append(reply)
        reused.append(engine.scheduler.stats['cached_prompt_tokens'] - before)
    return replies, history, reused


def cold_chat(chat, *args, **kwargs):
    """A turn on a new engine: nothing cached."""
    chat.configure_engine()
    return chat.chat(*args, **kwargs)


def test_kv_reuse_across_turns_gives_identical_replies(glm2_dir, glm3_dir):
    for model_dir in (glm2_dir, glm3_dir):
        queries = ['你好', '介绍下清华大学', 'Tell me more about   its history.', '再见']
        fresh = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
        cached = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
        expected, expected_history, _ = conversation(fresh, queries, reuse=False)
        replies, history, reused = conversation(cached, queries, reuse=True)
        assert replies == expected and history == expected_history
        # How much is reused depends on how the reply re-tokenizes inside the next prompt; it grows
        # with the conversation.
        assert reused[0] == 0 and all(r > 0 for r in reused[1:]) and reused[3] > reused[1] + 20, reused


def test_reused_prefix_logits_match_a_full_prefill(model):
    first = model.build_inputs('你好')
    model.chat('你好', **GREEDY)                              # fills the cache with prompt + reply
    follow = model.build_inputs('再见', [('你好', '你好')])
    params = model.sampling(max_new_tokens=4, do_sample=False)

    def run(engine):
        seq = engine.submit(follow, params, logprobs=0)
        engine.run_until_done([seq])
        return seq
    reused, full = run(model.engine), run(model.new_engine())
    assert reused.reused >= len(first) - 1 and full.reused == 0 and reused.output == full.output
    assert max(abs(a[0] - b[0]) for a, b in zip(reused.logprobs, full.logprobs)) < 1e-4


def test_cache_survives_clear_and_history_edits(model, glm2_dir):
    fresh = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    _, history = model.chat('你好', **GREEDY)
    _, history = model.chat('介绍下清华大学', history, **GREEDY)
    # clear: a new conversation shares only the [gMASK] sop [Round 1] prefix with the cache
    assert model.chat('hello', [], **GREEDY) == cold_chat(fresh, 'hello', [], **GREEDY)
    # an edited earlier reply: the cache is cut at the edit
    edited = [(history[0][0], 'an edited reply'), history[1]]
    assert model.chat('继续', edited, **GREEDY) == cold_chat(fresh, '继续', edited, **GREEDY)
    # truncated history (a small context drops the oldest rounds) stays correct too
    small = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', context_length=90)
    small_fresh = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', context_length=90)
    h1 = h2 = []
    for q in ('one 清华', 'two 北京', 'three 上海', 'four 广州'):
        r1, h1 = small.chat(q, h1, do_sample=False, max_new_tokens=6)
        r2, h2 = cold_chat(small_fresh, q, h2, do_sample=False, max_new_tokens=6)
        assert r1 == r2


def test_pipeline_turns_reuse_the_cache(glm2_dir):
    import modelscope_chatglm  # noqa: F401
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.chat, model=glm2_dir)
    fresh = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    history = []
    for query in ('你好', '介绍下清华大学', '再见'):
        out = pipe({'text': query, 'history': history}, **GREEDY)
        assert out['response'] == cold_chat(fresh, query, history, **GREEDY)[0]
        history = out['history']
    assert pipe.chat_model.engine.scheduler.stats['cached_prompt_tokens'] > 0


def test_page_tables_grow_without_moving_k_v_and_the_pool_hands_out_low_pages_first():
    pool = PagePool(300, reserved=4)
    assert pool.free == 296 and pool.take(3) == [4, 5, 6]
    table = PageTable([4, 5, 6])
    for _ in range(100):                       # past its first buffer: it grows, the pages stay in order
        table.extend(pool.take(2))
    assert table.pages() == list(range(4, 207)) and table.tensor().dtype == torch.int32
    table.replace(1, [290, 291])
    assert table.pages(0, 4) == [4, 290, 291, 7]
    pool.give_back([5, 6])
    assert pool.take(2) == [5, 6]              # a freed page is the next one handed out
    with pytest.raises(MemoryError, match='K/V pages'):
        pool.take(pool.free + 1)
    kv = KVPool(2, 2, 4, 10, torch.float32, 'cpu')
    prefix = torch.randn(2, 2, 2, 3, 4)        # [layers, k/v, G, positions, d]
    kv.hold_prefix([7, 1, 4], prefix)
    k, v = kv.gather([7, 1, 4])
    assert torch.equal(k, prefix[:, 0].transpose(1, 2)) and torch.equal(v, prefix[:, 1].transpose(1, 2))


def test_query_truncation_on_request(glm2_dir):
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', context_length=80)
    query = 'a long preamble that will not fit ' * 10 + 'the question at the end'
    with pytest.raises(modelscope_chatglm.ContextLengthError, match='truncate_query=True'):
        chat.prepare(query, [('q', 'r')], max_new_tokens=8)
    request = chat.prepare(query, [('q', 'r')], max_new_tokens=8, truncate_query=True)
    assert len(request.input_ids) <= 80 - 8
    text = chat.tokenizer.decode(request.input_ids)
    assert text.rstrip().endswith('the question at the end\n\n答：'.rstrip()) and '[Round 1]' in text
    assert '答：r' not in text and text.count('[Round') == 1   # the older round went first


def test_the_cpu_pool_is_a_private_mapping_returned_when_freed():
    """The K/V pool is sized for the whole budget: an anonymous mapping of its own (only written pages are
    backed), unmapped once freed, and private, so a forked process writing to it leaves ours alone."""
    import ctypes
    import gc
    import os

    def mapped(address):
        with open('/proc/self/maps') as maps:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split('-'))
                if start <= address < end:
                    return True
        return False
    pool = KVPool(4, 2, 128, 1024, torch.bfloat16, 'cpu')       # 2 MiB each for K and V
    address, nbytes = pool.k.data_ptr(), pool.k.numel() * 2
    assert address % os.sysconf('SC_PAGE_SIZE') == 0
    pool.k.fill_(1)
    pid = os.fork()
    if pid == 0:   # (no torch in the child: its thread pool does not survive a fork)
        ctypes.memset(address, 0x7F, nbytes)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0 and bool((pool.k[3] == 1).all())
    del pool
    gc.collect()
    assert not mapped(address) and not mapped(address + nbytes - 1)
