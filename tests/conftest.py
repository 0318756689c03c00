"""Shared fixtures: tiny checkpoints in the hub layout, and the reference implementation as an oracle.

The reference (ModelScope's `models/nlp/chatglm2`, transformers 4.40.2) runs in a side venv as a
subprocess. Its python is $CHATGLM_REFERENCE_PYTHON, else .venv-ref/bin/python in the repository.
Without it the parity tests skip, unless $CHATGLM_REQUIRE_REFERENCE=1 (CI sets it) makes that a failure.
"""
import contextlib
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from modelscope_chatglm.testing import tiny
from modelscope_chatglm.quantization import build
from modelscope_chatglm.quantization.build import load_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE = os.path.join(ROOT, 'tests', 'reference', 'oracle.py')


@pytest.fixture(scope='session')
def sp_models():
    """One trained SentencePiece model per tokenizer kind, shared by every checkpoint."""
    return {'glm2': tiny.train_sentencepiece('glm2')}


@pytest.fixture(scope='session')
def make_checkpoint(tmp_path_factory, sp_models):
    """make_checkpoint(name, family='glm2', fmt='bin', shards=2, **config) -> directory (cached)."""
    built = {}

    def make(name, family='glm2', fmt='bin', shards=2, seed=0, **config):
        # Keyed by every argument: two modules asking for 'glm2-int8' in different formats get two
        # checkpoints (one got the other's safetensors, depending on which module ran first).
        key = (name, family, fmt, shards, seed, tuple(sorted(config.items())))
        if key not in built:
            out = str(tmp_path_factory.mktemp(name))
            built[key] = tiny.build(out, family=family, fmt=fmt, shards=shards, seed=seed,
                                    sp_model=sp_models['glm2'], **config)
        return built[key]
    return make


@pytest.fixture(scope='session')
def glm2_dir(make_checkpoint):
    return make_checkpoint('glm2-bin', 'glm2', 'bin', shards=3)


@pytest.fixture(scope='session')
def glm3_dir(make_checkpoint):
    return make_checkpoint('glm3-st', 'glm3', 'safetensors', shards=2)


@pytest.fixture(scope='session')
def glm1_sp():
    return tiny.train_sentencepiece('glm1')


@pytest.fixture(scope='session')
def glm1_dir(tmp_path_factory, glm1_sp):
    return tiny.build(str(tmp_path_factory.mktemp('glm1')), 'glm1', 'bin', shards=3, sp_model=glm1_sp)


@pytest.fixture(scope='session')
def glm1_model(glm1_dir):
    import modelscope_chatglm
    return modelscope_chatglm.load(glm1_dir, device='cpu', dtype='float32')


@pytest.fixture(scope='session')
def glm2_model(glm2_dir):
    import modelscope_chatglm
    return modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')


@pytest.fixture(scope='session')
def glm3_model(glm3_dir):
    import modelscope_chatglm
    return modelscope_chatglm.load(glm3_dir, device='cpu', dtype='float32')


def reference_python():
    candidates = [os.environ.get('CHATGLM_REFERENCE_PYTHON'), os.path.join(ROOT, '.venv-ref', 'bin', 'python')]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return None


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
    """reference(job) -> what tests/reference/chatglm2_oracle.py computed for it."""
    python = reference_python()
    if python is None:
        if os.environ.get('CHATGLM_REQUIRE_REFERENCE') == '1':
            pytest.fail('the reference venv is missing; set CHATGLM_REFERENCE_PYTHON (see .ci/run)')
        pytest.skip('no reference venv (.venv-ref); .ci/run builds one')
    counter = [0]

    def run(job):
        counter[0] += 1
        work = tmp_path_factory.mktemp(f'oracle{counter[0]}')
        job_path, out_path = work / 'job.json', work / 'out.pt'
        job_path.write_text(json.dumps(job, ensure_ascii=False))
        env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
        proc = subprocess.run([python, ORACLE, str(job_path), str(out_path)], capture_output=True,
                              text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f'reference oracle failed:\n{proc.stderr[-4000:]}')
        return torch.load(out_path)
    return run


def missing_optional(reason: str, require_env: str):
    """An optional part (a browser, triton, ray) is not installed: skip what needs it, or fail where
    $require_env is 1 (CI sets it, and installs the part)."""
    if os.environ.get(require_env) == '1':
        pytest.fail(f'{reason}; .ci/run installs it ({require_env}=1 requires it)', pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def replies_of(engine, prompts, params, stagger=0):
    """Submit `prompts` to `engine` one after another, `stagger` steps apart (so later ones join a running
    batch), run them to the end -> [(output ids, logprob of each), ...]."""
    seqs = []
    for prompt in prompts:
        seqs.append(engine.submit(prompt, params, logprobs=0))
        for _ in range(stagger):
            engine.step()
    engine.run_until_done(seqs)
    return [(s.output, [p for p, _ in s.logprobs]) for s in seqs]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_service(args, url, log_path, env=None, timeout=180):
    """Start `python -m modelscope_chatglm.cli ARGS` and wait until GET `url` answers 200."""
    import time
    import httpx
    proc = subprocess.Popen([sys.executable, '-m', 'modelscope_chatglm.cli', *args], env=env,
                            stdout=open(log_path, 'w'), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f'{" ".join(args[:1])} did not start:\n{open(log_path).read()[-4000:]}')


@contextlib.contextmanager
def serving(model_dir: str, log_dir, *flags, env=None):
    """`serve --model model_dir` (CPU, float32) on a free port of 127.0.0.1 -> its URL; stopped after."""
    port = free_port()
    proc = start_service(['serve', '--model', model_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          *flags], f'http://127.0.0.1:{port}/health', os.path.join(log_dir, 'server.log'), env=env)
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post_and_hang_up(base, path, body, running=1, timeout=30):
    """POST `body` (not streamed) to `base + path`, then close the connection as soon as /health shows
    `running` sequences decoding: a client that gives up mid-generation, however fast the machine.
    (A client timeout instead raced the generation: 1,500 tiny-model tokens take 0.95 s on one host.)"""
    import socket
    import time
    import urllib.parse
    import httpx
    url = urllib.parse.urlsplit(base)
    data = json.dumps(body).encode()
    head = (f'POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(data)}\r\n\r\n').encode()
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head + data)
        deadline = time.time() + timeout
        while httpx.get(f'{base}/health', timeout=5).json()['running'] < running:
            if time.time() > deadline:
                pytest.fail(f'the request never started decoding within {timeout} s')
            time.sleep(0.01)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    # closed (with a reset: the server sees the hang-up at once) while the request decodes


def pytest_report_header(config):
    return f'reference python: {reference_python()}; python {sys.version.split()[0]}, torch {torch.__version__}'


# -- the compiled CPU kernels -----------------------------------------------------------------------------
@pytest.fixture(scope='session')
def lib():
    library = load_library()
    assert library is not None, 'the CPU kernels must compile on the test machines (gcc is installed)'
    return library


# Every instruction-set branch of the kernels (quantization/kernels/), whatever this CPU would pick:
# -march=native (here AVX-512 with VNNI where the CPU has it), AVX-512 without VNNI (x86-64-v4, on CPUs
# that can run it), AVX2+FMA (x86-64-v3) and the plain scalar code (x86-64).
ISA_VARIANTS = {'native': None, 'x86-64-v4': 'avx512', 'x86-64-v3': 'avx2', 'x86-64': 'scalar'}


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            return set(next(line for line in f if line.startswith('flags')).split(':', 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.fixture(scope='session')
def isa_builds(tmp_path_factory):
    """The kernel library of each variant this CPU can run."""
    builds = {'native': load_library()}
    if platform.machine() in ('x86_64', 'AMD64'):
        directory = str(tmp_path_factory.mktemp('isa'))
        for march, isa in ISA_VARIANTS.items():
            if march != 'native' and not (isa == 'avx512' and not {'avx512f', 'avx512bw', 'avx512vl'} <= cpu_flags()):
                builds[march] = build.build_variant(march, directory)
                assert builds[march].kernel_isa().decode() == isa
    return builds


@pytest.fixture(scope='module', params=list(ISA_VARIANTS))
def isa_lib(request, isa_builds):
    if request.param not in isa_builds:
        pytest.skip(f'this CPU cannot run the {request.param} build')
    return isa_builds[request.param]
