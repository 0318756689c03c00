"""Chat formats, truncation, tool calls, streaming and generation through the engine on tiny real models."""
import json
import threading

import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm import ContextLengthError, InputError
from modelscope_chatglm.chat_formats import GLM3Format, parse_tool_call

GREEDY = dict(do_sample=False)


# -- prompts --------------------------------------------------------------------------------------------
def test_glm2_prompt_is_the_official_format(glm2_model):
    tok = glm2_model.tokenizer
    ids = glm2_model.build_inputs('介绍下清华大学', [('你好', '你好！')])
    text = '[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：介绍下清华大学\n\n答：'
    assert ids == tok.prefix_ids + tok.encode(text)
    assert glm2_model.build_inputs('你好') == tok.prefix_ids + tok.encode('[Round 1]\n\n问：你好\n\n答：')


def test_glm3_input_ids_follow_the_spec(glm3_model):
    tok = glm3_model.tokenizer
    n = tok.num_sp_pieces
    gmask, sop, system, user, assistant, observation = n + 1, n + 3, n + 5, n + 6, n + 7, n + 8
    # docs/formats.md §4.3: [gMASK] sop <|user|> encode("\n") encode(query) <|assistant|>
    assert glm3_model.build_inputs('你好') == [gmask, sop, user] + tok.encode('\n') + tok.encode('你好') + [assistant]
    tools = [{'name': 'get_weather', 'parameters': {'city': {'type': 'string'}}}]
    history = [{'role': 'user', 'content': 'weather?'},
               {'role': 'assistant', 'metadata': 'get_weather', 'content': "```python\ntool_call(city='北京')\n```"}]
    ids = glm3_model.build_inputs('{"temp": 20}', history, role='observation', system='Be brief.', tools=tools)
    expected = [gmask, sop, system] + tok.encode('\n') + tok.encode(
        'Be brief.\n' + json.dumps(tools, indent=4, ensure_ascii=False))
    expected += [user] + tok.encode('\n') + tok.encode('weather?')
    expected += [assistant] + tok.encode('get_weather\n') + tok.encode("```python\ntool_call(city='北京')\n```")
    expected += [observation] + tok.encode('\n') + tok.encode('{"temp": 20}') + [assistant]
    assert ids == expected


def test_glm2_rejects_roles_it_does_not_have(glm2_model):
    with pytest.raises(InputError, match='no system prompt'):
        glm2_model.chat('hi', system='be nice')
    with pytest.raises(InputError, match='no observation role'):
        glm2_model.chat('hi', [{'role': 'observation', 'content': 'x'}])


# -- truncation -----------------------------------------------------------------------------------------
def test_oldest_rounds_are_dropped_to_fit(glm2_dir):
    model = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', context_length=120)
    history = [(f'question number {i} about 清华大学', f'answer number {i}') for i in range(10)]
    request = model.prepare('the newest question', history, max_new_tokens=16)
    assert len(request.input_ids) <= 120 - 16
    text = model.tokenizer.decode(request.input_ids)
    assert 'question number 9' in text and 'question number 0' not in text
    assert text.endswith('问：the newest question\n\n答：') and text.startswith('[Round 1]')
    # The history the caller keeps is not truncated.
    response, new_history = model.chat('the newest question', history, max_new_tokens=4, **GREEDY)
    assert len(new_history) == 11 and new_history[:10] == history


def test_query_alone_too_long_is_a_clear_error(glm2_dir):
    model = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', context_length=64)
    with pytest.raises(ContextLengthError, match=r'the prompt is \d+ tokens but only \d+ fit.*shorten the query'):
        model.chat('很长的问题 ' * 40, [('a', 'b')])
    with pytest.raises(ContextLengthError, match='lower max_new_tokens'):
        model.chat('hi', max_new_tokens=60)


def test_glm3_truncation_keeps_the_system_prompt(glm3_dir):
    model = modelscope_chatglm.load(glm3_dir, device='cpu', dtype='float32', context_length=100)
    history = [{'role': 'system', 'content': 'SYSTEM RULES'}]
    for i in range(8):
        history += [{'role': 'user', 'content': f'q{i} 清华大学'}, {'role': 'assistant', 'content': f'a{i}'}]
    text = model.tokenizer.decode(model.prepare('newest', history, max_new_tokens=8).input_ids)
    assert 'SYSTEM RULES' in text and 'q7' in text and 'q0' not in text


# -- chat and streaming -----------------------------------------------------------------------------------
def test_history_shapes_round_trip(glm2_model, glm3_model):
    r, h = glm2_model.chat('你好', [], max_new_tokens=6, **GREEDY)
    assert h == [('你好', r)] and isinstance(h, list)
    r, h = glm3_model.chat('你好', max_new_tokens=6, **GREEDY)
    assert h == [('你好', r)]
    r, h = glm3_model.chat('你好', [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}],
                           max_new_tokens=6, **GREEDY)
    assert h[-2] == {'role': 'user', 'content': '你好'} and h[-1]['role'] == 'assistant'
    assert h[-1]['content'] == r


@pytest.mark.parametrize('history,match', [
    ('not a list', 'must be a list'),
    ([('only one',)], r'history\[0\]'),
    ([{'role': 'robot', 'content': 'x'}], 'role'),
    ([('q', 'r'), {'role': 'user', 'content': 'x'}], 'mixes'),
])
def test_malformed_history(glm2_model, history, match):
    with pytest.raises(InputError, match=match):
        glm2_model.chat('hi', history)


def test_stream_chat_grows_to_the_chat_reply(glm2_model):
    steps = list(glm2_model.stream_chat('你好', [], max_new_tokens=12, **GREEDY))
    assert len(steps) > 1
    texts = [s[0] for s in steps]
    assert all(b.startswith(a.strip()) or len(b) >= len(a) for a, b in zip(texts, texts[1:]))
    final, history = glm2_model.chat('你好', [], max_new_tokens=12, **GREEDY)
    assert texts[-1] == final and steps[-1][1] == history


def test_turn_deltas_concatenate_to_the_reply(glm2_model):
    turn = glm2_model.turn('你好', max_new_tokens=12, **GREEDY)
    deltas = list(turn)
    ids = turn.output_ids
    assert ''.join(deltas) == turn.response == glm2_model.tokenizer.decode(ids).strip()
    assert turn.finish_reason in ('stop', 'length')


# -- tool calls, parsed without eval --------------------------------------------------------------------------
def glm3_response(text, messages):
    reply = GLM3Format().parse_text(text, messages)
    return reply.response, reply.messages


def test_tool_call_is_parsed_without_eval():
    system = [{'role': 'system', 'content': '', 'tools': [{'name': 'get_weather'}]}]
    out = "get_weather\n```python\ntool_call(city='北京', days=3, units=None)\n```"
    reply, added = glm3_response(out, system)
    assert reply == {'name': 'get_weather', 'parameters': {'city': '北京', 'days': 3, 'units': None}}
    assert added == [{'role': 'assistant', 'metadata': 'get_weather', 'content': out.split('\n', 1)[1]}]
    evil = "get_weather\n```python\ntool_call(x=__import__('os').system('touch /tmp/pwned'))\n```"
    reply, _ = glm3_response(evil, system)
    assert reply['name'] == 'get_weather' and 'parameters' not in reply   # kept as text, never run
    assert parse_tool_call("print('hi')") is None
    # Without declared tools it is an interpreter/plain call: name + content.
    reply, _ = glm3_response('interpreter\n```python\nprint(1)\n```', [])
    assert reply == {'name': 'interpreter', 'content': '```python\nprint(1)\n```'}
    reply, added = glm3_response('\n 你好 [[训练时间]]', [])
    assert reply == '你好 2023年' and added[0]['metadata'] == ''


# -- replies read as they stream: the same parser, whole or in pieces -------------------------------------
TOOLS = [{'name': 'get_weather', 'parameters': {'city': {'type': 'string'}}}]
CALL = 'get_weather\n```python\ntool_call(city="北京")\n```'
STREAMED_REPLIES = {
    'glm1': ['  你好,我是ChatGLM!真的吗?是的:好;  ', 'a,中 ,b', '中,', '[[训练时间]],好', 'ok [[训练时', ' \n '],
    'glm2': ['\n 你好 [[训练时间]]  ', 'a  b\n\n c ', '[[[训练时间]]]', ''],
    'glm3': ['\n 你好 [[训练时间]] ',
             '\nLet me check.  <|assistant|>' + CALL,                       # text, then a call
             '\nHello.<|assistant|>\n World. ',                            # two text segments
             '\n<|assistant|>\nonly the second',                           # an empty first segment
             'a first line that never ends',                                # read as text
             '\nabc <|assist',                                              # half a separator at the end
             CALL + '<|assistant|>\nafter the call'],
}


@pytest.mark.parametrize('family', ['glm1', 'glm2', 'glm3'])
def test_a_reply_streamed_in_any_pieces_is_the_whole_reply(family):
    """What a stream shows, cut into deltas anywhere, is exactly the whole reply's text, and its final
    reply (tool calls, history messages) is the whole reply's."""
    import random
    from modelscope_chatglm.families import get_family
    fmt = get_family(family).chat_format
    messages = [{'role': 'system', 'content': '', 'tools': TOOLS}] if family == 'glm3' else []
    rng = random.Random(0)
    for text in STREAMED_REPLIES[family]:
        whole = fmt.parse_text(text, messages)
        for _ in range(30):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 8))))
            parser = fmt.reply_parser(messages)
            shown = ''.join(parser.push(text[a:b]) for a, b in zip([0] + cuts, cuts + [len(text)])) + parser.finish()
            assert shown == whole.text, (text, cuts)
            assert parser.reply() == whole, (text, cuts)
    if family == 'glm3':   # what chat() returns is the last message's, as the official code
        assert fmt.parse_text(CALL + '<|assistant|>\nafter the call', messages).response == 'after the call'
        assert fmt.parse_text('\nLet me check.<|assistant|>' + CALL, messages).response['name'] == 'get_weather'
    assert fmt.parse_text(STREAMED_REPLIES[family][0], messages).text == {
        'glm1': '你好，我是ChatGLM！真的吗？是的：好；', 'glm2': '你好 2023年', 'glm3': '你好 2023年'}[family]


def test_chatglm3_text_then_a_tool_call_streams_as_the_whole_reply(glm3_model):
    """The real model often writes text, then `<|assistant|>` and a call. Token by token through the
    decoder every surface streams with (stream_chat, CLI, web, server): the text is shown, the call's
    name and code never are, and the end is the whole reply: the call, with the text beside it."""
    from modelscope_chatglm.chat import ReplyDecoder
    tok = glm3_model.tokenizer
    request = glm3_model.prepare('北京天气?', tools=TOOLS)
    for segments, text in (
            (['\nLet me check.', '<|assistant|>', CALL], 'Let me check.'),
            (['\nHello.', '<|assistant|>', '\nWorld.'], 'Hello.\nWorld.')):
        ids = [tok[s] if s.startswith('<|') else None for s in segments]
        ids = [i for s, i in zip(segments, ids) for i in ([i] if i is not None else tok.encode(s))]
        decoder = ReplyDecoder(glm3_model, request)
        shown = ''.join(decoder.push(i) for i in ids) + decoder.finish()
        assert shown == text
        response, history = decoder.result()
        assert (response, history) == glm3_model.respond(request, ids)
        assert [m['metadata'] for m in history[-2:]] == ['', 'get_weather' if 'call' in segments[2] else '']
        if 'tool_call' in segments[2]:
            assert response == {'name': 'get_weather', 'parameters': {'city': '北京'}}
        else:
            assert response == text


@pytest.mark.parametrize('code', [
    'tool_call(a=' + '[' * 100000 + ']' * 100000 + ')',     # nesting that overflows the parser
    'tool_call(a={1, 2})', 'tool_call(a=1j)', "tool_call(a=b'x')", 'tool_call(a={(1, 2): 3})',
])
def test_hostile_tool_calls_are_refused_not_raised(code):
    """Model output is steerable by the prompt: what cannot become JSON arguments is no tool call."""
    assert parse_tool_call(code) is None
    system = [{'role': 'system', 'content': '', 'tools': [{'name': 'f'}]}]
    reply, _ = glm3_response(f'f\n```python\n{code}\n```', system)
    assert reply['name'] == 'f' and 'parameters' not in reply
    json.dumps(reply)


# -- generation options ------------------------------------------------------------------------------------------
def test_sampling_options(glm2_model):
    ids = glm2_model.build_inputs('你好')
    greedy = glm2_model.generate(ids, max_new_tokens=10, do_sample=False)
    assert glm2_model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1) == greedy
    a = glm2_model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, seed=3)
    b = glm2_model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, seed=3)
    assert a == b
    assert len(glm2_model.generate(ids, max_length=len(ids) + 4, do_sample=False)) == 4
    # A stop id ends generation and is returned.
    stopped = glm2_model.generate(ids, max_new_tokens=10, do_sample=False, stop_ids=[greedy[3]])
    assert stopped == greedy[:greedy.index(greedy[3]) + 1]
    # The repetition penalty changes what greedy picks once tokens repeat.
    penalised = glm2_model.generate(ids, max_new_tokens=10, do_sample=False, repetition_penalty=50.0)
    assert len(set(penalised)) == len(penalised)



def test_openai_penalties_count_generated_tokens():
    """frequency_penalty per time a token was generated, presence_penalty once; the prompt's tokens
    (`seen`) do not count; logit_bias is added first."""
    import torch
    from modelscope_chatglm.engine.sampling import LOGITS_PROCESSORS, Rows, SamplingParams
    from modelscope_chatglm.engine.scheduler import Sequence
    params = SamplingParams(max_new_tokens=4, do_sample=False, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias={7: 2.0})
    seq = Sequence([1, 2], params)
    seq.output = [3, 3, 5]
    scores = torch.zeros(1, 10)
    for process in LOGITS_PROCESSORS:
        scores = process(scores, Rows([seq], 10))
    assert scores.tolist() == [[0, 0, 0, -1.25, 0, -0.75, 0, 2.0, 0, 0]]


def test_penalties_are_the_same_alone_and_in_a_batch(glm2_model):
    """generate() one by one, an engine of its own and generate_batch count the same tokens."""
    gen = dict(do_sample=False, frequency_penalty=1.5, presence_penalty=0.5)
    prompts = [glm2_model.build_inputs(q) for q in ('你好', 'tell me about the capital of France')]
    alone = [glm2_model.generate(p, max_new_tokens=48, **gen) for p in prompts]   # 48: tokens repeat
    assert all(a != glm2_model.generate(p, max_new_tokens=48, do_sample=False) for a, p in zip(alone, prompts))
    sched = glm2_model.new_engine()
    seqs = [sched.submit(p, glm2_model.sampling(max_new_tokens=48, **gen)) for p in prompts]
    sched.run_until_done(seqs)
    assert [s.output for s in seqs] == alone
    assert glm2_model.generate_batch(prompts, max_new_tokens=48, **gen) == alone


def test_a_temperature_too_small_to_divide_by_samples_greedily(glm2_model):
    """1e-300 is 0 in float32: the logits became 0 / 0 and sampling raised. Below 1e-5 it is greedy
    (vLLM's rule); just above, sampling still runs and, at that sharpness, agrees with greedy here."""
    ids = glm2_model.build_inputs('你好')
    greedy = glm2_model.generate(ids, max_new_tokens=8, do_sample=False)
    for temperature in (1e-300, 1e-6, 2e-5):
        assert glm2_model.generate(ids, max_new_tokens=8, do_sample=True, temperature=temperature, seed=1) == greedy
    assert glm2_model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, seed=1) != greedy


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=0), 'temperature must be > 0'), (dict(top_p=1.5), 'top_p'),
    (dict(top_k=-1), 'top_k'), (dict(beams=2), 'unknown generation argument'),
    (dict(repetition_penalty=0), 'repetition_penalty'),
    # float32 logits divided by these overflow (NaN once shifted): sampling raised inside the step
    (dict(repetition_penalty=1e-300), r'repetition_penalty must be in \[0.0001, 10000\]'),
    (dict(repetition_penalty=1e300), 'repetition_penalty must be in'),
    # the wrong types are clear errors too, not raw TypeErrors or silently truthy values
    (dict(max_new_tokens='5'), "max_new_tokens must be an integer, got '5'"),
    (dict(max_new_tokens=2.5), 'max_new_tokens must be an integer'),
    (dict(do_sample='no'), "do_sample must be True or False, got 'no'"),
    (dict(stop_ids=[None]), 'stop_ids must be a list of non-negative token ids'),
    (dict(stop_ids=5), 'stop_ids must be a list'),
    (dict(temperature='hot'), 'temperature must be a number'),
    (dict(top_p=float('nan')), 'top_p must be finite'),
    (dict(seed=10 ** 23), r'seed must be in \[0, 2\*\*63\)'),
    (dict(seed=True), 'seed must be an integer'),
])
def test_bad_generation_options(glm2_model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        glm2_model.generate([1, 2, 3], **{'max_new_tokens': 2, **kwargs})


def test_an_interrupted_prefill_leaves_no_wrong_kv_in_the_prefix_cache(glm2_dir):
    """Ctrl-C (or an error) between prefill chunks: nothing of the interrupted prompt may reach the
    prefix cache. Turn 2 diverges from turn 1 and is interrupted in its second chunk; turn 3 repeats
    turn 1's prompt and must get the log-probabilities of a cold engine, from turn 1's cached K/V."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    engine = chat.configure_engine(prefill_chunk=8)
    params = chat.sampling(max_new_tokens=4, do_sample=False)
    first = chat.build_inputs('介绍下清华大学和北京大学的历史，以及它们的著名校友。' * 2)
    diverging = first[:10] + chat.tokenizer.encode('完全不同的问题，而且很长很长很长很长很长很长。' * 3)
    chat.generate(first, max_new_tokens=1, do_sample=False)
    chunks, forward = [0], chat.model.forward_ragged

    def interrupted(*args, **kwargs):
        chunks[0] += 1
        if chunks[0] == 2:                 # the second chunk of turn 2 never finishes
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    chat.model.forward_ragged = interrupted
    with pytest.raises(KeyboardInterrupt):
        chat.generate(diverging, max_new_tokens=1, do_sample=False)
    chat.model.forward_ragged = forward
    assert chunks[0] == 2
    again = first + chat.tokenizer.encode('再说一次')

    def logprobs(engine):
        seq = engine.submit(again, params, logprobs=0)
        engine.run_until_done([seq])
        return seq, [p for p, _ in seq.logprobs]
    warm, warm_logprobs = logprobs(engine)
    cold, cold_logprobs = logprobs(chat.new_engine())
    assert warm.reused == len(first) and cold.reused == 0 and warm.output == cold.output
    assert max(abs(a - b) for a, b in zip(warm_logprobs, cold_logprobs)) < 1e-4
    assert not engine.scheduler.running and engine.scheduler.snapshot()["kv_reserved_bytes"] == 0   # the interrupted one is gone


def test_casting_the_model_mid_conversation_drops_the_cached_kv(glm2_dir):
    """The prefix cache holds K/V in the model's dtype; after `model.to(float32)` the next turn prefills
    anew (bf16 K/V beside fp32 queries failed in attention) and replies as a model loaded in fp32 does."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='bfloat16')
    _, history = chat.chat('介绍下清华大学', max_new_tokens=6, do_sample=False)

    def cached_in_next_turn():
        before = chat.engine.scheduler.stats['cached_prompt_tokens']
        reply, _ = chat.chat('再说一次', history=history, max_new_tokens=6, do_sample=False)
        return reply, chat.engine.scheduler.stats['cached_prompt_tokens'] - before
    assert cached_in_next_turn()[1] > 0                  # same dtype: the history came from the cache
    chat.model.to(torch.float32)
    reply, cached = cached_in_next_turn()
    assert cached == 0
    fp32 = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    assert reply == fp32.chat('再说一次', history=history, max_new_tokens=6, do_sample=False)[0]


def test_an_interrupted_generate_leaves_nothing_running(glm2_model, monkeypatch):
    """Ctrl-C in the middle of generate(): its sequences end at once, their memory is free, and the next
    call (or a new engine setting) works."""
    chat = glm2_model
    engine = chat.engine
    forward, calls = chat.model.forward_ragged, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    monkeypatch.setattr(chat.model, 'forward_ragged', interrupted)
    prompts = [chat.build_inputs(q) for q in ('你好', 'hello')]
    with pytest.raises(KeyboardInterrupt):
        chat.generate_batch(prompts, max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(chat.model, 'forward_ragged', forward)
    assert not engine.busy and engine.scheduler.snapshot()["kv_reserved_bytes"] == 0
    # tensors and arrays of ids are prompts too
    assert chat.generate_batch(torch.tensor([prompts[0], prompts[0]]), max_new_tokens=4, do_sample=False) == \
        [chat.generate(prompts[0], max_new_tokens=4, do_sample=False)] * 2


def test_batched_generation_equals_one_by_one(glm2_model):
    prompts = [glm2_model.build_inputs(q) for q in ('你好', '介绍下清华大学和北京大学的历史', 'hi')]
    batched = glm2_model.generate_batch(prompts, max_new_tokens=8, do_sample=False)
    single = [glm2_model.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]
    assert batched == single


def test_padded_vocabulary_rows_are_never_generated(make_checkpoint):
    model_dir = make_checkpoint('glm2-padded', 'glm2', 'bin', shards=1, padded_vocab_size=960)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    assert model.config.vocab_size == 960 > model.tokenizer.vocab_size
    with torch.no_grad():   # make the padding rows the most likely "tokens"
        model.model.output_layer.weight[model.tokenizer.vocab_size:] *= 1000
    ids = model.build_inputs('你好')
    assert model.logits(ids)[0, -1].argmax() >= model.tokenizer.vocab_size
    out = model.generate(ids, max_new_tokens=20, do_sample=True, seed=0)
    assert out and all(t < model.tokenizer.vocab_size for t in out)
    model.chat('你好', max_new_tokens=8)   # decodes without an out-of-range error


def test_nan_logits_are_an_error_that_names_the_fix(glm2_dir):
    """A forward that overflowed gives noise, not a reply: every surface gets the same clear error (the
    server's is an error event), and the engine goes on serving."""
    model = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    with torch.no_grad():
        model.model.layers[0].mlp.dense_4h_to_h.weight[0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match='NaN/inf logits .* load it in bfloat16 or float32'):
        model.chat('你好', max_new_tokens=10, do_sample=True)
    with pytest.raises(FloatingPointError):
        model.generate(model.build_inputs('你好'), max_new_tokens=10)
    assert not model.engine.scheduler.running and model.engine.scheduler.snapshot()["kv_reserved_bytes"] == 0


def _stopped(stops, text, pieces):
    """Feed `text` to StopStrings in pieces of the given sizes -> (what was sent, hit)."""
    from modelscope_chatglm.engine.detokenize import StopStrings
    matcher, sent, at = StopStrings(stops), '', 0
    for size in pieces:
        sent += matcher.push(text[at:at + size])
        at += size
        if matcher.hit:
            return sent, True
        assert sent + matcher.held == text[:at]   # nothing lost, nothing sent twice
    return sent + matcher.flush(), False


def test_stop_strings_cut_at_the_first_to_appear_however_the_text_is_split():
    """Against a direct search (the first prefix of the text that ends with a stop string), on random
    texts over a small alphabet (many overlaps) split at random points."""
    import random
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = rng.choice(['ab', 'abc', '中文a'])
        text = ''.join(rng.choice(alphabet) for _ in range(rng.randrange(25)))
        stops = [''.join(rng.choice(alphabet) for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(4))]
        expect = (text, False)
        for end in range(1, len(text) + 1):
            done = [s for s in stops if text[:end].endswith(s)]
            if done:
                expect = (text[:end - max(map(len, done))], True)
                break
        pieces = [rng.randrange(1, 4) for _ in range(len(text))]
        assert _stopped(stops, text, pieces) == expect, (text, stops)


def test_stop_strings_hold_back_only_what_may_begin_one():
    from modelscope_chatglm.engine.detokenize import StopStrings
    matcher = StopStrings(['</answer>', ''])
    assert matcher.push('the answer is 42 <') == 'the answer is 42 '
    assert matcher.push('/ans') == '' and matcher.held == '</ans'
    assert matcher.push('wer!') == '</answer!' and matcher.held == ''    # it was not one
    assert matcher.push('</answer> more') == '' and matcher.hit
    assert matcher.push('after') == '' and matcher.flush() == ''
    assert StopStrings([]).push('<') == '<'                             # no stop strings: nothing held
    # A stop string as long as a request may carry, over text that keeps almost matching it.
    long_stop = 'a' * 200_000 + 'b'
    assert _stopped([long_stop], 'a' * 300_000 + 'b', [1000] * 301) == ('a' * 100_000, True)


def test_threads_chatting_at_once_share_the_engine_and_get_their_own_replies(glm3_model):
    """Four threads call chat() / stream_chat() at once (one abandons its stream halfway): each gets the
    reply it gets alone, the steps are shared (fewer than one by one), and nothing is left running."""
    import threading
    queries = ['你好', 'hello there', '介绍下清华大学', 'what is 1+1?']
    gen = dict(do_sample=False, max_new_tokens=24)
    alone = [glm3_model.chat(q, **gen)[0] for q in queries]
    stats = glm3_model.engine.scheduler.stats
    steps_before, results, errors = stats['steps'], {}, []

    def chat(i):
        try:
            if i % 2:
                results[i] = [r for r, _ in glm3_model.stream_chat(queries[i], **gen)][-1]
            else:
                results[i] = glm3_model.chat(queries[i], **gen)[0]
        except Exception as e:   # (reported below: an assert in a thread would pass silently)
            errors.append(e)

    def abandon():
        stream = glm3_model.stream_tokens(glm3_model.build_inputs('abandoned'), max_new_tokens=200)
        next(stream), next(stream)
        stream.close()
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)] + [threading.Thread(target=abandon)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and [results[i] for i in range(4)] == alone
    assert stats['steps'] - steps_before < 4 * 25                 # steps were shared
    engine = glm3_model.engine
    assert not engine.busy and engine.scheduler.snapshot()["kv_reserved_bytes"] == 0


def test_tools_that_nest_too_deep_or_hold_too_much_are_refused_before_rendering(glm3_model):
    """A 2 KB request of tools nested 900 deep was rendered (json.dumps, indent 4) and tokenized before it
    was refused: 0.8 s and 175 MB each. Bounds on depth and size are checked first."""
    import time
    from modelscope_chatglm.errors import InputError
    deep = {'name': 'f', 'parameters': {}}
    node = deep['parameters']
    for _ in range(900):
        node['x'] = {}
        node = node['x']
    start = time.perf_counter()
    with pytest.raises(InputError, match='levels deep'):
        glm3_model.prepare('hi', tools=[deep], max_new_tokens=2)
    with pytest.raises(InputError, match='levels deep'):   # (tools sent back in the history too)
        glm3_model.prepare('hi', [{'role': 'system', 'content': '', 'tools': [deep]}], max_new_tokens=2)
    with pytest.raises(InputError, match='values'):
        glm3_model.prepare('hi', tools=[{'name': 'f', 'parameters': {'enum': list(range(30000))}}], max_new_tokens=2)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(InputError, match='list of objects'):
        glm3_model.prepare('hi', tools=['f'], max_new_tokens=2)
    ordinary = [{'name': 'get_weather', 'description': 'weather of a city',
                 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}]
    assert glm3_model.prepare('hi', tools=ordinary, max_new_tokens=2).input_ids


def test_callers_step_the_engine_when_its_thread_is_gone(glm2_dir):
    """A served model's engine thread that has ended (stopped, or killed by an error it could not catch)
    steps nothing: callers waiting on it step the engine themselves instead of waiting forever."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    ids = chat.build_inputs('你好')
    want = chat.generate(ids, max_new_tokens=4, do_sample=False)
    engine = chat.engine
    engine.start_background()
    engine._stopped = True
    engine._thread.join(timeout=10)
    assert not engine.stepping_in_background and engine._thread is not None
    done = []
    worker = threading.Thread(target=lambda: done.append(chat.generate(ids, max_new_tokens=4, do_sample=False)),
                              daemon=True)   # (if it hangs, the test fails instead of pytest hanging)
    worker.start()
    worker.join(timeout=60)
    assert done == [want]
