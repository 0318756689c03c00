"""The server on Ray Serve: a real local Ray cluster on 127.0.0.1 (`ray start --head`, its own temp
dir, ports and auth token), two replicas of a tiny checkpoint, driven by the `openai` client and raw
HTTP; one replica is killed mid-run. The tests stop the cluster they started, and only that one."""
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import free_port, missing_optional, post_and_hang_up, start_service

try:
    import ray.serve  # noqa: F401
except ImportError:
    missing_optional('ray[serve] is not installed (pip install ".[ray]")', 'CHATGLM_REQUIRE_RAY')
httpx = pytest.importorskip('httpx')
openai = pytest.importorskip('openai')

BIN = os.path.dirname(sys.executable)


class Cluster:
    def __init__(self, root):
        self.root = root
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.http_port = None   # chosen once the head runs: its processes take ports of their own
        token = os.path.join(root, 'token')
        with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), 'w') as f:
            f.write(secrets.token_hex(32))
        # Without OpenMP settings (GOMP_SPINCOUNT, OMP_WAIT_POLICY): a replica that has one got it from its
        # deployment, not from the cluster's environment.
        self.env = dict({k: v for k, v in os.environ.items() if k not in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')},
                        RAY_AUTH_MODE='token', RAY_AUTH_TOKEN_PATH=token,
                        RAY_ADDRESS=f'127.0.0.1:{self.gcs_port}', RAY_USAGE_STATS_ENABLED='0')
        self.dashboard = f'http://127.0.0.1:{self.dashboard_port}'
        self.auth = {'Authorization': f'Bearer {open(token).read()}'}

    @property
    def url(self):
        return f'http://127.0.0.1:{self.http_port}'

    def serve_details(self) -> dict:
        """Ray's own view of the Serve applications (the dashboard's REST API)."""
        return httpx.get(f'{self.dashboard}/api/serve/applications/', headers=self.auth, timeout=30).json()

    def replica_pids(self) -> dict:
        """replica id -> pid of the live model replicas, from Ray's state API (`ray list actors`)."""
        out = subprocess.run([os.path.join(BIN, 'ray'), 'list', 'actors', '--address', self.dashboard, '--format',
                              'json', '--limit', '1000', '-f', 'state=ALIVE'], env=self.env, check=True,
                             capture_output=True, text=True, timeout=120).stdout
        actors = json.loads(out)
        return {a['name'].rsplit('#', 1)[-1]: a['pid'] for a in actors if 'ChatGLMReplica' in (a.get('class_name') or '')}


@pytest.fixture(scope='module')
def cluster():
    root = tempfile.mkdtemp(prefix='rt', dir='/tmp')   # short: Ray's socket paths live under it
    c = Cluster(root)
    log = open(os.path.join(root, 'ray-start.log'), 'w')
    head = subprocess.Popen([os.path.join(BIN, 'ray'), 'start', '--head', '--block', '--node-ip-address=127.0.0.1',
                             f'--port={c.gcs_port}', '--num-cpus=2', f'--temp-dir={root}/ray',
                             '--dashboard-host=127.0.0.1', f'--dashboard-port={c.dashboard_port}',
                             '--disable-usage-stats'], env=c.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f'{c.dashboard}/api/version', headers=c.auth, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert head.poll() is None, open(log.name).read()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail(f'the Ray head did not start:\n{open(log.name).read()[-3000:]}')
        c.http_port = free_port()   # for Serve's HTTP proxy (one per cluster: every test here uses it)
        yield c
    finally:
        head.send_signal(signal.SIGTERM)   # `ray start --block` stops its own processes, nobody else's
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(root, ignore_errors=True)


def replica_logs(cluster) -> str:
    """The end of each model replica's log (why a deployment failed)."""
    logs = glob.glob(os.path.join(cluster.root, 'ray', 'session_*', 'logs', 'serve', '*ChatGLMReplica*.log'))
    return '\n'.join(f'== {path}\n' + open(path, errors='replace').read()[-2000:] for path in logs[-2:])


def test_serve_deploy_with_the_documented_config_file(cluster, glm2_dir, tmp_path):
    """deploy/ray-serve.yaml, as documented (`serve deploy`), with the model and port filled in."""
    import yaml
    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), '..', 'deploy', 'ray-serve.yaml')))
    config['http_options'] = {'host': '127.0.0.1', 'port': cluster.http_port}
    app = config['applications'][0]
    app['args'].update(model=glm2_dir, name='from-config', max_batch=4, cpus_per_replica=0.5)
    path = tmp_path / 'serve.yaml'
    path.write_text(yaml.safe_dump(config))
    serve = os.path.join(BIN, 'serve')
    subprocess.run([serve, 'deploy', str(path), '-a', cluster.dashboard], env=cluster.env, check=True, timeout=120)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            status = cluster.serve_details()['applications'].get('chatglm', {}).get('status')
            if status == 'RUNNING':
                break
            assert status != 'DEPLOY_FAILED', replica_logs(cluster)
            time.sleep(1)
        r = httpx.post(f'{cluster.url}/v1/chat/completions', timeout=60, json={
            'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 4, 'temperature': 0})
        assert r.status_code == 200 and r.json()['model'] == 'from-config', r.text
        replica = cluster.serve_details()['applications']['chatglm']['deployments']['ChatGLMReplica']
        autoscaling = replica['deployment_config']['autoscaling_config']   # autoscale: "1:2" in the file
        assert (autoscaling['min_replicas'], autoscaling['max_replicas']) == (1, 2)
        assert autoscaling['target_ongoing_requests'] == 4                 # one full batch (max_batch)
        assert replica['deployment_config']['ray_actor_options']['num_cpus'] == 0.5
    finally:
        subprocess.run([serve, 'shutdown', '-y', '-a', cluster.dashboard], env=cluster.env, timeout=120)


@pytest.fixture(scope='module')
def ray_server(cluster, glm2_dir, tmp_path_factory):
    """`modelscope-chatglm serve --ray --replicas 2` joined to the cluster (RAY_ADDRESS).
    --max-batch 64: a conversation's replica is never 'much busier' in these tests, so routing is
    purely by conversation."""
    log = tmp_path_factory.mktemp('ray-serve') / 'serve.log'
    proc = start_service(['serve', '--ray', '--replicas', '2', '--max-batch', '64', '--model', glm2_dir,
                          '--device', 'cpu', '--dtype', 'float32', '--name', 'tiny-glm2',
                          '--port', str(cluster.http_port)], f'{cluster.url}/health', log, env=cluster.env,
                         timeout=240)
    wait_for_replicas(cluster.url, 2)
    yield cluster.url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert 'chatglm' not in cluster.serve_details().get('applications', {})   # the CLI took its app down


def wait_for_replicas(url, n, seconds=120, exclude=()):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            health = httpx.get(f'{url}/health', timeout=10).json()
            alive = [r['replica'] for r in health.get('replicas', []) if r['replica'] not in exclude]
            if len(alive) >= n:
                return health
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f'{n} replicas did not come up at {url}')


def chat(client, messages, max_tokens=8, **kwargs):
    """-> (reply text, replica that served it, usage)."""
    raw = client.chat.completions.with_raw_response.create(model='tiny-glm2', messages=messages, temperature=0,
                                                           max_tokens=max_tokens, **kwargs)
    reply = raw.parse()
    return reply.choices[0].message.content, raw.headers['x-chatglm-replica'], reply.usage


def test_forty_concurrent_conversations_on_two_replicas(ray_server, glm2_model):
    """40 conversations at once, two turns each, through the openai client: every one succeeds with the
    single-process greedy reply, both replicas work, and each conversation's second turn goes to the
    replica that served its first, whose prefix cache then holds its history."""
    client = openai.OpenAI(base_url=f'{ray_server}/v1', api_key='none', max_retries=0, timeout=300)
    before = {r['replica']: r for r in httpx.get(f'{ray_server}/health').json()['replicas']}
    results, errors = {}, []

    def conversation(i):
        try:
            first = [{'role': 'user', 'content': f'conversation {i}: hello'}]
            reply1, replica1, usage1 = chat(client, first)
            second = first + [{'role': 'assistant', 'content': reply1}, {'role': 'user', 'content': 'and then?'}]
            reply2, replica2, usage2 = chat(client, second)
            results[i] = (reply1, replica1, reply2, replica2, usage1, usage2)
        except Exception as e:   # collected and reported below
            errors.append(f'{i}: {e!r}')
    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 40, errors[:3]
    for i, (reply1, replica1, reply2, replica2, usage1, usage2) in results.items():
        assert reply1 == glm2_model.chat(f'conversation {i}: hello', [], do_sample=False, max_new_tokens=8)[0]
        assert replica2 == replica1, f'conversation {i} changed replica'
        # the whole first turn's prompt came from that replica's prefix cache
        assert usage2.prompt_tokens_details.cached_tokens >= usage1.prompt_tokens - 1, (usage1, usage2)
    served = {r[1] for r in results.values()}
    assert served == set(before), (served, set(before))   # both replicas served traffic
    # /tokenize and /detokenize reach a replica's tokenizer; a refusal there is the caller's 400 here
    counted = httpx.post(f'{ray_server}/tokenize', json={'messages': [{'role': 'user', 'content': 'conversation 0: hello'}]},
                         timeout=60).json()
    assert counted['count'] == results[0][4].prompt_tokens
    assert httpx.post(f'{ray_server}/detokenize', json={'tokens': [10 ** 9]}, timeout=60).status_code == 400
    after = {r['replica']: r for r in httpx.get(f'{ray_server}/health').json()['replicas']}
    for replica in served:   # each replica's prefix-cache hit counter grew
        assert after[replica]['cached_prompt_tokens'] > before[replica]['cached_prompt_tokens']
    metrics = httpx.get(f'{ray_server}/metrics').text
    assert all(f'replica="{r}"' in metrics for r in served)


def test_metrics_sum_the_replicas_request_histograms(ray_server):
    """Each replica observes its own requests; the ingress's /metrics shows the histograms summed over the
    replicas (no replica label) and the engines' series one per replica."""
    from test_metrics import change, scrape, value
    before = scrape(ray_server)
    served, usages = [], []
    while len(set(served)) < 2 or len(served) < 6:   # distinct conversations: both replicas get some
        assert len(served) < 40, f'the router sent every conversation to one replica: {served}'
        r = httpx.post(f'{ray_server}/v1/chat/completions', timeout=60, json={
            'messages': [{'role': 'user', 'content': f'metrics {len(served)}'}], 'max_tokens': 4, 'temperature': 0})
        served.append(r.headers['x-chatglm-replica'])
        usages.append(r.json()['usage'])
    after = scrape(ray_server)
    assert change(before, after, 'e2e_request_latency_seconds')['count'] == len(served)
    assert change(before, after, 'time_to_first_token_seconds')['count'] == len(served)
    assert change(before, after, 'request_prompt_tokens')['sum'] == sum(u['prompt_tokens'] for u in usages)
    assert change(before, after, 'inter_token_latency_seconds')['count'] == sum(u['completion_tokens'] - 1 for u in usages)
    assert not any('replica' in dict(labels) for name, labels in after if name.startswith('vllm:e2e_request'))
    for replica in set(served):   # each replica's own counter saw its share
        completed = [value(s, 'chatglm_completed_total', replica=replica) for s in (before, after)]
        assert completed[1] - completed[0] == served.count(replica)
        assert value(after, 'vllm:num_requests_running', replica=replica) == 0


def test_health_and_models_through_the_ray_proxy(ray_server):
    health = httpx.get(f'{ray_server}/health').json()
    assert health['status'] == 'ok' and len(health['replicas']) == 2
    assert health['max_batch'] == 2 * 64                          # both replicas' batches
    models = httpx.get(f'{ray_server}/v1/models').json()
    assert [m['id'] for m in models['data']] == ['tiny-glm2']
    bad = httpx.post(f'{ray_server}/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'x'}],
                                                                 'stop': ['a', 'b', 'c', 'd', 'e']}, timeout=60)
    assert bad.status_code == 400 and 'at most 4' in bad.json()['error']['message']
    long = httpx.post(f'{ray_server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 10 ** 12})
    assert long.status_code == 400 and 'no room' in long.json()['error']['message']   # raised on a replica
    # logprobs and stop strings are worked out on the replica and travel back with the stream
    body = {'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 6, 'temperature': 0, 'logprobs': True,
            'top_logprobs': 2, 'stream': True, 'stream_options': {'include_usage': True}}
    with httpx.stream('POST', f'{ray_server}/v1/chat/completions', json=body, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith('data: {')]
    tokens = [e for c in chunks for choice in c['choices'] for e in (choice.get('logprobs') or {}).get('content', [])]
    assert len(tokens) == chunks[-1]['usage']['completion_tokens'] == 6 and chunks[-1]['choices'] == []
    assert all(e['top_logprobs'][0]['bytes'] == e['bytes'] for e in tokens)
    # n choices: each one is the reply of a request alone with its seed
    ask = {'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 6, 'temperature': 1.0}
    many = httpx.post(f'{ray_server}/v1/chat/completions', json=dict(ask, n=3, seed=11), timeout=120).json()
    alone = [httpx.post(f'{ray_server}/v1/chat/completions', json=dict(ask, seed=11 + i), timeout=120).json()
             for i in range(3)]
    assert [c['message']['content'] for c in many['choices']] == [a['choices'][0]['message']['content'] for a in alone]
    # structured output: the grammar is compiled and applied on the replica
    schema = {'type': 'object', 'required': ['ok'], 'additionalProperties': False, 'properties': {'ok': {'type': 'boolean'}}}
    fmt = {'type': 'json_schema', 'json_schema': {'name': 'ok', 'schema': schema}}
    shaped = httpx.post(f'{ray_server}/v1/chat/completions', json=dict(ask, n=2, seed=5, response_format=fmt,
                                                                       max_tokens=30), timeout=120).json()
    assert [set(json.loads(c['message']['content'])) for c in shaped['choices']] == [{'ok'}, {'ok'}], shaped


def test_each_replica_process_starts_with_the_openmp_setting(ray_server, cluster):
    """A replica's worker process starts with the OpenMP setting of the process that built the application
    (openmp.py): libgomp reads it when torch loads, before any code of ours could set it there."""
    want = {'GOMP_SPINCOUNT': '10000'}   # (the command and the cluster started without one: Cluster.env)
    pids = [r['pid'] for r in httpx.get(f'{ray_server}/health').json()['replicas']]
    assert len(pids) == 2
    for pid in pids:
        with open(f'/proc/{pid}/environ', 'rb') as f:   # the environment the process was started with
            started = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        assert {name: started.get(name.encode(), b'').decode() for name in want} == want, pid


def test_a_client_that_hangs_up_is_cancelled_on_its_replica(ray_server):
    """The hang-up travels proxy -> ingress -> replica: the replica's engine drops the sequence."""
    before = httpx.get(f'{ray_server}/health').json()
    post_and_hang_up(ray_server, '/v1/chat/completions',
                     {'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 1500, 'temperature': 0})
    deadline = time.time() + 30
    while time.time() < deadline:
        health = httpx.get(f'{ray_server}/health').json()
        if health['cancelled'] > before['cancelled'] and health['running'] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f'the abandoned generation kept running: {health}')
    assert health['generated_tokens'] - before['generated_tokens'] < 1500


def stream(url, i, record, max_tokens):
    """One streaming request; records (replica, 'ok' | 'failed', seconds at the end)."""
    body = {'messages': [{'role': 'user', 'content': f'long story {i}'}], 'stream': True, 'temperature': 0,
            'max_tokens': max_tokens}
    replica, outcome = None, 'failed: no end'
    try:
        with httpx.stream('POST', f'{url}/v1/chat/completions', json=body, timeout=120) as r:
            replica = r.headers.get('x-chatglm-replica')
            for line in r.iter_lines():
                if not line.startswith('data: ') or line == 'data: [DONE]':
                    continue
                event = json.loads(line[6:])
                if 'error' in event:
                    outcome = f'failed: {event["error"]["message"]}'
                    break
                if event['choices'] and event['choices'][0]['finish_reason'] in ('stop', 'length'):
                    outcome = 'ok'
    except httpx.HTTPError as e:
        outcome = f'failed: {e!r}'
    record[i] = (replica, outcome, time.time())


def test_a_killed_replica_loses_only_its_in_flight_requests(ray_server, cluster):
    pids = cluster.replica_pids()
    assert len(pids) == 2, pids
    record, threads = {}, []
    for i in range(16):
        t = threading.Thread(target=stream, args=(ray_server, i, record, 1500))
        t.start()
        threads.append(t)
    deadline = time.time() + 60   # until every stream is generating
    while time.time() < deadline and httpx.get(f'{ray_server}/health').json()['running'] < 16:
        time.sleep(0.2)
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.time()
    # New requests right after the kill: they go to the survivor (or, if the router has not heard yet,
    # get a clear retryable 503), and never hang.
    fresh = []
    for i in range(6):
        r = httpx.post(f'{ray_server}/v1/chat/completions', timeout=60, json={
            'messages': [{'role': 'user', 'content': f'after the kill {i}'}], 'max_tokens': 4, 'temperature': 0})
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert 'retry' in r.json()['error']['message'] and r.headers['retry-after']
        fresh.append(r.status_code)
    assert fresh[-3:] == [200, 200, 200], fresh
    for t in threads:
        t.join(timeout=180)
    assert len(record) == 16
    for replica, outcome, ended in record.values():
        if replica == victim:
            assert outcome.startswith('failed') and ended - killed_at < 10, (outcome, ended - killed_at)
        else:
            assert outcome == 'ok', (replica, victim, outcome)
    assert {r[0] for r in record.values()} == set(pids)   # both had requests in flight
    # Ray starts a new replica: the deployment is whole and healthy again.
    wait_for_replicas(ray_server, 2, seconds=120, exclude=(victim,))
    deadline = time.time() + 60
    while cluster.serve_details()['applications']['chatglm']['status'] != 'RUNNING' and time.time() < deadline:
        time.sleep(1)
    assert cluster.serve_details()['applications']['chatglm']['status'] == 'RUNNING'
    r = httpx.post(f'{ray_server}/v1/chat/completions', timeout=60, json={
        'messages': [{'role': 'user', 'content': 'back to normal'}], 'max_tokens': 4, 'temperature': 0})
    assert r.status_code == 200


def test_a_replica_that_cannot_load_fails_the_command_with_its_error(tmp_path, cluster):
    """No RAY_ADDRESS: the command starts a Ray instance of its own (and stops it); the model directory
    holds no checkpoint, so every replica fails to load and the command exits non-zero, saying why."""
    (tmp_path / 'empty-model').mkdir()
    env = {k: v for k, v in cluster.env.items() if k != 'RAY_ADDRESS'}
    env['RAY_TMPDIR'] = tempfile.mkdtemp(prefix='rl', dir='/tmp')
    try:
        proc = subprocess.run([sys.executable, '-m', 'modelscope_chatglm.cli', 'serve', '--ray', '--model',
                               str(tmp_path / 'empty-model'), '--port', str(free_port()), '--cpus-per-replica', '0'],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(env['RAY_TMPDIR'], ignore_errors=True)
    assert proc.returncode != 0
    assert 'deployment failed' in proc.stderr and 'config.json' in proc.stderr, proc.stderr[-3000:]


def test_ray_options_need_ray_and_are_checked(glm2_dir):
    for args, needle in ((['--replicas', '2'], 'need --ray'), (['--ray', '--autoscale', '3:1'], 'MIN:MAX'),
                         (['--ray', '--replicas', '2', '--autoscale', '1:2'], 'not both')):
        proc = subprocess.run([sys.executable, '-m', 'modelscope_chatglm.cli', 'serve', '--model', glm2_dir, *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr[-2000:])
