"""The OpenAI-compatible server as a real process on 127.0.0.1, driven by the official `openai` client
and by raw HTTP."""
import contextlib
import json
import threading
import time

import pytest
from conftest import free_port, post_and_hang_up, start_service

httpx = pytest.importorskip('httpx')
openai = pytest.importorskip('openai')
pytest.importorskip('fastapi')

from modelscope_chatglm.serve.async_engine import Result  # noqa: E402
from modelscope_chatglm.serve.calls import chat_call, to_conversation  # noqa: E402
from modelscope_chatglm.serve.protocol import ChatCompletionRequest  # noqa: E402
from modelscope_chatglm.serve.responses import TextOffsets, message  # noqa: E402
import modelscope_chatglm  # noqa: E402

GREEDY = dict(temperature=0, max_tokens=8)


SERVER_LOGS = {}   # url -> the server's log file


@pytest.fixture(scope='module')
def server(glm2_dir, tmp_path_factory):
    port = free_port()
    url, log = f'http://127.0.0.1:{port}', tmp_path_factory.mktemp('server') / 'server.log'
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--name', 'tiny-glm2', '--max-body-bytes', '20000'], f'{url}/health', log)
    SERVER_LOGS[url] = log
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope='module')
def client(server):
    return openai.OpenAI(base_url=f'{server}/v1', api_key='not-needed', max_retries=0)


def expected(glm2_model, query, history=(), n=8):
    return glm2_model.chat(query, list(history), do_sample=False, max_new_tokens=n)[0]


API_KEY = 'test-key-7f3a'
AUTH = {'Authorization': f'Bearer {API_KEY}'}


@pytest.fixture(scope='module')
def glm3_server(glm3_dir, tmp_path_factory):
    """A ChatGLM3 server that wants an API key (given through the environment)."""
    import os
    port = free_port()
    proc = start_service(['serve', '--model', glm3_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port)],
                         f'http://127.0.0.1:{port}/health', tmp_path_factory.mktemp('server3') / 'server.log',
                         env=dict(os.environ, MODELSCOPE_CHATGLM_API_KEY=API_KEY))
    yield f'http://127.0.0.1:{port}'
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope='module')
def tenant_server(glm2_dir, tmp_path_factory):
    """A server for three tenants: two --api-key flags, the second a comma list."""
    port = free_port()
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--api-key', 'tenant-a', '--api-key', 'tenant-b,tenant-c'],
                         f'http://127.0.0.1:{port}/health', tmp_path_factory.mktemp('tenants') / 'server.log')
    yield f'http://127.0.0.1:{port}'
    proc.terminate()
    proc.wait(timeout=30)


def cached_tokens(url, key, content, salt=None):
    """(prompt tokens the server says came from its prefix cache, prompt tokens) of one request."""
    body = {'messages': [{'role': 'user', 'content': content}], 'max_tokens': 1, 'temperature': 0}
    if salt is not None:
        body['cache_salt'] = salt
    r = httpx.post(f'{url}/v1/chat/completions', json=body, headers={'Authorization': f'Bearer {key}'}, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()['usage']
    return usage['prompt_tokens_details']['cached_tokens'], usage['prompt_tokens']


def test_one_tenant_cannot_read_anothers_prompt_through_the_prefix_cache(tenant_server):
    """cached_tokens once counted the prefix shared with any client's request: one-token probes recovered
    a PIN another client had sent. Each API key, and each cache_salt within one, has a prefix cache of
    its own."""
    secret = 'My bank PIN is 7391, keep it safe.'
    _, total = cached_tokens(tenant_server, 'tenant-a', secret)
    assert cached_tokens(tenant_server, 'tenant-a', secret)[0] >= total - 1       # its own prompt, cached
    assert cached_tokens(tenant_server, 'tenant-b', secret)[0] == 0              # nothing of it for another key
    assert cached_tokens(tenant_server, 'tenant-c', secret + ' no')[0] == 0      # (keys of a comma list too)
    assert cached_tokens(tenant_server, 'tenant-a', secret, salt='s1')[0] == 0   # nor for another salt
    assert cached_tokens(tenant_server, 'tenant-a', secret, salt='s1')[0] >= total - 1
    for key in ('tenant-a,tenant-b', 'tenant-d', 'x'):
        r = httpx.post(f'{tenant_server}/v1/chat/completions', headers={'Authorization': f'Bearer {key}'},
                       json={'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 1}, timeout=60)
        assert r.status_code == 401


def test_an_api_key_that_could_never_match_is_refused_at_startup(glm2_dir):
    """A key an HTTP header cannot carry (non-ASCII, spaces) was accepted and then matched nothing."""
    import subprocess
    import sys
    for key in ('ключ', 'two words'):
        t = time.monotonic()
        out = subprocess.run([sys.executable, '-m', 'modelscope_chatglm.cli', 'serve', '--model', glm2_dir,
                              '--api-key', key], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and 'printable ASCII' in out.stderr and 'Traceback' not in out.stderr
        assert time.monotonic() - t < 60


def test_api_key_is_required_where_set(glm3_server, server):
    body = {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2, 'temperature': 0}
    for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': API_KEY}):
        r = httpx.post(f'{glm3_server}/v1/chat/completions', json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and 'API key' in r.json()['error']['message']
        assert r.headers['www-authenticate'] == 'Bearer'
    assert httpx.get(f'{glm3_server}/v1/models').status_code == 401
    assert httpx.post(f'{glm3_server}/', json={'prompt': 'hi'}).status_code == 401
    assert httpx.get(f'{glm3_server}/health').status_code == 200          # probes need no key
    assert httpx.post(f'{glm3_server}/v1/chat/completions', json=body, headers=AUTH, timeout=60).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f'{glm3_server}/v1', api_key='wrong', max_retries=0).models.list()
    assert httpx.post(f'{server}/v1/chat/completions', json=body, timeout=60).status_code == 200   # no key: open


def test_chatglm3_streamed_text_equals_the_non_streamed_text(glm3_server, glm3_model):
    """A ChatGLM3 reply starts with a metadata line; a reply with no newline at all is all text and
    must not be dropped from the stream."""
    client = openai.OpenAI(base_url=f'{glm3_server}/v1', api_key=API_KEY, max_retries=0)
    for query, n in (('你好', 3), ('你好', 12), ('hello', 6), ('介绍下清华大学', 20)):
        messages = [{'role': 'user', 'content': query}]
        whole = client.chat.completions.create(model='m', messages=messages, temperature=0, max_tokens=n)
        streamed = ''.join(c.choices[0].delta.content or '' for c in client.chat.completions.create(
            model='m', messages=messages, temperature=0, max_tokens=n, stream=True))
        assert streamed == whole.choices[0].message.content == glm3_model.chat(
            query, do_sample=False, max_new_tokens=n)[0]
    assert any(len(glm3_model.chat(q, do_sample=False, max_new_tokens=n)[0]) for q, n in (('你好', 3), ('hello', 6)))


def test_chatglm3_streams_equal_whole_replies_with_tools_and_long_replies(glm3_server):
    """Text, tool calls and finish reasons of a stream are the whole reply's: long greedy replies (the tiny
    model writes `<|assistant|>` segments of its own) with and without tools declared. (A stream once
    showed a raw segment the whole reply dropped, and one was empty where the whole reply had text.)"""
    client = openai.OpenAI(base_url=f'{glm3_server}/v1', api_key=API_KEY, max_retries=0)
    tools = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {
        'type': 'object', 'properties': {'city': {'type': 'string'}}}}}]
    for query in ('你好', 'hello', '北京天气如何?'):
        for extra in ({}, {'tools': tools}):
            args = dict(model='m', messages=[{'role': 'user', 'content': query}], temperature=0, max_tokens=300,
                        **extra)
            whole = client.chat.completions.create(**args).choices[0]
            chunks = [c.choices[0] for c in client.chat.completions.create(**args, stream=True) if c.choices]
            streamed = ''.join(c.delta.content or '' for c in chunks)
            calls = [(t.function.name, t.function.arguments) for c in chunks for t in (c.delta.tool_calls or [])]
            assert streamed == (whole.message.content or ''), (query, extra)
            assert calls == [(t.function.name, t.function.arguments) for t in (whole.message.tool_calls or [])]
            assert chunks[-1].finish_reason == whole.finish_reason


@contextlib.contextmanager
def health_latencies(server):
    """Poll /health every 50 ms while the block runs; yields the list of response times (s)."""
    latencies, done, failures = [], threading.Event(), []

    def poll():
        while not done.is_set():
            start = time.perf_counter()
            if httpx.get(f'{server}/health', timeout=30).status_code != 200:
                failures.append(time.perf_counter() - start)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield latencies
    finally:
        done.set()
        poller.join()
    assert not failures, f'/health failed {len(failures)} times'


def test_a_huge_conversation_does_not_stall_the_server(glm3_server):
    """2,000 short rounds (~150 KB): truncating them to the context window is encoded off the event
    loop, in O(log n) passes; /health keeps answering meanwhile."""
    messages = []
    for i in range(2000):
        messages += [{'role': 'user', 'content': f'第{i}个问题'}, {'role': 'assistant', 'content': f'第{i}个回答'}]
    messages.append({'role': 'user', 'content': '你好'})
    start = time.perf_counter()
    with health_latencies(glm3_server) as latencies:
        r = httpx.post(f'{glm3_server}/v1/chat/completions', timeout=300, headers=AUTH,
                       json={'messages': messages, 'max_tokens': 4, 'temperature': 0})
    took = time.perf_counter() - start
    assert r.status_code == 200, r.text
    assert r.json()['usage']['prompt_tokens'] <= 2048      # the oldest rounds were dropped to fit
    # /health answered at its pace (a poll every 50 ms plus its own time) for as long as the request
    # ran, each answer fast. (How long the request runs depends on the machine: a fixed count of polls
    # failed on a fast one, where it took 0.1 s.)
    assert max(latencies) < 1.0 and len(latencies) >= max(1, took / 0.2), (took, latencies)


@pytest.mark.parametrize('n', [1, 3])
def test_a_non_stream_client_that_hangs_up_is_cancelled(server, n):
    before = httpx.get(f'{server}/health').json()
    body = {'messages': [{'role': 'user', 'content': '你好'}], 'temperature': 0, 'max_tokens': 1500, 'n': n}
    post_and_hang_up(server, '/v1/chat/completions', body, running=n)
    wait_for_cancellation(server, before, jobs=n)
    assert httpx.get(f'{server}/health').json()['generated_tokens'] - before['generated_tokens'] < 1500 * n


def wait_for_cancellation(server, before, seconds=30, jobs=1):
    """Until /health counts `jobs` more cancelled jobs and the worker is idle, or fail."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = httpx.get(f'{server}/health').json()
        if health['cancelled'] >= before['cancelled'] + jobs and health['active'] == 0:
            return
        time.sleep(0.1)
    pytest.fail(f'the abandoned generation kept the worker busy: {health}')


def test_a_busy_server_says_so_and_sigterm_ends_it_within_seconds(glm2_dir, tmp_path):
    import signal
    from concurrent.futures import ThreadPoolExecutor
    port = free_port()
    # One request decodes (--max-batch 1), one waits (--max-queue 1): the other four must be turned away,
    # whenever they arrive.
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--max-queue', '1', '--max-batch', '1'], f'http://127.0.0.1:{port}/health',
                         tmp_path / 'busy.log')
    url = f'http://127.0.0.1:{port}/v1/chat/completions'
    body = {'messages': [{'role': 'user', 'content': '你好'}], 'temperature': 0, 'max_tokens': 1500}
    try:
        # Idle, a request of more choices than --max-queue runs: its choices take one place in the queue.
        r = httpx.post(url, json=dict(body, max_tokens=2, n=3, temperature=1, seed=1), timeout=120)
        assert r.status_code == 200 and len(r.json()['choices']) == 3, r.text
        streamed = []

        def stream():   # generating when SIGTERM comes: it must end with an error event and [DONE]
            with httpx.stream('POST', url, json=dict(body, stream=True), timeout=120) as r:
                streamed.extend(r.iter_lines())
        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(1)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, url, json=body, timeout=120) for _ in range(6)]
            busy, deadline = [], time.time() + 60
            while not busy and time.time() < deadline:
                busy = [f.result() for f in futures if f.done() and f.exception() is None
                        and f.result().status_code == 503]
                time.sleep(0.1)
            assert busy, 'six requests against --max-queue 1: some must be turned away'
            assert busy[0].headers['retry-after'] == '5' and '--max-queue 1' in busy[0].json()['error']['message']
            start = time.time()
            proc.send_signal(signal.SIGTERM)       # one generating, one queued: neither may hold the exit
            proc.wait(timeout=20)
            assert time.time() - start < 10
            for f in futures:                      # each an answer: its reply, or a JSON 503 (busy, or shutting down)
                r = f.result(timeout=20)
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    assert r.json()['error']['type'] in ('server_busy', 'server_unavailable')
            reader.join(timeout=20)
            lines = [line for line in streamed if line]
            assert lines[-1] == 'data: [DONE]' and any('shutting down' in line for line in lines), lines[-3:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_idle_slow_and_excess_connections_are_closed_and_the_server_keeps_serving(glm2_dir, tmp_path):
    """Connections that send nothing, or their headers a byte at a time, were never timed out, and with
    no connection limit they held the server at its file-descriptor limit (where it stopped accepting and
    logged a traceback per attempt: 26 MB in 10 s). Now a request's head has --header-timeout seconds and
    connections past --max-connections are closed at once; real clients are served throughout."""
    import socket
    port = free_port()
    log = tmp_path / 'conn.log'
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--max-connections', '16', '--header-timeout', '1.5'], f'http://127.0.0.1:{port}/health', log)
    try:
        idle = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(40)]
        slow = socket.create_connection(('127.0.0.1', port), timeout=10)
        slow.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n')
        start = time.monotonic()
        closed_slow = None
        while time.monotonic() - start < 6 and closed_slow is None:
            try:
                slow.sendall(b'X')                   # one header byte at a time
                slow.settimeout(0.3)
                if slow.recv(100) == b'':
                    closed_slow = time.monotonic() - start
            except socket.timeout:
                pass
            except OSError:
                closed_slow = time.monotonic() - start
        assert closed_slow is not None and closed_slow < 4, closed_slow
        for sock in idle:                            # the excess at once, the rest at the deadline
            sock.settimeout(5)
            assert sock.recv(100) == b''
            sock.close()
        r = httpx.post(f'http://127.0.0.1:{port}/v1/chat/completions', timeout=60,
                       json={'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2, 'temperature': 0})
        assert r.status_code == 200
        assert log.stat().st_size < 200_000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_vanishing_temperature_samples_like_greedy(server, glm2_model):
    """temperature 1e-45 used to overflow the logits to NaN (a 500); now it is all but greedy."""
    greedy = expected(glm2_model, '你好', n=8)
    r = httpx.post(f'{server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': '你好'}], 'temperature': 1e-45, 'max_tokens': 8})
    assert r.status_code == 200 and r.json()['choices'][0]['message']['content'] == greedy
    r = httpx.post(f'{server}/', json={'prompt': '你好', 'temperature': 1e-45, 'max_length': 64}, timeout=60)
    assert r.status_code == 200 and r.json()['response'].startswith(greedy)


def hostile_bodies(seed: int, count: int):
    """A seeded stream of malformed and hostile request bodies: valid ones with a field replaced by
    junk (wrong types, extreme numbers, odd Unicode), fields dropped or added, raw broken JSON."""
    import random
    rng = random.Random(seed)
    junk = [None, True, -1, 0, 2 ** 63, 10 ** 30, -1e308, 1e-45, float('inf'), 'x', '', '\ud800', '\x00' * 50,
            'é' * 3000, [], [1, 2], {}, {'a': [{'b': None}]}, [[[[[]]]]], '{"']
    fields = ['messages', 'temperature', 'top_p', 'max_tokens', 'stop', 'seed', 'stream', 'tools', 'n', 'model']
    for i in range(count):
        body = {'messages': [{'role': 'user', 'content': rng.choice(['你好', 'hi', 'a' * 500, '\u200b\n\t'])}],
                'max_tokens': rng.choice([1, 2, 3]), 'temperature': 0}
        kind = rng.random()
        if kind < 0.5:
            body[rng.choice(fields)] = rng.choice(junk)
        elif kind < 0.65:
            body['messages'][0][rng.choice(['role', 'content', 'name', 'tool_calls'])] = rng.choice(junk)
        elif kind < 0.75:
            body.pop(rng.choice(list(body)))
        elif kind < 0.85:
            body['messages'].insert(0, {'role': rng.choice(['assistant', 'tool', 'system', 'user', 'x']),
                                        'content': rng.choice(junk + ['ok']), 'tool_calls': rng.choice(
                                            [None, [{'function': {'name': 'f', 'arguments': rng.choice(
                                                ['[1]', '{', '1', '{"a": 1}', '"s"'])}}]])})
        else:
            yield ('/' if i % 2 else '/v1/chat/completions'), json.dumps(body)[:rng.randrange(1, 60)].encode()
            continue
        try:
            text = json.dumps(body, allow_nan=True)
        except (TypeError, ValueError):
            continue
        yield ('/' if rng.random() < 0.15 else '/v1/chat/completions'), text.encode('utf-8', 'surrogatepass')


def test_fuzzed_requests_never_get_an_unexpected_500_and_health_stays_fast(server):
    statuses = {}
    with health_latencies(server) as latencies:
        for path, body in hostile_bodies(seed=20261122, count=300):
            r = httpx.post(server + path, content=body, headers={'content-type': 'application/json'}, timeout=120)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400, 413, 422), (r.status_code, body[:300], r.text[:300])
            if r.status_code != 200:
                assert r.json()['error']['message'], r.text      # every rejection says what is wrong
    assert sum(statuses.values()) >= 250 and statuses.get(200, 0) > 10 and statuses.get(422, 0) > 10, statuses
    assert max(latencies) < 1.0, max(latencies)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ['tiny-glm2']
    health = httpx.get(f'{server}/health').json()
    assert health['status'] == 'ok' and health['model'] == 'tiny-glm2'


def test_openai_client_non_streaming(client, glm2_model):
    reply = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                           **GREEDY)
    assert reply.choices[0].message.content == expected(glm2_model, '你好')
    assert reply.choices[0].finish_reason in ('stop', 'length')
    prompt_tokens = len(glm2_model.build_inputs('你好'))
    assert reply.usage.prompt_tokens == prompt_tokens and 0 < reply.usage.completion_tokens <= 8
    # history in OpenAI form becomes the ChatGLM rounds
    messages = [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': 'hi'},
                {'role': 'user', 'content': '介绍下清华大学'}]
    reply = client.chat.completions.create(model='tiny-glm2', messages=messages, **GREEDY)
    assert reply.choices[0].message.content == expected(glm2_model, '介绍下清华大学', [('你好', 'hi')])


def test_openai_client_streaming(client, glm2_model):
    stream = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                            stream=True, **GREEDY)
    chunks = list(stream)
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text.strip() == expected(glm2_model, '你好')
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert chunks[-1].choices[0].finish_reason in ('stop', 'length')


def test_sse_framing(server):
    body = {'messages': [{'role': 'user', 'content': 'hi'}], 'stream': True, **GREEDY}
    with httpx.stream('POST', f'{server}/v1/chat/completions', json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
        data = [line[len('data: '):] for line in r.iter_lines() if line.startswith('data: ')]
    assert data[-1] == '[DONE]'
    payloads = [json.loads(d) for d in data[:-1]]
    assert all(p['object'] == 'chat.completion.chunk' for p in payloads)
    assert not any('usage' in p for p in payloads)   # as OpenAI: no usage unless stream_options asks for it
    body['stream_options'] = {'include_usage': True}
    with httpx.stream('POST', f'{server}/v1/chat/completions', json=body, timeout=60) as r:
        data = [line[len('data: '):] for line in r.iter_lines() if line.startswith('data: ')]
    assert data[-1] == '[DONE]'
    payloads = [json.loads(d) for d in data[:-1]]
    assert [p['choices'] for p in payloads if 'usage' in p] == [[]] and 'usage' in payloads[-1]
    assert payloads[-1]['usage']['completion_tokens'] > 0 and payloads[-2]['choices'][0]['finish_reason']


def test_stop_strings_cut_the_reply(client, glm2_model):
    full = expected(glm2_model, '你好', n=12)
    stop = full[3:5]
    reply = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                           temperature=0, max_tokens=12, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)].strip()
    assert reply.choices[0].finish_reason == 'stop'


def test_a_streamed_reply_never_sends_part_of_a_stop_string(client, glm2_model):
    """A stop string that spans two deltas: the first delta's end could begin it, so it is held back
    until the next shows it does. The stream used to send that end before seeing the rest."""
    turn = glm2_model.turn('你好', do_sample=False, max_new_tokens=12)
    deltas = [d for d in turn if d]
    reply = ''.join(deltas)
    ends = [len(''.join(deltas[:i + 1])) for i in range(len(deltas) - 1)]   # where a delta ends
    stop = next(reply[e - 1:e + 1] for e in ends if reply.index(reply[e - 1:e + 1]) == e - 1)
    kept = reply[:reply.index(stop)]
    for streaming in (True, False):
        out = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                             temperature=0, max_tokens=12, stop=[stop, 'never said'],
                                             stream=streaming)
        if streaming:
            chunks = list(out)
            sent = [c.choices[0].delta.content or '' for c in chunks if c.choices]
            assert ''.join(sent) == kept and chunks[-1].choices[0].finish_reason == 'stop'
        else:
            assert out.choices[0].message.content == kept.strip() and out.choices[0].finish_reason == 'stop'


def test_fifty_concurrent_streaming_clients_get_their_own_answers(server, glm2_model):
    queries = [f'问题 {i}: tell me about {i}' for i in range(50)]
    answers = {q: expected(glm2_model, q) for q in queries}
    results, errors = {}, []

    def ask(q):
        try:
            body = {'messages': [{'role': 'user', 'content': q}], 'stream': True, **GREEDY}
            text = ''
            with httpx.stream('POST', f'{server}/v1/chat/completions', json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith('data: ') and line != 'data: [DONE]':
                        choice = json.loads(line[6:])['choices'][0]
                        text += choice['delta'].get('content') or ''
            results[q] = text.strip()
        except Exception as e:   # collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert results == answers


@pytest.mark.parametrize('n', [1, 3])
def test_client_disconnect_cancels_its_generation(server, n):
    before = httpx.get(f'{server}/health').json()
    body = {'messages': [{'role': 'user', 'content': '你好'}], 'stream': True, 'temperature': 0, 'max_tokens': 1500,
            'n': n}
    with httpx.stream('POST', f'{server}/v1/chat/completions', json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break   # the first real delta: now hang up
    wait_for_cancellation(server, before, jobs=n)   # every choice leaves the batch
    ok = httpx.post(f'{server}/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'hi'}],
                                                           **GREEDY}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize('body,status,needle', [
    (b'{"messages": [', 422, 'the body is not valid JSON (Expecting value at character 14)'),
    (b'{"messages": ' + b'[' * 5000 + b']' * 5000 + b'}', 400, 'nests arrays or objects too deeply'),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, 'not UTF-8'),
    (b'{}', 422, 'messages'),
    (b'{"messages": "hi"}', 422, 'messages'),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 422, 'role'),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', 422, 'temperature'),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 422, 'max_tokens'),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', 422, 'max_tokens'),   # not 1
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 422, 'max_tokens'),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 422, 'stream'),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', 400, 'last message'),
    (b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}', 400, 'system'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x' * 30000}]}).encode(), 413, 'limit'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'stop': ['a', 'b', 'c', 'd', 'e']}).encode(), 400,
     'at most 4'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'seed': 10 ** 23}).encode(), 400, 'seed'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'n': 17}).encode(), 400, 'at most 16 choices'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'n': 0}).encode(), 422, 'n: Input should be'),
    (b'{"messages": [{"role": "user", "content": "\\ud800 x"}]}', 400, 'lone surrogate'),
    # OpenAI options this server does not do are refused by name, never silently ignored
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'top_logprobs': 3}).encode(), 400,
     'top_logprobs needs logprobs: true'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'logprobs': True, 'top_logprobs': 21}).encode(), 422,
     'top_logprobs'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'response_format': {'type': 'xml'}}).encode(),
     400, "response_format type 'xml' is not one of"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'response_format': {'type': 'json_schema'}}).encode(),
     400, 'the schema (a JSON object) is missing'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'tool_choice': 'required'}).encode(), 400,
     "tool_choice 'required' needs tools"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'functions': [{'name': 'f'}]}).encode(), 400,
     'send `tools`'),
    (json.dumps({'messages': [{'role': 'user', 'content': [
        {'type': 'text', 'text': 'what is this?'}, {'type': 'image_url', 'image_url': {'url': 'http://x/y.png'}}]}]}
     ).encode(), 400, "type ['image_url'] cannot be read"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 4, 'max_completion_tokens': 5}).encode(),
     400, 'disagree'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'logit_bias': {'99999999': 5}}).encode(), 400,
     'beyond the vocabulary'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'logit_bias': {'5': 500}}).encode(), 400,
     'logit_bias must map token ids'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'logit_bias': {'a': 5}}).encode(), 400,
     'logit_bias keys must be token ids'),
    # int() reads these as 5, 10 and 5: only ASCII digits name a token
    *[(json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'logit_bias': {key: 5}}).encode(), 400,
       'ASCII digits') for key in (' 5 ', '1_0', '\u0665', '+5')],
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'cache_salt': ''}).encode(), 422, 'cache_salt'),
    # a field that is neither OpenAI's nor vLLM's is named, never dropped (--allow-unknown-fields drops it)
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'temprature': 0.5}).encode(), 400,
     "unknown field(s) ['temprature']"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'guided_json': {}}).encode(), 400,
     "unknown field(s) ['guided_json']"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'stream': True,
                 'stream_options': {'include_usage': True, 'usage_every': 1}}).encode(), 400,
     "unknown field(s) ['stream_options.usage_every']: not an option of the OpenAI API or of vLLM that this server "
     "implements (docs/serving.md lists them); remove them"),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'stream_options': {'include_usage': True}}).encode(),
     400, 'stream_options needs stream: true'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'stop_token_ids': [10 ** 7]}).encode(), 400,
     'stop_token_ids names token ids [10000000] beyond the vocabulary'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'skip_special_tokens': False}).encode(), 400,
     'skip_special_tokens=false is not supported'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'min_tokens': 9, 'max_tokens': 4}).encode(), 400,
     'min_tokens=9 is more than max_tokens=4'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'min_p': 1.5}).encode(), 422, 'min_p'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'stream_options': {'include_usage': 'yes'}}).encode(),
     422, 'stream_options.include_usage'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'presence_penalty': 3}).encode(), 422,
     'presence_penalty'),
    (json.dumps({'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 10 ** 12}).encode(), 400, 'no room'),
    (json.dumps({'messages': [
        {'role': 'user', 'content': 'x'},
        {'role': 'assistant', 'content': None,
         'tool_calls': [{'id': '1', 'type': 'function', 'function': {'name': 'f', 'arguments': '[1, 2]'}}]},
        {'role': 'tool', 'content': 'r', 'tool_call_id': '1'}]}).encode(), 400, 'must be a JSON object'),
    *[(json.dumps({'messages': [
        {'role': 'user', 'content': 'x'},
        {'role': 'assistant', 'content': None,
         'tool_calls': [{'id': '1', 'type': 'function', 'function': {'name': 'f', 'arguments': arguments}}]},
        {'role': 'tool', 'content': 'r', 'tool_call_id': '1'}]}).encode(), 400, "tool call 'f': arguments are not JSON")
      for arguments in ('not json', '[' * 5000 + ']' * 5000, '{"a": ' + '9' * 5000 + '}')],
])
def test_bad_requests_get_4xx_and_the_server_lives(server, body, status, needle):
    r = httpx.post(f'{server}/v1/chat/completions', content=body, headers={'content-type': 'application/json'},
                   timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()['error']['message']
    assert httpx.get(f'{server}/health').status_code == 200


def test_a_chunked_body_is_counted_as_it_arrives(server):
    """A chunked upload (no Content-Length) is read chunk by chunk against --max-body-bytes: one byte at
    a time it is served, and one past the limit is a 413. (It collects into a bytearray: appending each
    chunk to bytes copied the whole body every time, 500 GB for a 1 MiB body sent a byte at a time.)"""
    body = json.dumps({'messages': [{'role': 'user', 'content': 'hi'}], **GREEDY}).encode()
    body = body[:-1] + b' ' * (19_000 - len(body)) + b'}'

    def trickle():
        for i in range(len(body)):
            yield body[i:i + 1]
    r = httpx.post(f'{server}/v1/chat/completions', content=trickle(), headers={'content-type': 'application/json'},
                   timeout=120)
    assert r.status_code == 200, r.text
    too_big = httpx.post(f'{server}/v1/chat/completions', content=iter([body, b' ' * 2000]), timeout=30)
    assert too_big.status_code == 413 and 'over the limit' in too_big.json()['error']['message']


def test_classic_chatglm_api(server, glm2_model):
    r = httpx.post(f'{server}/', json={'prompt': '你好', 'history': [], 'max_length': 2048, 'top_p': 0.7,
                                       'temperature': 0.95}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body['status'] == 200 and body['history'][-1][0] == '你好' and body['history'][-1][1] == body['response']
    assert len(body['time']) == 19
    bad = httpx.post(f'{server}/', json={'prompt': 'x', 'history': [['only one']]}, timeout=30)
    assert bad.status_code in (400, 422)


def test_openai_options_at_their_defaults_change_nothing(client, glm2_model):
    """What OpenAI clients (LangChain, the SDK's helpers) send by default is accepted and gives the
    plain greedy reply; the newer name max_completion_tokens counts like max_tokens."""
    defaults = dict(logprobs=False, response_format={'type': 'text'}, tool_choice='auto', logit_bias={},
                    presence_penalty=0, frequency_penalty=0, user='someone', stream_options=None)
    reply = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                           temperature=0, max_completion_tokens=8, **defaults)
    assert reply.choices[0].message.content == expected(glm2_model, '你好', n=8)
    assert reply.usage.completion_tokens <= 8


def test_penalties_and_logit_bias_reach_the_sampler(client, glm2_model):
    """frequency_penalty, presence_penalty and logit_bias each change the greedy reply over HTTP, and
    give what the Python API gives with the same options."""
    tok = glm2_model.tokenizer
    plain = expected(glm2_model, '你好', n=48)   # the tiny model repeats itself within 48 tokens
    favourite = tok.encode('hello')[-1]
    for options in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(logit_bias={str(favourite): 100})):
        reply = client.chat.completions.create(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}],
                                               temperature=0, max_tokens=48, **options)
        text = reply.choices[0].message.content
        python_options = dict(options, logit_bias={favourite: 100}) if 'logit_bias' in options else options
        assert text == glm2_model.chat('你好', [], do_sample=False, max_new_tokens=48, **python_options)[0]
        assert text != plain, options
    assert text == tok.decode([favourite] * 48).strip()


def test_logprobs_are_the_models_and_stream_with_their_tokens(client, glm2_model):
    """Each generated token's log-probability under the model (its raw logits), with the top
    alternatives; streamed, each chunk carries the tokens generated since the last one."""
    ask = dict(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}], temperature=0, max_tokens=8,
               logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == 'length'
    for entry in content:   # greedy: each token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].bytes == entry.bytes
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    prompt = glm2_model.build_inputs('你好')
    tokens = glm2_model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert [bytes(e.bytes) for e in content] == [glm2_model.tokenizer.token_bytes(t) for t in tokens]
    assert glm2_model.tokenizer.decode(tokens).strip() == reply.choices[0].message.content
    first = glm2_model.logits(prompt)[0, -1, :glm2_model.tokenizer.vocab_size].log_softmax(-1)
    assert abs(content[0].logprob - float(first[tokens[0]])) < 1e-4
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(first.topk(3).values.tolist(), abs=1e-4)

    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in content]
    # (this request's prompt came from the prefix cache: the same logits up to summation order)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(**dict(ask, logprobs=None, top_logprobs=None))
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_completions_score_an_echoed_prompt(client, glm2_model):
    """echo with logprobs (how evaluation harnesses score text): each token of the prompt the caller
    sent (not the [gMASK] sop put before it) with its logprob given those before it, as the full
    forward gives them, then the generated tokens'. max_tokens=0 only scores. The prefix cache, which
    keeps K/V and no logits, is not used for it. Streamed, the echo chunk carries the prompt's logprobs."""
    tok = glm2_model.tokenizer
    prompt = 'The capital of France is Paris'
    ids = glm2_model.format.wrap(tok, tok.encode(prompt))
    expected = glm2_model.logits(ids)[0, :, :tok.vocab_size].log_softmax(-1)
    want = [float(expected[p - 1, ids[p]]) for p in range(2, len(ids))]
    ask = dict(model='tiny-glm2', prompt=prompt, echo=True, logprobs=3, temperature=0)
    for _ in range(2):   # the second time the prefix cache holds the prompt
        scored = client.completions.create(**ask, max_tokens=0)
        choice = scored.choices[0]
        assert choice.text == prompt and scored.usage.completion_tokens == 0 and choice.finish_reason == 'length'
        # the tokens spell the prompt: the first loses the space SentencePiece puts before a text
        assert choice.logprobs.tokens == [tok.token_bytes(t).decode('utf-8', 'backslashreplace')[p == 2:]
                                          for p, t in enumerate(ids) if p >= 2]
        assert ''.join(choice.logprobs.tokens) == prompt
        assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
        assert all(max(top.values()) >= lp and len(top) == 3
                   for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
        assert scored.usage.prompt_tokens_details.cached_tokens == 0
    plain = client.completions.create(model='tiny-glm2', prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    both = client.completions.create(**ask, max_tokens=4)
    assert both.choices[0].text == prompt + plain.choices[0].text
    assert both.choices[0].logprobs.tokens == choice.logprobs.tokens + plain.choices[0].logprobs.tokens
    assert both.choices[0].logprobs.token_logprobs == pytest.approx(
        want + plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    parts = list(client.completions.create(**ask, max_tokens=4, stream=True))
    assert parts[0].choices[0].text == prompt and parts[0].choices[0].logprobs.tokens == choice.logprobs.tokens
    assert ''.join(p.choices[0].text for p in parts) == both.choices[0].text
    streamed = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == both.choices[0].logprobs.tokens


def test_completion_text_continues_its_prompt_and_offsets_point_into_it(glm2_model, server):
    """A completion is the text its tokens add after the prompt: a first piece's leading space stays
    (decoded alone SentencePiece would drop it: 'is' + 'Paris'), so echo + completion reads as the
    decode of all the tokens. text_offset points each token into the text: characters, with a
    character split over byte tokens counted once; the tokens join to the text. Streamed = whole."""
    tok = glm2_model.tokenizer
    spaced = split = 0
    for prompt in ['hello world hello', ' hello', 'x', '你好，世界', '  two spaces', 'tab\there', '\n', '😀']:
        body = {'prompt': prompt, 'echo': True, 'logprobs': 1, 'max_tokens': 10, 'temperature': 0}
        choice = httpx.post(f'{server}/v1/completions', json=body, timeout=60).json()['choices'][0]
        ids = glm2_model.format.wrap(tok, tok.encode(prompt))
        out = glm2_model.generate(ids, max_new_tokens=10, do_sample=False)
        text, lp = choice['text'], choice['logprobs']
        assert text == prompt + tok.decode(ids + out)[len(tok.decode(ids)):] == tok.decode(ids + out), prompt
        completion = text[len(prompt):]
        spaced += completion.startswith(' ')
        raws = [tok.token_bytes(t) for t in ids[2:] + out]
        assert len(lp['tokens']) == len(raws) and lp['text_offset'] == sorted(lp['text_offset'])
        for token, offset, raw in zip(lp['tokens'], lp['text_offset'], raws):
            try:
                raw.decode('utf-8')
            except UnicodeDecodeError:   # part of a character: it begins where the character does
                split += 1
                assert text[offset] == '\ufffd' or len(text[offset].encode()) > 1, (prompt, token, offset)
                continue
            assert text[offset:offset + len(token)] == token, (prompt, token, offset, text)
        if all(raw.decode('utf-8', 'replace') == raw.decode('utf-8', 'ignore') for raw in raws):
            assert ''.join(lp['tokens']) == text
        streamed, tokens, offsets = '', [], []
        with httpx.stream('POST', f'{server}/v1/completions', json=dict(body, stream=True), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith('data: {'):
                    part = json.loads(line[6:])['choices'][0]
                    streamed += part['text']
                    if part['logprobs']:
                        tokens += part['logprobs']['tokens']
                        offsets += part['logprobs']['text_offset']
        assert (streamed, tokens, offsets) == (text, lp['tokens'], lp['text_offset']), prompt
    assert spaced and split, 'these prompts must reach a space-led continuation and a character split over tokens'


def test_text_offsets_count_the_characters_sentencepiece_decodes(glm2_model):
    """text_offset against the real tokenizer on random token runs heavy in byte pieces (characters
    split over tokens, bytes that never make one): every token that is whole UTF-8 is found at its
    offset in the decoded text, and the offsets end where the text does."""
    import random
    tok = glm2_model.tokenizer
    byte_pieces = [tok.sp.PieceToId(f'<0x{b:02X}>') for b in (0x61, 0xE4, 0xB8, 0x96, 0xF0, 0x9F, 0x98, 0x80,
                                                                0xED, 0xA0, 0xC0, 0xFF, 0xC2, 0xF4, 0x90)]
    plain = [i for i in range(3, 300) if not tok.sp.IsByte(i) and not tok.sp.IsControl(i)]
    anchor = tok.encode('a')            # a text before the run: its first piece keeps its leading space
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice(byte_pieces if rng.random() < 0.7 else plain) for _ in range(rng.randint(1, 12))]
        text = tok.decode(anchor + ids)[len(tok.decode(anchor)):]
        raws = [tok.token_bytes(i) for i in ids]
        offsets = TextOffsets()
        starts = offsets(raws[:3]) + offsets(raws[3:])           # (streamed in two chunks)
        assert offsets.at + len(offsets.pending) == len(text), (ids, text)
        for raw, start in zip(raws, starts):
            with contextlib.suppress(UnicodeDecodeError):
                assert text[start:start + len(raw.decode('utf-8'))] == raw.decode('utf-8'), (ids, text, start)


def test_n_choices_are_samples_each_reproduced_by_a_request_alone(client):
    """n=3 with a seed: choice i is the reply of the same request with n=1 and seed + i, and the choices
    differ; usage counts the prompt once and every choice's tokens. Streamed, each choice's chunks (by
    index) make the same text, each choice finishes, and the usage comes once, at the end."""
    ask = dict(model='tiny-glm2', messages=[{'role': 'user', 'content': '你好'}], temperature=1.0, max_tokens=12)
    reply = client.chat.completions.create(**ask, n=3, seed=7)
    texts = [c.message.content for c in reply.choices]
    alone = [client.chat.completions.create(**ask, seed=7 + i) for i in range(3)]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [a.choices[0].message.content for a in alone]
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    chunks = list(client.chat.completions.create(**ask, n=3, seed=7, stream=True,
                                                 stream_options={'include_usage': True}))
    streamed, finished = ['', '', ''], []
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ''
            if choice.finish_reason:
                finished.append(choice.index)
    assert [text.strip() for text in streamed] == texts and sorted(finished) == [0, 1, 2]
    assert [c.usage for c in chunks if c.usage] == [chunks[-1].usage] and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    greedy = dict(ask, temperature=0)   # as OpenAI: the greedy reply n times
    one = client.chat.completions.create(**greedy).choices[0].message.content
    assert [c.message.content for c in client.chat.completions.create(**greedy, n=2).choices] == [one, one]


def test_n_choices_prefill_their_prompt_once(server):
    """The choices of a long prompt share its K/V: one prefills it, the others take it over."""
    prompt = ' '.join(f'word{i}' for i in range(60)) + ' -- a prompt the prefix cache has never seen'
    before = metrics_of(server)
    r = httpx.post(f'{server}/v1/chat/completions', timeout=120, json={
        'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': 4, 'n': 4, 'seed': 1})
    after = metrics_of(server)
    tokens = r.json()['usage']['prompt_tokens']
    assert r.status_code == 200 and len(r.json()['choices']) == 4 and tokens > 64
    cached = r.json()['usage']['prompt_tokens_details']['cached_tokens']   # the template's start, at most
    assert cached < 20 and after['chatglm_prompt_tokens_total'] - before['chatglm_prompt_tokens_total'] == 4 * tokens
    computed = 4 * tokens - (after['chatglm_cached_prompt_tokens_total'] - before['chatglm_cached_prompt_tokens_total'])
    assert computed == (tokens - cached) + 3 * 1   # the first choice's prompt, and each other's last token


def continued(glm2_model, prompt_ids, n):
    """What the model continues a prompt with, greedy: the text its tokens add to the prompt's (a stop
    id left out)."""
    tok = glm2_model.tokenizer
    out = glm2_model.generate(prompt_ids, max_new_tokens=n, do_sample=False)
    before, whole = tok.decode(prompt_ids), tok.decode(prompt_ids + (out[:-1] if out[-1] in tok.stop_ids else out))
    assert whole.startswith(before)
    return whole[len(before):]


def test_completions_continue_a_plain_prompt(client, glm2_model):
    """/v1/completions: the prompt as it is (no chat template), [gMASK] sop before it; as text or as
    token ids; echo; streamed text and logprobs equal the whole reply's; stop strings cut it unstripped."""
    tok = glm2_model.tokenizer
    prompt = 'The capital of France is'
    ids = glm2_model.format.wrap(tok, tok.encode(prompt))
    assert ids[:2] == tok.prefix_ids
    expect = continued(glm2_model, ids, 12)
    reply = client.completions.create(model='tiny-glm2', prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == expect and reply.object == 'text_completion' and reply.id.startswith('cmpl-')
    assert reply.usage.prompt_tokens == len(ids) and len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert all(max(top.values()) == lp for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
    by_ids = client.completions.create(model='tiny-glm2', prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expect
    echoed = client.completions.create(model='tiny-glm2', prompt=[prompt], max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expect
    parts = list(client.completions.create(model='tiny-glm2', prompt=prompt, max_tokens=12, temperature=0,
                                           logprobs=2, stream=True, stream_options={'include_usage': True}))
    usage, parts = parts[-1], parts[:-1]
    assert ''.join(p.choices[0].text for p in parts) == expect and parts[-1].choices[0].finish_reason == 'length'
    streamed = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == choice.logprobs.tokens and usage.choices == [] and usage.usage.completion_tokens == 12
    stop = expect[4:6]
    cut = client.completions.create(model='tiny-glm2', prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expect[:expect.index(stop)] and cut.choices[0].finish_reason == 'stop'
    default = client.completions.create(model='tiny-glm2', prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16   # OpenAI's default max_tokens for completions
    # n choices, each echoing the prompt; streamed, each choice's chunks by index make its text
    sampled = dict(model='tiny-glm2', prompt=prompt, max_tokens=8, temperature=1.0, seed=5, echo=True)
    many = client.completions.create(**sampled, n=2)
    texts = [c.text for c in many.choices]
    assert texts == [client.completions.create(**dict(sampled, seed=5 + i)).choices[0].text for i in range(2)]
    assert texts[0] != texts[1] and all(text.startswith(prompt) for text in texts)
    streamed = ['', '']
    for part in client.completions.create(**sampled, n=2, stream=True):
        streamed[part.choices[0].index] += part.choices[0].text
    assert streamed == texts


@pytest.mark.parametrize('body,needle', [
    ({'prompt': ['a', 'b']}, '2 prompts in one request'),
    ({'prompt': [1, 2, 3], 'echo': True}, 'echo needs the prompt as text'),
    ({'prompt': 'x', 'suffix': 'y'}, 'suffix'),
    ({'prompt': 'x', 'best_of': 3}, 'best_of=3'),
    ({'prompt': 'x', 'max_tokens': 0}, 'max_tokens=0 generates nothing'),
    ({'prompt': []}, 'non-empty list of token ids'),
    ({'prompt': [10 ** 9]}, 'token ids below'),
    ({'prompt': 'x ' * 3000}, 'context window is 2048'),
    ({'prompt': 'x', 'max_tokens': 5000}, 'context window is 2048'),
    ({'prompt': 'x', 'n': 1000}, 'at most 16 choices'),
])
def test_bad_completion_requests_are_400s(server, body, needle):
    r = httpx.post(f'{server}/v1/completions', json=body, timeout=30)
    assert r.status_code == 400 and needle in r.json()['error']['message'], r.text


def test_tool_choice_none_offers_no_tools(glm3_model):
    tools = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {}}}]
    body = {'messages': [{'role': 'user', 'content': '北京天气?'}], 'tools': tools}
    offered = chat_call(ChatCompletionRequest(**body), None).options
    assert offered['tools'] == [tools[0]['function']]
    hidden = chat_call(ChatCompletionRequest(**body, tool_choice='none'), None).options
    plain = glm3_model.prepare('北京天气?').input_ids
    assert glm3_model.prepare('北京天气?', **{k: v for k, v in offered.items() if k != 'role'}).input_ids != plain
    assert glm3_model.prepare('北京天气?', **{k: v for k, v in hidden.items() if k != 'role'}).input_ids == plain


def test_chatglm3_tools_map_to_openai_tool_calls():
    req = ChatCompletionRequest(messages=[
        {'role': 'system', 'content': 'Answer briefly.'},
        {'role': 'user', 'content': '北京天气?'},
        {'role': 'assistant', 'content': None, 'tool_calls': [
            {'id': 'c1', 'type': 'function', 'function': {'name': 'get_weather', 'arguments': '{"city": "北京"}'}}]},
        {'role': 'tool', 'tool_call_id': 'c1', 'content': '{"temp": 20}'}],
        tools=[{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {}}}])
    query, history, role, system, tools = to_conversation(req)
    assert (query, role, system) == ('{"temp": 20}', 'observation', 'Answer briefly.')
    assert history[1] == {'role': 'assistant', 'metadata': 'get_weather',
                          'content': "```python\ntool_call(city='北京')\n```"}
    assert tools == [{'name': 'get_weather', 'parameters': {}}]
    call_ = {'name': 'get_weather', 'parameters': {'city': '上海'}}
    message_ = message(Result(call_, [], 1, 1, 'stop', tool_calls=[call_]))
    assert message_['content'] is None
    call = message_['tool_calls'][0]
    assert call['type'] == 'function' and call['function']['name'] == 'get_weather'
    assert json.loads(call['function']['arguments']) == {'city': '上海'}
    # text, then a call (how the real model often answers with tools): both, as the stream showed them
    message_ = message(Result(call_, [], 1, 1, 'stop', text='Let me look that up.', tool_calls=[call_]))
    assert message_['content'] == 'Let me look that up.' and len(message_['tool_calls']) == 1
    # ... and sent back, the history holds the text and every call, as the model wrote them
    calls = [{'id': f'c{i}', 'type': 'function', 'function': {'name': name, 'arguments': '{"city": "北京"}'}}
             for i, name in enumerate(('get_weather', 'get_time'))]
    req = ChatCompletionRequest(messages=[
        {'role': 'user', 'content': '北京?'},
        {'role': 'assistant', 'content': 'Let me look that up.', 'tool_calls': calls},
        {'role': 'tool', 'tool_call_id': 'c0', 'content': '{"temp": 20}'}], tools=[])
    _, history, _, _, _ = to_conversation(req)
    assert [(m['metadata'], m['content'][:12]) for m in history[1:]] == [
        ('', 'Let me look '), ('get_weather', '```python\nto'), ('get_time', '```python\nto')]


# -- many users at once (continuous batching) -------------------------------------------------------------
def metrics_of(url):
    """/metrics as {name: value} (the one model label dropped)."""
    text = httpx.get(f'{url}/metrics').text
    return {line.split('{')[0]: float(line.rsplit(' ', 1)[1]) for line in text.splitlines()
            if line and not line.startswith('#')}


def concurrent_replies(url, queries, max_tokens=24, history=()):
    """Greedy replies of simultaneous streaming requests, in order."""
    replies, errors = [None] * len(queries), []

    def ask(i):
        try:
            messages = [m for q, a in history for m in ({'role': 'user', 'content': q},
                                                         {'role': 'assistant', 'content': a})]
            body = {'messages': messages + [{'role': 'user', 'content': queries[i]}], 'stream': True,
                    'temperature': 0, 'max_tokens': max_tokens}
            with httpx.stream('POST', f'{url}/v1/chat/completions', json=body, timeout=300) as r:
                text = ''.join(json.loads(line[6:])['choices'][0]['delta'].get('content') or ''
                               for line in r.iter_lines() if line.startswith('data: ') and line != 'data: [DONE]'
                               and json.loads(line[6:])['choices'])
            replies[i] = text.strip()
        except Exception as e:   # collected and reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    return replies


@pytest.fixture(scope='module')
def serial_server(glm2_dir, tmp_path_factory):
    """One request at a time, a tiny KV budget, 4-token prefill chunks, at most 2 logprob alternatives, and
    unknown fields ignored."""
    port = free_port()
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--max-batch', '1', '--kv-cache-gb', '0.0002', '--prefill-chunk', '4', '--max-logprobs', '2',
                          '--allow-unknown-fields'],
                         f'http://127.0.0.1:{port}/health', tmp_path_factory.mktemp('serial') / 'server.log')
    yield f'http://127.0.0.1:{port}'
    proc.terminate()
    proc.wait(timeout=30)


def test_vllm_sampling_parameters_do_what_vllm_says(server, glm2_model):
    """top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos and min_tokens in the body, each
    checked against what it must change (completions of token ids, so the tokens are known)."""
    ids = glm2_model.build_inputs('你好')
    greedy = glm2_model.generate(ids, max_new_tokens=8, do_sample=False, stop_ids=[])
    text = glm2_model.tokenizer.decode

    def complete(**options):
        r = httpx.post(f'{server}/v1/completions', timeout=60, json={'prompt': ids, 'max_tokens': 8, **options})
        assert r.status_code == 200, r.text
        return r.json()['choices'][0]

    assert complete(temperature=0)['text'] == text(greedy)
    # top_k 1 / min_p 1 keep only the likeliest token: seeded sampling at temperature 1 becomes greedy
    for option in ({'top_k': 1}, {'min_p': 1.0}):
        assert complete(temperature=1.0, seed=3, **option)['text'] == text(greedy), option
    assert complete(temperature=1.0, seed=3)['text'] != text(greedy)
    for off in (-1, 0):   # vLLM's "off", even where the model's defaults set a top_k
        assert complete(temperature=1.0, seed=3, top_k=off)['text'] == complete(temperature=1.0, seed=3)['text']
    assert complete(temperature=0, repetition_penalty=0.02)['text'] != text(greedy)   # <1: repeat what was seen
    # stop_token_ids end the reply at that token (left out of the text)
    stopped = complete(temperature=0, stop_token_ids=[greedy[3]])
    assert stopped['finish_reason'] == 'stop' and stopped['text'] == text(greedy[:greedy.index(greedy[3])])
    # min_tokens: the stop ids cannot come before it
    later = complete(temperature=0, stop_token_ids=[greedy[3]], min_tokens=6)
    assert later['text'] != stopped['text'] and later['text'].startswith(text(greedy[:3]))
    # ... nor stop strings (looked for from the min_tokens-th token on, as vLLM does)
    first = text(greedy[:1]).strip()[:1]
    assert complete(temperature=0, stop=[first])['text'] == ''
    held = complete(temperature=0, stop=[first], min_tokens=4)
    assert held['text'].startswith(text(greedy[:3])) and len(held['text']) > len(text(greedy[:3]))
    # ignore_eos: the model's stop id, forced by logit_bias, no longer ends the reply
    eos = glm2_model.tokenizer.stop_ids[0]
    assert complete(temperature=0, logit_bias={str(eos): 100})['finish_reason'] == 'stop'
    assert complete(temperature=0, logit_bias={str(eos): 100}, ignore_eos=True)['finish_reason'] == 'length'


def test_tokenize_counts_what_the_request_would_run_and_detokenize_reverses_it(server, glm2_model):
    """vLLM's /tokenize and /detokenize: with messages, the count is the chat request's
    usage.prompt_tokens; with a prompt, the completions request's; add_special_tokens=false leaves out the
    model's [gMASK] sop."""
    messages = [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': 'hi'},
                {'role': 'user', 'content': 'tell me more'}]
    r = httpx.post(f'{server}/tokenize', json={'messages': messages}, timeout=60)
    assert r.status_code == 200, r.text
    tokenized = r.json()
    chat = httpx.post(f'{server}/v1/chat/completions', json={'messages': messages, 'max_tokens': 1}, timeout=60)
    assert tokenized['count'] == len(tokenized['tokens']) == chat.json()['usage']['prompt_tokens']
    assert tokenized['max_model_len'] == glm2_model.context_length
    assert tokenized['tokens'] == glm2_model.build_inputs('tell me more', [('你好', 'hi')])
    prompt = httpx.post(f'{server}/tokenize', json={'prompt': 'The capital of France is'}, timeout=60).json()
    completion = httpx.post(f'{server}/v1/completions', json={'prompt': 'The capital of France is', 'max_tokens': 1},
                            timeout=60).json()
    assert prompt['count'] == completion['usage']['prompt_tokens']
    plain = httpx.post(f'{server}/tokenize', json={'prompt': 'The capital of France is', 'add_special_tokens': False},
                       timeout=60).json()
    assert plain['tokens'] == glm2_model.tokenizer.encode('The capital of France is') and plain['count'] < prompt['count']
    back = httpx.post(f'{server}/detokenize', json={'tokens': plain['tokens']}, timeout=60)
    assert back.status_code == 200 and back.json()['prompt'] == 'The capital of France is'
    long = httpx.post(f'{server}/tokenize', json={'prompt': 'a b ' * 2400}, timeout=60)
    assert long.status_code == 400 and 'tokens' in long.json()['error']['message']   # as the request would be
    for path, body, needle in (('/tokenize', {}, 'either prompt'),
                               ('/tokenize', {'prompt': 'x', 'messages': messages}, 'either prompt'),
                               ('/detokenize', {'tokens': [10 ** 9]}, 'token ids must be in')):
        r = httpx.post(f'{server}{path}', json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()['error']['message'], r.text


def test_each_request_has_an_id_echoed_and_one_access_log_line(server):
    r = httpx.post(f'{server}/v1/chat/completions', headers={'X-Request-Id': 'trace-42.a:b'}, timeout=60,
                   json={'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 1})
    assert r.status_code == 200 and r.headers['x-request-id'] == 'trace-42.a:b'
    # an id that could forge log lines (or is just too long) is replaced by a fresh one
    for hostile in ('a\\n{"forged": 1}', 'x' * 200, ''):
        r = httpx.get(f'{server}/health', headers={'X-Request-Id': hostile} if hostile else {})
        assert r.headers['x-request-id'] != hostile and len(r.headers['x-request-id']) == 32
    r = httpx.post(f'{server}/v1/chat/completions', headers={'X-Request-Id': 'bad-1'}, json={'messages': 'oops'})
    assert r.status_code == 422 and r.headers['x-request-id'] == 'bad-1'
    log = SERVER_LOGS[server].read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"request_id"')]
    mine = [line for line in lines if line['request_id'] in ('trace-42.a:b', 'bad-1')]
    assert [(m['path'], m['status']) for m in mine] == [('/v1/chat/completions', 200), ('/v1/chat/completions', 422)]
    assert all(m['ms_to_headers'] >= 0 and m['method'] == 'POST' for m in mine)


def test_a_fault_in_a_route_is_a_500_with_its_request_id(glm2_dir):
    """Starlette answers an unhandled exception outside every middleware: the request-id middleware
    answers it itself, so a 500 still carries X-Request-Id and leaves its access-log line."""
    from fastapi.testclient import TestClient
    from modelscope_chatglm.serve.server import create_app
    # (a model of its own: serving one gives it an engine thread, which the shared fixture must not get)
    app = create_app(modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32'), 'tiny')

    async def broken():
        raise RuntimeError('a fault injected into the backend')
    app.state.engine.stats_list = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get('/health', headers={'X-Request-Id': 'fault-1'})
    assert r.status_code == 500 and r.headers['x-request-id'] == 'fault-1'
    assert 'a fault injected' in r.json()['error']['message']


def test_unknown_fields_are_ignored_when_the_server_is_told_to(server, serial_server):
    body = {'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 2, 'temprature': 0.5, 'user_data': [1]}
    assert httpx.post(f'{server}/v1/chat/completions', json=body, timeout=60).status_code == 400
    r = httpx.post(f'{serial_server}/v1/chat/completions', json=body, timeout=60)
    assert r.status_code == 200 and r.json()['usage']['completion_tokens'] <= 2
    # a wrong type is still an error there
    r = httpx.post(f'{serial_server}/v1/chat/completions', json=dict(body, max_tokens='2'), timeout=60)
    assert r.status_code == 422 and 'max_tokens' in r.json()['error']['message']


def test_logprobs_are_bounded_per_token_and_per_response(server, serial_server):
    """16 choices x 2,000 tokens x 20 alternatives made 52 MiB of JSON: a response carries at most 131,072
    logprobs, and --max-logprobs bounds the alternatives per token; each refusal names its limit."""
    chat = {'messages': [{'role': 'user', 'content': 'x'}], 'logprobs': True}
    r = httpx.post(f'{server}/v1/chat/completions', timeout=60, json=dict(chat, top_logprobs=20, n=16, max_tokens=1000))
    assert r.status_code == 400 and 'at most 131072' in r.json()['error']['message']
    r = httpx.post(f'{server}/v1/completions', timeout=60,
                   json={'prompt': 'x', 'logprobs': 20, 'n': 16, 'max_tokens': 1000})
    assert r.status_code == 400 and 'at most 131072' in r.json()['error']['message']
    r = httpx.post(f'{server}/v1/chat/completions', timeout=60, json=dict(chat, top_logprobs=20, n=2, max_tokens=4))
    assert r.status_code == 200 and len(r.json()['choices'][1]['logprobs']['content'][0]['top_logprobs']) == 20
    r = httpx.post(f'{serial_server}/v1/chat/completions', timeout=60, json=dict(chat, top_logprobs=3, max_tokens=2))
    assert r.status_code == 400 and '--max-logprobs' in r.json()['error']['message']
    r = httpx.post(f'{serial_server}/v1/chat/completions', timeout=60, json=dict(chat, top_logprobs=2, max_tokens=2))
    assert r.status_code == 200


def test_max_batch_decides_how_many_requests_share_the_steps(server, serial_server, glm2_model):
    queries = [f'batch question {i}' for i in range(4)]
    answers = [expected(glm2_model, q, n=64) for q in queries]
    steps = {}
    for url in (server, serial_server):
        before = metrics_of(url)['chatglm_steps_total']
        assert concurrent_replies(url, queries, max_tokens=64) == answers
        steps[url] = metrics_of(url)['chatglm_steps_total'] - before
    # One after the other takes about four requests' worth of steps; together, little more than one's
    # (the requests reach the server a few steps apart).
    assert steps[serial_server] > 2 * steps[server]
    assert metrics_of(serial_server)['chatglm_max_batch'] == 1 and metrics_of(server)['chatglm_max_batch'] == 16


def test_prefill_chunk_and_kv_budget_options_take_effect(serial_server, glm2_model):
    query = 'a longer question ' * 6
    before = metrics_of(serial_server)['chatglm_steps_total']
    body = {'messages': [{'role': 'user', 'content': query}], 'temperature': 0, 'max_tokens': 2}
    r = httpx.post(f'{serial_server}/v1/chat/completions', json=body, timeout=60)
    assert r.status_code == 200
    usage = r.json()['usage']
    prefilled = usage['prompt_tokens'] - usage['prompt_tokens_details']['cached_tokens']
    assert prefilled > 40 and metrics_of(serial_server)['chatglm_steps_total'] - before >= prefilled / 4
    # (the pool holds whole pages: the budget rounded down to one)
    assert 0.99 * 0.0002 * 2**30 < metrics_of(serial_server)['chatglm_kv_budget_bytes'] <= 0.0002 * 2**30
    # A request whose K/V alone exceed the budget is a clear 400 naming the option.
    r = httpx.post(f'{serial_server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 2000})
    assert r.status_code == 400 and '--kv-cache-gb' in r.json()['error']['message']


def test_metrics_and_usage_report_the_prefix_cache(server, glm2_model):
    first = httpx.post(f'{server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'remember the number 42, please'}], 'temperature': 0,
        'max_tokens': 6}).json()
    reply = first['choices'][0]['message']['content']
    before = metrics_of(server)
    back = httpx.post(f'{server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'remember the number 42, please'},
                     {'role': 'assistant', 'content': reply}, {'role': 'user', 'content': 'which number?'}],
        'temperature': 0, 'max_tokens': 6}).json()
    after = metrics_of(server)
    cached = back['usage']['prompt_tokens_details']['cached_tokens']
    assert cached >= first['usage']['prompt_tokens'] - 1
    assert after['chatglm_cached_prompt_tokens_total'] - before['chatglm_cached_prompt_tokens_total'] == cached
    assert after['chatglm_prompt_tokens_total'] - before['chatglm_prompt_tokens_total'] == back['usage']['prompt_tokens']
    assert 0 < after['chatglm_prefix_cache_hit_rate'] <= 1 and after['chatglm_prefix_cache_entries'] >= 1
    assert after['chatglm_kv_prefix_cache_bytes'] > 0 and after['chatglm_running'] == 0
    text = httpx.get(f'{server}/metrics').text
    assert '# TYPE chatglm_generated_tokens_total counter' in text and 'model="tiny-glm2"' in text


@pytest.mark.parametrize('name', ['glm1', 'glm3', 'glm2-int4', 'glm2-int4-default-dtype'])
def test_concurrent_greedy_clients_each_get_the_single_client_reply(name, request, make_checkpoint, tmp_path):
    """'default-dtype': `serve` with no --dtype, which is bf16 where the CPU multiplies it natively (#9
    reported 12 of 32 concurrent int4 replies there that differed from the sequential ones)."""
    import torch
    import modelscope_chatglm
    from modelscope_chatglm.loading import default_dtype
    if name == 'glm1':
        model_dir = request.getfixturevalue('glm1_dir')
    elif name == 'glm3':
        model_dir = request.getfixturevalue('glm3_dir')
    else:
        model_dir = make_checkpoint('serve-int4', 'glm2', 'safetensors', shards=1, quantization_bit=4)
    dtype = default_dtype(torch.device('cpu'), quantized=True) if name.endswith('default-dtype') else 'float32'
    chat = modelscope_chatglm.load(model_dir, device='cpu', dtype=dtype)
    queries = [f'question number {i}, about {"abc" * i}' for i in range(8)]
    history = [('你好', 'hello there')]
    answers = [chat.chat(q, list(history), do_sample=False, max_new_tokens=24)[0] for q in queries]
    port = free_port()
    dtype_flag = [] if name.endswith('default-dtype') else ['--dtype', dtype]
    proc = start_service(['serve', '--model', model_dir, '--device', 'cpu', *dtype_flag, '--port', str(port)],
                         f'http://127.0.0.1:{port}/health', tmp_path / 'server.log')
    try:
        url = f'http://127.0.0.1:{port}'
        assert concurrent_replies(url, queries, history=history) == answers
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_engine_ends_the_openmp_workers_of_the_thread_that_loaded_the_model():
    """Loading runs parallel torch ops, which leave that thread a pool of idle OpenMP workers; beside the
    engine thread's own pool, libgomp then manages more threads than CPUs and stops spinning between
    parallel regions (a decode step was ~40% slower). The engine calls this before its thread starts."""
    import os
    import torch
    from modelscope_chatglm.openmp import release_workers
    if torch.get_num_threads() < 2:
        pytest.skip('one torch thread: OpenMP starts no workers')
    counts = {}

    def loader():
        a = torch.randn(512, 512)
        (a @ a).sum()                      # starts this thread's pool
        counts['before'] = len(os.listdir('/proc/self/task'))
        counts['released'] = release_workers()
        counts['after'] = len(os.listdir('/proc/self/task'))
    thread = threading.Thread(target=loader)
    thread.start()
    thread.join()
    assert counts['released']
    assert counts['after'] == counts['before'] - (torch.get_num_threads() - 1), counts
