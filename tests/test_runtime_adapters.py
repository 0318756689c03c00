"""LoRA adapters loaded and unloaded while serving: vLLM's POST /v1/load_lora_adapter and
/v1/unload_lora_adapter behind `serve --allow-runtime-adapters`. Real servers on 127.0.0.1 over a tiny
checkpoint and tiny LoRAs (`testing/tiny.py`), the engine underneath (changes between steps, CUDA graphs set
aside, the prefix cache dropped), and one test on a local Ray cluster with two replicas."""
import asyncio
import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import missing_optional, serving, start_service

import modelscope_chatglm
from modelscope_chatglm.adapters import read_to_add
from modelscope_chatglm.engine import graphs
from modelscope_chatglm.testing import tiny

httpx = pytest.importorskip('httpx')
pytest.importorskip('fastapi')

QUESTION = '你好，请介绍一下你自己。'


@pytest.fixture(scope='module')
def loras(glm2_dir, tmp_path_factory):
    """Two LoRAs for the tiny ChatGLM2 (different weights), one made for a wider base, a P-tuning checkpoint."""
    root = tmp_path_factory.mktemp('runtime-loras')
    made = {name: tiny.build_lora(str(root / name), glm2_dir, seed=seed) for name, seed in (('a', 1), ('b', 2))}
    wide = root / 'wide-base'       # a base whose hidden size is 96, not 64: its LoRA's A matrices do not fit
    wide.mkdir()
    config = json.loads(open(os.path.join(glm2_dir, 'config.json')).read())
    (wide / 'config.json').write_text(json.dumps(dict(config, hidden_size=96)))
    made['wide'] = tiny.build_lora(str(root / 'wide'), str(wide), seed=3)
    ptuning = root / 'ptuning'      # ptuning/main.py's checkpoint-N: config.json with pre_seq_len + the prefix encoder
    ptuning.mkdir()
    (ptuning / 'config.json').write_text(json.dumps({'pre_seq_len': 4, 'prefix_projection': False}))
    torch.save({'transformer.prefix_encoder.embedding.weight': torch.zeros(4, 2 * 2 * 2 * 16)},
               str(ptuning / 'pytorch_model.bin'))
    made['ptuning'] = str(ptuning)
    return made


@pytest.fixture(scope='module')
def live(glm2_dir, tmp_path_factory):
    """A server that may load adapters and starts with none."""
    with serving(glm2_dir, tmp_path_factory.mktemp('live'), '--name', 'base', '--allow-runtime-adapters') as url:
        yield url


@pytest.fixture(scope='module')
def started(glm2_dir, loras, tmp_path_factory):
    """The same with LoRA a given at start (`--adapter a=PATH`): the reference a runtime load must equal."""
    with serving(glm2_dir, tmp_path_factory.mktemp('started'), '--name', 'base', '--allow-runtime-adapters',
                 '--adapter', f'a={loras["a"]}') as url:
        yield url


def load(url, name, path, **extra):
    return httpx.post(f'{url}/v1/load_lora_adapter', json={'lora_name': name, 'lora_path': path, **extra}, timeout=120)


def unload(url, name):
    return httpx.post(f'{url}/v1/unload_lora_adapter', json={'lora_name': name}, timeout=300)


def models(url):
    return [m['id'] for m in httpx.get(f'{url}/v1/models', timeout=30).json()['data']]


def ask(url, model, content=QUESTION, max_tokens=10, **extra):
    """-> the response of one greedy chat request naming `model`."""
    return httpx.post(f'{url}/v1/chat/completions', timeout=300, json={
        'model': model, 'messages': [{'role': 'user', 'content': content}], 'temperature': 0,
        'max_tokens': max_tokens, **extra})


def reply(url, model, content=QUESTION, **extra):
    r = ask(url, model, content, **extra)
    assert r.status_code == 200, r.text
    return r.json()['choices'][0]['message']['content']


def test_an_adapter_loaded_while_serving_answers_as_one_given_at_start(live, started, loras):
    assert models(live) == ['base']
    base = reply(live, 'base')
    r = load(live, 'a-live', loras['a'])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a-live' added successfully.", r.text
    try:
        listed = httpx.get(f'{live}/v1/models', timeout=30).json()['data']
        assert [m['id'] for m in listed] == ['base', 'a-live'] and listed[1]['parent'] == 'base'
        tuned = ask(live, 'a-live')
        assert tuned.status_code == 200 and tuned.json()['model'] == 'a-live'
        assert tuned.json()['choices'][0]['message']['content'] == reply(started, 'a') != base
        assert reply(live, 'base') == base       # the base is untouched
    finally:
        assert unload(live, 'a-live').status_code == 200


def test_an_unloaded_adapter_is_an_unknown_model_and_the_base_is_unchanged(live, loras):
    base = reply(live, 'base')
    assert load(live, 'gone', loras['b']).status_code == 200
    assert reply(live, 'gone') != base
    r = unload(live, 'gone')
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gone' removed successfully.", r.text
    assert models(live) == ['base']
    r = ask(live, 'gone')
    assert r.status_code == 404 and r.json()['error']['type'] == 'model_not_found', r.text   # not the base's reply
    assert reply(live, 'base') == base
    r = unload(live, 'gone')
    assert r.status_code == 404 and "no adapter named 'gone'" in r.json()['error']['message'], r.text


def test_a_name_loaded_again_with_other_weights_never_reuses_the_old_cached_kv(live, loras):
    """The prefix cache keys K/V by adapter name: unloading drops that name's entries, so the same prompt
    under the same name, now with other weights, is computed afresh."""
    first = ask(live, 'same').status_code
    assert first == 404
    assert load(live, 'same', loras['a']).status_code == 200
    with_a = reply(live, 'same')
    again = ask(live, 'same').json()
    assert again['usage']['prompt_tokens_details']['cached_tokens'] > 0    # the prompt was cached under 'same'
    assert unload(live, 'same').status_code == 200
    assert load(live, 'same', loras['b']).status_code == 200
    assert load(live, 'b-reference', loras['b']).status_code == 200        # B under a name never used before
    try:
        fresh = ask(live, 'same').json()
        assert fresh['usage']['prompt_tokens_details']['cached_tokens'] == 0
        assert fresh['choices'][0]['message']['content'] == reply(live, 'b-reference') != with_a
    finally:
        assert unload(live, 'same').status_code == 200 and unload(live, 'b-reference').status_code == 200


def test_requests_running_with_an_adapter_finish_with_it_before_it_is_unloaded(live, started, loras):
    """Unloading refuses new requests for the adapter at once (404, gone from /v1/models), lets the ones
    already accepted finish with its weights, and answers once they have."""
    body = dict(max_tokens=1500, ignore_eos=True)
    want = reply(started, 'a', 'tell me a long story', **body)
    assert load(live, 'busy', loras['a']).status_code == 200
    streamed, events = {}, []

    def read_stream():
        text = []
        with httpx.stream('POST', f'{live}/v1/chat/completions', timeout=300, json={
                'model': 'busy', 'messages': [{'role': 'user', 'content': 'tell me a long story'}], 'temperature': 0,
                'stream': True, **body}) as r:
            for line in r.iter_lines():
                if line.startswith('data: ') and line != 'data: [DONE]':
                    event = json.loads(line[6:])
                    events.append(event)
                    if event.get('choices'):
                        text.append(event['choices'][0]['delta'].get('content') or '')
        streamed['text'], streamed['ended'] = ''.join(text), time.monotonic()

    reader = threading.Thread(target=read_stream)
    reader.start()
    deadline = time.monotonic() + 60
    while not events and time.monotonic() < deadline:   # until it streams
        time.sleep(0.01)
    unloaded = {}
    unloader = threading.Thread(target=lambda: unloaded.update(r=unload(live, 'busy'), at=time.monotonic()))
    unloader.start()
    while 'busy' in models(live) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 'ended' not in streamed, 'the stream ended before the unload began: make it longer'
    refused = ask(live, 'busy')                            # new requests: an unknown model, while it drains
    assert refused.status_code == 404, refused.text
    reader.join(timeout=300)
    unloader.join(timeout=300)
    assert not any('error' in event for event in events), [e for e in events if 'error' in e][:1]
    assert streamed['text'] == want                         # the adapter's reply to the end, not the base's
    assert unloaded['r'].status_code == 200, unloaded['r'].text
    assert unloaded['at'] >= streamed['ended'] - 0.5        # it answered once the stream was done
    assert models(live) == ['base']


def test_requests_are_served_throughout_loads_and_unloads(live, loras):
    """Requests for the base and for another adapter, sent all the while adapters come and go: every one
    succeeds with the reply it gets alone, and /health answers at once."""
    assert load(live, 'steady', loras['b']).status_code == 200
    expected = {name: reply(live, name) for name in ('base', 'steady')}
    stop_at, results, latencies = [False], [], []

    def client(name):
        while not stop_at[0]:
            r = ask(live, name)
            results.append((name, r.status_code, r.json()['choices'][0]['message']['content'] if r.status_code == 200
                            else r.text))

    def health():
        while not stop_at[0]:
            t = time.monotonic()
            httpx.get(f'{live}/health', timeout=30)
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)
    threads = [threading.Thread(target=client, args=(name,)) for name in ('base', 'steady', 'base')]
    threads.append(threading.Thread(target=health))
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            assert load(live, 'churn', loras['a' if round_ % 2 else 'b']).status_code == 200
            assert ask(live, 'churn').status_code == 200
            assert unload(live, 'churn').status_code == 200
    finally:
        stop_at[0] = True
        for t in threads:
            t.join(timeout=300)
        assert unload(live, 'steady').status_code == 200
    assert len(results) >= 6 and all(status == 200 and text == expected[name] for name, status, text in results), \
        [r for r in results if r[1] != 200 or r[2] != expected[r[0]]][:3]
    assert max(latencies) < 1.0, max(latencies)


def test_bad_names_and_paths_are_refused_with_what_to_do(live, started, loras, glm2_dir):
    cases = [
        (dict(lora_name='', lora_path=loras['a']), 400, 'lora_name must not be empty'),
        (dict(lora_name='  ', lora_path=loras['a']), 400, 'lora_name must not be empty'),
        (dict(lora_name='base', lora_path=loras['a']), 400, "'base' is the served model's name"),
        (dict(lora_name='x', lora_path='/nonexistent/lora'), 404, 'no such directory'),
        (dict(lora_name='x', lora_path=''), 400, 'lora_path must name'),
        (dict(lora_name='x', lora_path=glm2_dir), 400, 'is not an adapter: expected adapter_config.json'),
        (dict(lora_name='x', lora_path=loras['wide']), 400, 'made for another base model'),
        (dict(lora_name='x', lora_path=loras['ptuning']), 400, 'P-tuning v2 checkpoint'),
        (dict(lora_name='x'), 422, 'lora_path'),
        (dict(lora_name='x', lora_path=loras['a'], load_inplace=True), 400, "unknown field(s) ['load_inplace']"),
    ]
    for body, status, needle in cases:
        r = httpx.post(f'{live}/v1/load_lora_adapter', json=body, timeout=60)
        assert r.status_code == status and needle in r.json()['error']['message'], (body, r.text)
    assert load(live, 'twice', loras['a']).status_code == 200
    try:
        r = load(live, 'twice', loras['b'])                    # as vLLM: a name is loaded once
        assert r.status_code == 400 and "'twice' has already been loaded" in r.json()['error']['message'], r.text
        assert reply(live, 'twice') == reply(started, 'a')     # and keeps its first weights
    finally:
        assert unload(live, 'twice').status_code == 200
    for body, status, needle in [(dict(lora_name='never'), 404, "no adapter named 'never'"),
                                 (dict(lora_name=''), 400, 'lora_name must not be empty'),
                                 (dict(lora_name='base'), 400, "'base' is the served model, not an adapter")]:
        r = httpx.post(f'{live}/v1/unload_lora_adapter', json=body, timeout=60)
        assert r.status_code == status and needle in r.json()['error']['message'], (body, r.text)
    assert models(live) == ['base']                              # nothing was left half-loaded
    # On a server started with an adapter: its name is taken, and it stays.
    r = load(started, 'a', loras['b'])
    assert r.status_code == 400 and "'a' has already been loaded" in r.json()['error']['message'], r.text
    r = unload(started, 'a')
    assert r.status_code == 400 and 'given at start (--adapter a=PATH)' in r.json()['error']['message'], r.text
    assert models(started) == ['base', 'a']


def test_without_the_flag_the_routes_are_refused_and_name_it(glm2_dir, loras, tmp_path):
    with serving(glm2_dir, tmp_path, '--name', 'base') as url:
        for path, body in (('/v1/load_lora_adapter', {'lora_name': 'x', 'lora_path': loras['a']}),
                           ('/v1/unload_lora_adapter', {'lora_name': 'x'}), ('/v1/load_lora_adapter', {})):
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == 404 and '--allow-runtime-adapters' in r.json()['error']['message'], r.text
        assert models(url) == ['base']
        assert ask(url, 'any-name').status_code == 200   # without adapters, as before: any name is the base


# -- the engine underneath ----------------------------------------------------------------------------------
GREEDY = dict(max_new_tokens=12, do_sample=False)


def outputs(chat, engine, adapter=None):
    prompts = [chat.build_inputs(q) for q in ('你好', 'hello world, how are you today?', 'x')]
    seqs = [engine.submit(p, chat.sampling(**GREEDY), adapter=adapter) for p in prompts]
    engine.run_until_done(seqs)
    return [s.output for s in seqs]


def test_cuda_graphs_are_set_aside_while_the_model_holds_adapters(glm2_dir, loras):
    """A model loaded without adapters replays decode steps from graphs (here the graph runner's fixed-shape
    step, uncaptured on the CPU); a graph freezes which adapter each row takes, so from an added adapter on
    the steps run eagerly, and after the last is removed the same graphs replay again."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    engine = chat.new_engine(max_batch=4)
    kv = engine.runner.kv
    runner = graphs.GraphRunner(chat.model, kv.pool, 4, kv.scratch_page, capture=False)
    engine.runner.graphs = runner
    base = outputs(chat, engine)
    assert runner.tables                                  # decode steps went through the graph runner
    tuned = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter={'x': loras['a']})
    want = outputs(tuned, tuned.new_engine(max_batch=4), 'x')
    engine.add_adapter('x', read_to_add(loras['a'], chat.model))
    assert engine.runner.graphs is None and engine.adapters == ['x']
    assert outputs(chat, engine, 'x') == want != base
    assert outputs(chat, engine) == base
    cache = engine.scheduler.prefix_cache
    entries = cache.nodes
    engine.remove_adapter('x')
    assert engine.runner.graphs is runner and engine.adapters == []
    assert cache.nodes < entries                          # its cached K/V went with it
    pages = engine.scheduler.pages
    assert pages.free + cache.pages == pages.pages - len(pages.reserved)   # and every page is accounted for
    assert outputs(chat, engine) == base
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        engine.submit(chat.build_inputs('你好'), chat.sampling(**GREEDY), adapter='x')


def test_a_quantized_base_takes_an_adapter_while_serving(make_checkpoint, loras):
    path = make_checkpoint('runtime-int4', 'glm2', 'safetensors', shards=1, quantization_bit=4)
    chat = modelscope_chatglm.load(path, device='cpu', dtype='float32')
    engine = chat.new_engine()
    base = outputs(chat, engine)
    engine.add_adapter('x', read_to_add(loras['a'], chat.model))
    tuned = modelscope_chatglm.load(path, device='cpu', dtype='float32', adapter={'x': loras['a']})
    assert outputs(chat, engine, 'x') == outputs(tuned, tuned.new_engine(), 'x') != base


# -- on Ray Serve ----------------------------------------------------------------------------------------------
try:
    import ray.serve  # noqa: F401
except ImportError:
    @pytest.fixture(scope='module')
    def cluster():
        missing_optional('ray[serve] is not installed (pip install ".[ray]")', 'CHATGLM_REQUIRE_RAY')
else:
    from test_ray import cluster, wait_for_replicas  # noqa: F401  (a local Ray cluster of this module's own)


def test_an_adapter_loaded_through_ray_answers_from_every_replica_and_a_restarted_one(cluster, glm2_dir, loras,
                                                                                      tmp_path):
    """serve --ray with two replicas: a load reaches both; a replica started afterwards (one killed, Ray
    Serve starts another) has it too; an unload leaves none."""
    proc = start_service(['serve', '--ray', '--replicas', '2', '--max-batch', '64', '--model', glm2_dir,
                          '--device', 'cpu', '--dtype', 'float32', '--name', 'base', '--allow-runtime-adapters',
                          '--port', str(cluster.http_port)], f'{cluster.url}/health', tmp_path / 'serve.log',
                         env=cluster.env, timeout=240)
    url = cluster.url
    try:
        first = {r['replica'] for r in wait_for_replicas(url, 2)['replicas']}
        r = load(url, 'ray-a', loras['a'])
        assert r.status_code == 200, r.text
        assert models(url) == ['base', 'ray-a']
        tuned = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=loras['a'])

        def served_by(replicas, tries=60):
            """Conversations (each its own opening) until every one of `replicas` answered one with the adapter."""
            seen = set()
            for i in range(tries):
                question = f'conversation {i}'
                r = ask(url, 'ray-a', question, max_tokens=8)
                assert r.status_code == 200, r.text
                assert r.json()['choices'][0]['message']['content'] == tuned.chat(question, [], do_sample=False,
                                                                                 max_new_tokens=8)[0]
                seen.add(r.headers['x-chatglm-replica'])
                if replicas <= seen:
                    return seen
            pytest.fail(f'only {seen} of {replicas} answered')
        served_by(first)
        victim = sorted(cluster.replica_pids().items())[0]
        os.kill(victim[1], signal.SIGKILL)
        health = wait_for_replicas(url, 2, seconds=180, exclude={victim[0]})
        newcomer = {r['replica'] for r in health['replicas']} - first
        assert newcomer, health['replicas']
        served_by(newcomer)
        r = unload(url, 'ray-a')
        assert r.status_code == 200, r.text
        assert models(url) == ['base'] and ask(url, 'ray-a').status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_adapters_loaded_at_run_time_are_bounded(glm2_dir, loras, monkeypatch):
    """Each holds its weights: a client that loads without unloading is told to unload one first."""
    from modelscope_chatglm.serve import async_engine
    monkeypatch.setattr(async_engine, 'MAX_RUNTIME_ADAPTERS', 2)
    served = async_engine.AsyncEngine(modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32'))
    try:
        served.load_adapter_sync('one', loras['a'])
        served.load_adapter_sync('two', loras['b'])
        with pytest.raises(ValueError, match=r"2 adapters are loaded at run time already.*unload one first"):
            served.load_adapter_sync('three', loras['a'])
        assert served.adapters == ['one', 'two']
        asyncio.run(served.unload_adapter('one'))
        served.load_adapter_sync('three', loras['a'])   # room again
        assert sorted(served.adapters) == ['three', 'two']
    finally:
        served.engine.stop()
