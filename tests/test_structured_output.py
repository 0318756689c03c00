"""Structured output: response_format and forced tool calls, held by a grammar's token mask (llguidance).

Tiny random models write noise, so these test the mechanism: whatever the model would have said, the
reply parses and validates against the schema, a forced call names the tool and its arguments follow
its schema, and without the option the same request gives a reply that is not JSON.
"""
import json

import pytest

from conftest import serving

llguidance = pytest.importorskip('llguidance')
jsonschema = pytest.importorskip('jsonschema')

from modelscope_chatglm import structured  # noqa: E402
from modelscope_chatglm.chat_formats import GLM1Format, parse_tool_call  # noqa: E402
from modelscope_chatglm.engine import grammar  # noqa: E402
from modelscope_chatglm.errors import InputError  # noqa: E402

# Bounded: every string and number has a length limit, so a reply completes within max_new_tokens
# whatever a random model prefers (the mask leaves it no other way).
PERSON = {'type': 'object', 'additionalProperties': False, 'required': ['name', 'age', 'role'],
          'properties': {'name': {'type': 'string', 'maxLength': 8},
                         'age': {'type': 'integer', 'minimum': 0, 'maximum': 120},
                         'role': {'enum': ['admin', 'user', 'guest']},
                         'tags': {'type': 'array', 'items': {'type': 'boolean'}, 'maxItems': 2}}}
SCHEMA_FORMAT = {'type': 'json_schema', 'json_schema': {'name': 'person', 'schema': PERSON, 'strict': True}}
WEATHER = {'name': 'get_weather', 'description': 'the weather in a city',
           'parameters': {'type': 'object', 'required': ['city'],
                          'properties': {'city': {'type': 'string', 'maxLength': 10},
                                         'unit': {'enum': ['celsius', 'fahrenheit']},
                                         'days': {'type': 'integer', 'minimum': 1, 'maximum': 7}}}}
CLOCK = {'name': 'now', 'parameters': {'type': 'object', 'properties': {}}}


def models(request, names):
    return [request.getfixturevalue(f'{name}_model') for name in names]


@pytest.mark.parametrize('family', ['glm1', 'glm2', 'glm3'])
def test_json_schema_replies_validate_greedy_and_sampled(request, family):
    model = request.getfixturevalue(f'{family}_model')
    free, _ = model.chat('who are you?', do_sample=False, max_new_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free)   # (the option below is what makes the reply JSON)
    for gen in [dict(do_sample=False)] + [dict(do_sample=True, seed=seed, temperature=1.5) for seed in range(4)]:
        turn = model.turn('who are you?', response_format=SCHEMA_FORMAT, max_new_tokens=120, **gen)
        streamed = ''.join(turn)
        assert turn.finish_reason == 'stop', (family, gen, streamed)
        value = json.loads(turn.response)
        jsonschema.validate(value, PERSON)
        assert streamed == turn.response   # the stream shows the same JSON, untouched by text clean-ups


def test_json_object_replies_are_objects(glm2_model, glm3_model):
    for model in (glm2_model, glm3_model):
        finished = 0
        for seed in range(6):
            turn = model.turn('hi', response_format={'type': 'json_object'}, max_new_tokens=60, do_sample=True, seed=seed)
            text = ''.join(turn)
            if turn.finish_reason == 'stop':   # (a random model may stay inside a string until the length limit)
                assert isinstance(json.loads(text), dict)
                finished += 1
            else:
                assert turn.finish_reason == 'length' and text.startswith('{')
        assert finished >= 3


def test_a_complete_reply_ends_without_a_stop_token_and_ignore_eos_cannot_run_on(glm2_model):
    schema = {'type': 'json_schema', 'json_schema': {'schema': {'enum': ['yes', 'no']}}}
    req = glm2_model.prepare('ok?', response_format=schema, max_new_tokens=50, ignore_eos=True)
    ids = glm2_model.generate_requests([req])[0]
    response, _ = glm2_model.respond(req, ids)
    assert json.loads(response) in ('yes', 'no') and len(ids) < 10


def test_min_tokens_cannot_end_a_complete_reply_early(glm2_model):
    """min_tokens masks the stop ids; a reply whose grammar is done still ends (nothing else may follow)."""
    schema = {'type': 'json_schema', 'json_schema': {'schema': {'enum': ['a']}}}
    response, _ = glm2_model.chat('x', response_format=schema, min_tokens=5, max_new_tokens=20)
    assert response == '"a"'


def test_grammar_rows_and_free_rows_share_a_batch(glm2_model):
    """A grammar masks its own row only: a free greedy reply is the same alone and beside a structured one."""
    alone = glm2_model.chat('tell me', do_sample=False, max_new_tokens=120)[0]
    both = glm2_model.chat_batch([{'query': 'tell me'}, {'query': 'who?', 'response_format': SCHEMA_FORMAT}],
                                 do_sample=False, max_new_tokens=120)
    assert both[0][0] == alone
    jsonschema.validate(json.loads(both[1][0]), PERSON)


@pytest.mark.parametrize('tool_choice, names', [
    ('required', {'get_weather', 'now'}),
    ({'type': 'function', 'function': {'name': 'get_weather'}}, {'get_weather'}),
    ({'type': 'function', 'function': {'name': 'now'}}, {'now'}),
])
def test_forced_tool_calls_name_a_tool_with_arguments_that_follow_its_schema(glm3_model, tool_choice, names):
    free, _ = glm3_model.chat('weather?', tools=[WEATHER, CLOCK], do_sample=False, max_new_tokens=40)
    assert not isinstance(free, dict)   # unforced, this random model answers in text
    seen = set()
    for seed in range(5):
        call, history = glm3_model.chat('weather in Paris?', tools=[WEATHER, CLOCK], tool_choice=tool_choice,
                                        do_sample=True, seed=seed, max_new_tokens=120)
        assert isinstance(call, dict) and call['name'] in names, call
        schema = WEATHER['parameters'] if call['name'] == 'get_weather' else CLOCK['parameters']
        jsonschema.validate(call['parameters'], schema)
        assert history[-1]['metadata'] == call['name']
        seen.add(call['name'])
    assert seen   # (a named function is the only name seen)


def test_auto_with_a_response_format_answers_in_json_or_calls_a_tool(glm3_model):
    for seed in range(4):
        response, _ = glm3_model.chat('?', tools=[WEATHER], response_format=SCHEMA_FORMAT, do_sample=True, seed=seed,
                                      max_new_tokens=120)
        if isinstance(response, dict):
            assert response['name'] == 'get_weather'
            jsonschema.validate(response['parameters'], WEATHER['parameters'])
        else:
            jsonschema.validate(json.loads(response), PERSON)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(tool_choice='required'), 'needs tools'),
    (dict(tools=[WEATHER], tool_choice={'type': 'function', 'function': {'name': 'other'}}), 'not among the tools'),
    (dict(tools=[WEATHER], tool_choice='always'), 'tool_choice must be'),
    (dict(tools=[{'name': 'f', 'parameters': {'type': 'object', 'properties': {'not-python': {}}}}],
          tool_choice='required'), 'not a Python identifier'),
    (dict(tools=[{'name': 'f g', 'parameters': {}}], tool_choice='required'), 'tool names must match'),
    (dict(response_format={'type': 'json_schema', 'json_schema': {'schema': {'type': 'string', 'pattern': '('}}}),
     'cannot be used'),
    (dict(response_format='json'), 'must be an object'),
    (dict(tools=[WEATHER], tool_choice={'type': 'function', 'function': 'get_weather'}), 'tool_choice must be'),
    (dict(tools=[{'type': 'function', 'function': 'x'}], tool_choice='required'), 'each tool is'),
    (dict(tools=[{'name': 'f', 'parameters': {'properties': {'a': {}}, 'required': [['a']]}}], tool_choice='required'),
     'must be a list of property names'),
    (dict(tools=[{'name': 'f', 'parameters': {'properties': {'a': {}}, 'required': 'a'}}], tool_choice='required'),
     'must be a list of property names'),
    (dict(tools=[{'name': 'f', 'parameters': {'properties': {'a': {}}, 'required': ['b']}}], tool_choice='required'),
     r"names \['b'\] that are not among its properties"),
])
def test_bad_structured_requests_are_refused_by_name(glm3_model, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        glm3_model.prepare('x', **kwargs)


def test_schemas_too_deep_or_too_big_are_refused_before_anything_is_compiled(glm2_model):
    deep = {'type': 'string'}
    for _ in range(40):
        deep = {'type': 'object', 'properties': {'a': deep}}
    with pytest.raises(InputError, match='nest more than 32 levels'):
        glm2_model.prepare('x', response_format={'type': 'json_schema', 'json_schema': {'schema': deep}})
    wide = {'type': 'object', 'properties': {f'p{i}': {'type': 'integer'} for i in range(12000)}}
    with pytest.raises(InputError, match='hold more than 20000 values'):
        glm2_model.prepare('x', response_format={'type': 'json_schema', 'json_schema': {'schema': wide}})


@pytest.mark.parametrize('family', ['glm2', 'glm3'])
def test_a_structured_reply_is_the_text_its_grammar_matched(request, family):
    """No chat-format clean-up touches it: ChatGLM3's message separator spelled inside a string, the
    training-date placeholder the official post-processing fills in."""
    model = request.getfixturevalue(f'{family}_model')
    text = 'x<|assistant|>y [[训练时间]]'
    response, history = model.chat('x', response_format={'type': 'json_schema', 'json_schema': {
        'schema': {'enum': [text]}}}, max_new_tokens=60)
    assert json.loads(response) == text
    assert history == [('x', response)]   # one reply, not split at the separator


def test_chatglm6b_placeholders_spelled_in_a_structured_reply_stay_text(glm1_model):
    """ChatGLM-6B's decoding turns '<n>' spelled piece by piece into a newline (which JSON strings may not
    hold raw): a structured reply is the bytes the grammar saw instead, and full-width punctuation stays."""
    text = '<n>a, 好,'
    for stream in (False, True):
        turn = glm1_model.turn('x', response_format={'type': 'json_schema', 'json_schema': {'schema': {'enum': [text]}}},
                               max_new_tokens=60)
        streamed = ''.join(turn)
        assert json.loads(turn.response) == text and streamed == turn.response


def test_forced_calls_follow_schemas_with_definitions(glm3_model):
    """pydantic (LangChain, Instructor) writes nested models as $refs into $defs."""
    tool = {'name': 'book', 'parameters': {
        '$defs': {'City': {'type': 'object', 'required': ['name'], 'additionalProperties': False,
                           'properties': {'name': {'type': 'string', 'maxLength': 6}}}},
        'type': 'object', 'required': ['city'], 'properties': {'city': {'$ref': '#/$defs/City'}}}}
    for seed in range(3):
        call, _ = glm3_model.chat('book', tools=[tool], tool_choice='required', do_sample=True, seed=seed,
                                  max_new_tokens=80)
        assert call['name'] == 'book'
        jsonschema.validate(call['parameters'], tool['parameters'])


def test_stop_token_ids_cannot_cut_a_structured_reply(glm2_model):
    """A stop id that is also text (',') is held back until the reply is complete: never a reply cut in
    the middle of its JSON with finish_reason stop."""
    tok = glm2_model.tokenizer
    comma = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == b',' and not tok.sp.IsByte(i)]
    schema = {'type': 'string', 'pattern': '^[a,]{4}$'}
    commas = 0
    for seed in range(4):
        turn = glm2_model.turn('x', response_format={'type': 'json_schema', 'json_schema': {'schema': schema}},
                               stop_token_ids=comma, do_sample=True, seed=seed, max_new_tokens=60)
        text = ''.join(turn)
        assert turn.finish_reason == 'stop' and len(json.loads(text)) == 4, text   # (',' spelled by its byte piece)
        commas += text.count(',')
    assert commas
    # where the grammar forces the very token a stop id takes, the request fails, saying why
    with pytest.raises(InputError, match='stop_token_ids take it'):
        glm2_model.chat('x', response_format={'type': 'json_schema', 'json_schema': {'schema': {
            'type': 'array', 'items': {'enum': ['a']}, 'minItems': 2, 'maxItems': 2}}},
            stop_token_ids=[i for i in range(tok.vocab_size) if tok.token_bytes(i) == b','])


def test_tool_choice_needs_chatglm3(glm2_model):
    with pytest.raises(InputError, match='ChatGLM3'):
        glm2_model.prepare('x', tools=[WEATHER], tool_choice='required')


def test_grammars_compile_once_and_stay_bounded(glm2_model, monkeypatch):
    text = structured.reply_grammar(glm2_model.format, {'type': 'json_object'})
    assert glm2_model.grammar(text) is glm2_model.grammar(text)
    monkeypatch.setattr(grammar, 'MAX_GRAMMARS', 2)
    first = glm2_model.grammar('start: "a"\n')
    glm2_model.grammar('start: "b"\n')
    glm2_model.grammar('start: "c"\n')
    assert glm2_model.grammar('start: "a"\n') is not first   # dropped, compiled again


def test_the_vocabulary_never_lets_a_grammar_spell_special_tokens(glm3_model):
    """ChatGLM3's role tokens decode to their text; inside a JSON string they would end the turn."""
    tok = glm3_model.tokenizer
    text = structured.reply_grammar(glm3_model.format, {'type': 'json_schema', 'json_schema': {
        'schema': {'type': 'string'}}})
    matcher = glm3_model.grammar(text).matcher()
    for token in tok.encode('\n"'):
        matcher.advance(token)
    allowed = grammar.allowed_tokens([matcher], 'cpu')[0]
    assert allowed.sum() > 100   # inside a string: most text is allowed
    for special in ('<|user|>', '<|assistant|>', '<|observation|>', '[gMASK]', 'sop'):
        assert not allowed[tok[special]]
    assert not allowed[tok.eos_id]


def test_tool_call_arguments_read_json_literals():
    assert parse_tool_call('tool_call(a=true, b=null, c=[false, {"d": 1.5}], e="x")') == {
        'a': True, 'b': None, 'c': [False, {'d': 1.5}], 'e': 'x'}
    assert parse_tool_call('tool_call(a=True, b=None)') == {'a': True, 'b': None}
    assert parse_tool_call('tool_call(a=undefined)') is None
    assert parse_tool_call('tool_call(a=1E400)') is None   # JSON allows it, but it reads as inf: no JSON arguments


def test_chatglm6b_punctuation_is_left_alone_in_structured_replies():
    text = '{"名": "好,"}'
    assert GLM1Format().parse_text(text, []).text == '{"名": "好，"}'   # the official clean-up...
    assert GLM1Format().parse_text(text, [], structured=True).text == text   # ...would break the JSON


def test_the_pipeline_takes_response_format(glm2_dir):
    import modelscope_chatglm  # noqa: F401 (registers with ModelScope)
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.chat, model=glm2_dir, device='cpu')
    out = pipe({'text': 'who?', 'history': []}, response_format=SCHEMA_FORMAT, max_new_tokens=120)
    jsonschema.validate(json.loads(out['response']), PERSON)


# -- over HTTP, through the openai client --------------------------------------------------------------
@pytest.fixture(scope='module')
def glm3_url(glm3_dir, tmp_path_factory):
    with serving(glm3_dir, tmp_path_factory.mktemp('structured')) as url:
        yield url


@pytest.fixture(scope='module')
def client(glm3_url):
    openai = pytest.importorskip('openai')
    return openai.OpenAI(base_url=f'{glm3_url}/v1', api_key='none', max_retries=0)


def test_openai_response_format_json_schema(client):
    for stream in (False, True):
        kwargs = dict(model='m', messages=[{'role': 'user', 'content': 'who?'}], response_format=SCHEMA_FORMAT,
                      max_tokens=120, temperature=0.9, seed=3, n=2)
        if stream:
            text = {}
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    text[choice.index] = text.get(choice.index, '') + (choice.delta.content or '')
            replies = list(text.values())
        else:
            replies = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
        assert len(replies) == 2
        for reply in replies:
            jsonschema.validate(json.loads(reply), PERSON)


def test_openai_forced_tool_call(client):
    tools = [{'type': 'function', 'function': WEATHER}, {'type': 'function', 'function': CLOCK}]
    r = client.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'Paris?'}], tools=tools,
                                       tool_choice={'type': 'function', 'function': {'name': 'get_weather'}},
                                       max_tokens=120, temperature=0.8, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == 'tool_calls'
    call = choice.message.tool_calls[0]
    assert call.function.name == 'get_weather'
    jsonschema.validate(json.loads(call.function.arguments), WEATHER['parameters'])
    r = client.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'Paris?'}], tools=tools,
                                       tool_choice='required', max_tokens=120, temperature=0.8, seed=2,
                                       parallel_tool_calls=False)
    assert r.choices[0].finish_reason == 'tool_calls' and len(r.choices[0].message.tool_calls) == 1


def test_a_schema_the_grammar_engine_refuses_is_a_400(glm3_url, glm3_model):
    import httpx
    bad = {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {'type': 'string', 'pattern': '(('}}}
    r = httpx.post(f'{glm3_url}/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'x'}],
                                                          'response_format': bad}, timeout=60)
    assert r.status_code == 400 and 'grammar cannot be used' in r.json()['error']['message'], r.text
    # a grammar that can go no further once the request runs is the client's to fix too (not a 500)
    tok = glm3_model.tokenizer
    dead_end = {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {
        'type': 'array', 'items': {'enum': ['a']}, 'minItems': 2, 'maxItems': 2}}}
    r = httpx.post(f'{glm3_url}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'x'}], 'response_format': dead_end,
        'stop_token_ids': [i for i in range(tok.vocab_size) if tok.token_bytes(i) == b',']})
    assert r.status_code == 400 and 'stop_token_ids take it' in r.json()['error']['message'], r.text
    ok = httpx.get(f'{glm3_url}/health', timeout=10)
    assert ok.status_code == 200
