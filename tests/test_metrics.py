"""/metrics: per-request histograms, finish reasons and the engine's gauges, read through prometheus_client's
own parser from a real server on 127.0.0.1 (a tiny checkpoint). Several replicas' histograms summed
into one are tested over Ray in tests/test_ray.py (its two-replica cluster)."""
import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import serving

httpx = pytest.importorskip('httpx')
pytest.importorskip('fastapi')
parser = pytest.importorskip('prometheus_client.parser')

HISTOGRAMS = ['time_to_first_token_seconds', 'inter_token_latency_seconds', 'e2e_request_latency_seconds',
              'request_queue_time_seconds', 'request_inference_time_seconds', 'request_prefill_time_seconds',
              'request_decode_time_seconds', 'request_prompt_tokens', 'request_generation_tokens']


def scrape(url) -> dict:
    """/metrics as {(sample name, ((label, value), ...)): value}, through prometheus_client's parser."""
    r = httpx.get(f'{url}/metrics', timeout=30)
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/plain; version=')
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name, **labels) -> float:
    """One sample's value, found by its name and a subset of its labels (exactly one must match)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def histogram(samples, name) -> dict:
    """vllm:<name>'s count, sum and cumulative buckets {le: count} (no replica label: summed over replicas)."""
    metric = f'vllm:{name}'
    buckets = {dict(ls)['le']: v for (n, ls), v in samples.items() if n == f'{metric}_bucket'}
    counts = list(buckets.values())
    assert counts == sorted(counts) and buckets['+Inf'] == value(samples, f'{metric}_count'), (name, buckets)
    return {'count': value(samples, f'{metric}_count'), 'sum': value(samples, f'{metric}_sum'), 'buckets': buckets}


def change(before, after, name) -> dict:
    """How much vllm:<name>'s count and sum grew between two scrapes."""
    a, b = histogram(before, name), histogram(after, name)
    return {'count': b['count'] - a['count'], 'sum': b['sum'] - a['sum']}


def finished(before, after, reason) -> float:
    key = dict(finished_reason=reason, model_name='tiny-glm2')
    return value(after, 'vllm:request_success_total', **key) - value(before, 'vllm:request_success_total', **key)


def chat(url, content, **options):
    body = {'messages': [{'role': 'user', 'content': content}], 'temperature': 0, **options}
    r = httpx.post(f'{url}/v1/chat/completions', json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope='module')
def server(glm2_dir, tmp_path_factory):
    """One sequence at a time (--max-batch 1): a second request waits behind the first."""
    with serving(glm2_dir, tmp_path_factory.mktemp('metrics'), '--name', 'tiny-glm2', '--max-batch', '1') as url:
        yield url


def test_histograms_count_every_request_and_agree_with_its_usage(server):
    before = scrape(server)
    started = time.monotonic()
    replies = [chat(server, f'question {i}', max_tokens=3 + 2 * i) for i in range(5)]
    took = time.monotonic() - started
    after = scrape(server)
    usages = [r['usage'] for r in replies]
    prompt = sum(u['prompt_tokens'] for u in usages)
    generated = [u['completion_tokens'] for u in usages]
    assert min(generated) >= 1
    for name in ('e2e_request_latency_seconds', 'request_queue_time_seconds', 'request_inference_time_seconds',
                 'request_prompt_tokens', 'request_generation_tokens', 'time_to_first_token_seconds'):
        assert change(before, after, name)['count'] == 5, name
    # one inter-token latency per token after the first
    assert change(before, after, 'inter_token_latency_seconds')['count'] == sum(n - 1 for n in generated)
    assert change(before, after, 'request_prompt_tokens')['sum'] == prompt
    assert change(before, after, 'request_generation_tokens')['sum'] == sum(generated)
    ttft, e2e = change(before, after, 'time_to_first_token_seconds'), change(before, after, 'e2e_request_latency_seconds')
    itl = change(before, after, 'inter_token_latency_seconds')
    queue, inference = change(before, after, 'request_queue_time_seconds'), change(before, after, 'request_inference_time_seconds')
    prefill, decode = change(before, after, 'request_prefill_time_seconds'), change(before, after, 'request_decode_time_seconds')
    # the times nest: first token and the gaps after it within the request, the request within the client's wait
    assert 0 < ttft['sum'] <= e2e['sum'] < took, (ttft, e2e, took)
    assert ttft['sum'] + itl['sum'] <= e2e['sum'] + 1e-6
    assert queue['sum'] + inference['sum'] <= e2e['sum'] + 1e-6
    assert prefill['sum'] + decode['sum'] == pytest.approx(inference['sum'], abs=1e-6)
    assert decode['sum'] == pytest.approx(itl['sum'], abs=1e-6)   # (the same gaps, added per request)
    # finish reasons as the replies said them; the engine's counters under vLLM's names
    reasons = [r['choices'][0]['finish_reason'] for r in replies]
    assert {reason: finished(before, after, reason) for reason in ('stop', 'length')} == \
           {'stop': reasons.count('stop'), 'length': reasons.count('length')}
    grew = {name: value(after, name, model_name='tiny-glm2') - value(before, name, model_name='tiny-glm2')
            for name in ('vllm:prompt_tokens_total', 'vllm:generation_tokens_total', 'vllm:prefix_cache_queries_total',
                         'vllm:prefix_cache_hits_total')}
    assert grew == {'vllm:prompt_tokens_total': prompt, 'vllm:generation_tokens_total': sum(generated),
                    'vllm:prefix_cache_queries_total': prompt,
                    'vllm:prefix_cache_hits_total': sum(u['prompt_tokens_details']['cached_tokens'] for u in usages)}
    # today's series are still there, and say the same
    assert value(after, 'chatglm_prompt_tokens_total', model='tiny-glm2') - \
           value(before, 'chatglm_prompt_tokens_total', model='tiny-glm2') == prompt
    idle = {name: value(after, name, model_name='tiny-glm2')
            for name in ('vllm:num_requests_running', 'vllm:num_requests_waiting', 'vllm:kv_cache_usage_perc')}
    assert idle == dict.fromkeys(idle, 0.0)


def test_finished_requests_are_counted_by_how_they_ended(server):
    before = scrape(server)
    long = chat(server, 'tell me more', max_tokens=12, ignore_eos=True)
    text = long['choices'][0]['message']['content']
    assert long['choices'][0]['finish_reason'] == 'length'
    stop = next(c for c in text[1:] if c.isalnum())   # a character the same greedy reply will reach
    stopped = chat(server, 'tell me more', max_tokens=12, ignore_eos=True, stop=[stop])
    assert stopped['choices'][0]['finish_reason'] == 'stop'
    # a stream the client drops mid-way: the engine aborts it
    body = {'messages': [{'role': 'user', 'content': 'a long story'}], 'max_tokens': 2000, 'ignore_eos': True,
            'temperature': 0, 'stream': True}
    with httpx.stream('POST', f'{server}/v1/chat/completions', json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith('data: {') and json.loads(line[6:])['choices'][0]['delta'].get('content'):
                running = scrape(server)   # while it generates, it holds K/V
                break
    assert value(running, 'vllm:num_requests_running', model_name='tiny-glm2') == 1
    assert 0 < value(running, 'vllm:kv_cache_usage_perc', model_name='tiny-glm2') <= 1
    deadline = time.time() + 30
    while finished(before, scrape(server), 'abort') < 1 and time.time() < deadline:
        time.sleep(0.1)
    after = scrape(server)
    assert {reason: finished(before, after, reason) for reason in ('stop', 'length', 'abort', 'error')} == \
           {'stop': 1, 'length': 1, 'abort': 1, 'error': 0}
    assert change(before, after, 'e2e_request_latency_seconds')['count'] == 3
    others = long['usage']['completion_tokens'] + stopped['usage']['completion_tokens']
    assert 1 <= change(before, after, 'request_generation_tokens')['sum'] - others < 2000   # (the aborted one's)
    assert value(after, 'chatglm_cancelled_total', model='tiny-glm2') - \
           value(before, 'chatglm_cancelled_total', model='tiny-glm2') == 1


def test_queue_time_is_the_wait_behind_a_full_batch(server):
    """--max-batch 1: a request sent while another runs waits until that one ends; one sent alone does not."""
    before = scrape(server)
    chat(server, 'alone', max_tokens=4)
    alone = scrape(server)
    waited = change(before, alone, 'request_queue_time_seconds')
    assert waited['count'] == 1 and waited['sum'] < change(before, alone, 'e2e_request_latency_seconds')['sum']

    ended = {}

    def first():
        chat(server, 'the first', max_tokens=1000, ignore_eos=True)
        ended['first'] = time.monotonic()
    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.time() + 60
    while value(scrape(server), 'vllm:num_requests_running', model_name='tiny-glm2') < 1:
        assert time.time() < deadline, 'the first request never ran'
        time.sleep(0.01)
    sent = time.monotonic()
    second = chat(server, 'the second', max_tokens=4)
    thread.join(timeout=120)
    after = scrape(server)
    assert second['usage']['completion_tokens'] >= 1 and 'first' in ended
    behind = ended['first'] - sent    # how long the second was sent before the first ended, as the client saw it
    queued = change(alone, after, 'request_queue_time_seconds')
    assert queued['count'] == 2 and behind > 0.05, (queued, behind)
    # The first request queued for ~0 s; the second for about `behind` (its last token, the response's
    # trip back and the scrape lie between, so some of it).
    assert queued['sum'] >= 0.5 * behind, (queued, behind)
    assert value(after, 'vllm:num_requests_waiting', model_name='tiny-glm2') == 0


def test_each_app_has_its_own_registry_and_replica_sums_never_go_down(monkeypatch):
    from modelscope_chatglm.serve import metrics
    from modelscope_chatglm.serve.metrics import METRICS, VLLM_ENGINE_METRICS, MetricsExporter, RequestMetrics

    class Seq:   # what RequestMetrics reads of an engine sequence
        prompt, output = [1] * 7, [2] * 3
        arrival, admitted, first_token_at, previous_token_at, last_token_at, finished_at = 0.0, 0.5, 1.0, 1.5, 2.0, 2.5

    def stats(replica, requests):
        metrics = RequestMetrics(2048)
        for _ in range(requests):
            metrics.token(Seq)
            metrics.finished(Seq, 'length')
        engine = {key: 0 for key in list(METRICS) + [key for _, key, _ in VLLM_ENGINE_METRICS.values()]}
        return dict(engine, replica=replica, request_metrics=metrics.snapshot())

    def read(text):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(text.decode()) for s in family.samples}

    one, other = MetricsExporter('one'), MetricsExporter('other')
    both = read(one.render([stats('a', 2), stats('b', 3)]))
    e2e = histogram(both, 'e2e_request_latency_seconds')
    assert (e2e['count'], e2e['sum'], e2e['buckets']['2.0'], e2e['buckets']['2.5']) == (5, 12.5, 0, 5)   # le: <=
    assert value(both, 'vllm:request_success_total', finished_reason='length') == 5
    assert {dict(ls)['replica'] for (n, ls) in both if n == 'vllm:num_requests_running'} == {'a', 'b'}
    assert read(other.render([stats('', 1)]))[('vllm:request_prompt_tokens_sum', (('model_name', 'other'),))] == 7
    # replica b went away: what it served stays in the sums (Prometheus would read a drop as a reset)
    later = read(one.render([stats('a', 4)]))
    assert histogram(later, 'e2e_request_latency_seconds')['count'] == 7
    assert {dict(ls)['replica'] for (n, ls) in later if n == 'vllm:num_requests_running'} == {'a'}
    # replicas replaced again and again: the oldest are folded into one sum, which still counts them
    monkeypatch.setattr(metrics, 'MAX_REPLICAS_KEPT', 2)
    for i in range(5):
        churn = read(one.render([stats(f'new-{i}', 1)]))
    assert histogram(churn, 'e2e_request_latency_seconds')['count'] == 7 + 5
    assert len(one._requests) == 2


def test_only_the_http_app_imports_prometheus_client():
    code = ('import sys\n'
            'import modelscope_chatglm.serve.async_engine, modelscope_chatglm.serve.metrics\n'
            'print("prometheus_client" in sys.modules)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd='/')
    assert out.stdout.strip().splitlines()[-1] == 'False', out.stderr[-2000:]
