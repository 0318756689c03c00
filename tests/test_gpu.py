"""The GPU path: Triton int8/int4 kernels, the paged decode attention, the decode steps that CUDA graphs
replay, and whole models on device='cuda'.

Without a GPU (CI): the kernels run under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess
so that the setting cannot leak) against the torch reference, in fp32 and fp16; the interpreter's
bf16 `tl.dot` is wrong (numpy has no bf16), so bf16 is checked on the GPU only. The graph runner's
fixed-shape steps run eagerly (no capture) against the engine's ordinary forwards, across batch buckets
and table widths.
With a GPU: the compiled kernels in every dtype at real layer shapes, graphs against eager decode,
every family and precision through load(), the pipeline, the CLI and the server.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.engine import graphs

from conftest import free_port, missing_optional, replies_of, start_service

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU')


def have_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        missing_optional('triton is not installed (pip install ".[test]", or triton itself)', 'CHATGLM_REQUIRE_TRITON')


KERNEL_CHECK = r'''
import json, sys, torch
from modelscope_chatglm.quantization import formats, triton_kernels as tk
device, dtypes, shapes = sys.argv[1], sys.argv[2].split(','), json.loads(sys.argv[3])
variants = {'default': {},
            'small blocks': dict(gemv_config=dict(BLOCK_N=16, BLOCK_K=32, num_warps=4),
                                 gemm_config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4,
                                                  num_stages=1)),
            'dequantize + matmul': dict(tile_rows=0)}    # a GPU path only: elsewhere the same as default
results = []
for m, n, k in shapes:
    for bits in (8, 4):
        for name in dtypes:
            dtype = getattr(torch, name)
            w = torch.randn(n, k, device=device) / k ** 0.5
            q, scale = formats.quantize(w.to(dtype), bits)
            bias = torch.randn(n, device=device).to(dtype) if m % 2 else None
            x = torch.randn(m, k, device=device).to(dtype)
            ref = tk.reference_linear(x.double(), q, scale.double(), None if bias is None else bias.double(), bits)
            for label, options in variants.items():
                y = tk.quantized_linear(x, q, scale, bias, bits, **options)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                results.append([m, n, k, bits, name, label, err, bool(torch.isfinite(y).all())])
            exact = torch.equal(tk.dequantize(q, scale, bits, dtype), formats.dequantize(q, scale, bits, dtype))
            results.append([m, n, k, bits, name, 'dequantize', 0.0 if exact else 1.0, True])
print(json.dumps(results))
'''


def run_check(script, device, dtypes, arg, interpret):
    """Run a check script in a fresh process (TRITON_INTERPRET is read when kernels are defined)."""
    env = dict(os.environ, TRITON_INTERPRET='1' if interpret else '0')
    proc = subprocess.run([sys.executable, '-c', script, device, ','.join(dtypes), json.dumps(arg)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# fp32 sums in a different order: ~1e-6; fp16/bf16 outputs: one rounding of the result.
TOLERANCE = {'float32': 1e-5, 'float16': 2e-3, 'bfloat16': 1e-2}


def check_kernel_results(results, expected_count):
    assert len(results) == expected_count
    for m, n, k, bits, dtype, variant, err, finite in results:
        assert finite and err < TOLERANCE[dtype], (m, n, k, bits, dtype, variant, err)


def test_triton_kernels_match_the_reference_under_the_interpreter():
    """GEMV rows (1, 3, 8) and GEMM rows (9, 37); N and K not multiples of any block."""
    if CUDA:   # the compiled kernels are tested instead (and Triton 3.6's interpreter fails on numpy 2.5)
        pytest.skip('a GPU is present: test_triton_kernels_match_the_reference_on_the_gpu runs the compiled kernels')
    have_triton()
    shapes = [[1, 72, 200], [3, 40, 96], [8, 33, 64], [9, 72, 200], [37, 130, 96]]
    results = run_check(KERNEL_CHECK, 'cpu', ['float32', 'float16'], shapes, interpret=True)
    check_kernel_results(results, len(shapes) * 2 * 2 * 4)


@needs_gpu
def test_triton_kernels_match_the_reference_on_the_gpu():
    """Compiled, every dtype, the real ChatGLM2-6B layer shapes and ragged ones."""
    shapes = [[1, 4608, 4096], [5, 4096, 13696], [16, 27392, 4096], [300, 4096, 13696], [1, 72, 200],
              [9, 130, 96], [70, 130, 96]]
    results = run_check(KERNEL_CHECK, 'cuda', ['float32', 'float16', 'bfloat16'], shapes, interpret=False)
    check_kernel_results(results, len(shapes) * 2 * 3 * 4)


OPS_CHECK = r'''
import json, sys, torch
from modelscope_chatglm.models import attention, glm2, triton_ops as ops
from modelscope_chatglm.models.kv_cache import KVPool, PagedKV
device, dtypes, (heads, groups, d) = sys.argv[1], sys.argv[2].split(','), json.loads(sys.argv[3])
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
results = []
for name in dtypes:
    dt = getattr(torch, name)
    x, w = torch.randn(3, 5, 96, device=device).to(dt), torch.randn(96, device=device).to(dt)
    results.append(['rms_norm', name, rel(ops.rms_norm(x, w, 1e-5), glm2.rms_norm(x, w, 1e-5))])
    b, s = 2, 7
    qkv = torch.randn(b, s, (heads + 2 * groups) * d, device=device).to(dt)
    positions = torch.randint(0, 5000, (b, s), device=device)
    cos, sin = glm2.RotaryEmbedding(d // 2, 10000.0, 1.0)(positions)
    fused = qkv.clone()
    ops.rotary_qk_(fused, cos, sin, heads + groups, d)
    q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
    ref = torch.cat([glm2.apply_rotary(q.reshape(b, s, heads, d), cos, sin).flatten(2),
                     glm2.apply_rotary(k.reshape(b, s, groups, d), cos, sin).flatten(2), v], dim=-1)
    results.append(['rotary', name, rel(fused, ref)])
    for pages, lengths in ((300, [1, 40]), (300, [151, 299]), (5000, [3000, 17])):
        pool = KVPool(1, groups, d, pages, dt, device)
        pool.k.normal_(), pool.v.normal_()
        order = torch.randperm(pages - 1) + 1
        tables = [order[:lengths[0]], order[lengths[0]:lengths[0] + lengths[1]]]
        unused = torch.ones(pages, dtype=torch.bool)
        unused[torch.cat(tables)] = False
        pool.k[0][unused.to(device)], pool.v[0][unused.to(device)] = float('nan'), float('nan')   # never read
        kv = PagedKV.build(pool, [t.to(torch.int32) for t in tables], [1, 1])
        qd = torch.randn(b, heads, d, device=device).to(dt)
        out = ops.paged_decode(qd, pool.k[0], pool.v[0], kv.tables, kv.keys, d ** -0.5)
        ref = attention.gathered(qd, pool.k[0], pool.v[0], kv, d ** -0.5)
        results.append([f'paged_decode {lengths}', name, rel(out, ref)])
print(json.dumps(results))
'''


def run_ops_check(device, dtypes, shape, interpret):
    results = run_check(OPS_CHECK, device, dtypes, shape, interpret)
    assert len(results) == 5 * len(dtypes)
    for op, dtype, err in results:
        assert err < TOLERANCE[dtype], (op, dtype, err)


def test_fused_block_ops_match_torch_under_the_interpreter():
    """RMSNorm, in-place RoPE on Q/K heads, split-K paged decode attention (H/G = 2 query heads per group,
    padded to a 16-row tile; keys on shuffled pages; NaN in pages no table lists must never be read)."""
    if CUDA:
        pytest.skip('a GPU is present: test_fused_block_ops_match_torch_on_the_gpu runs them compiled')
    have_triton()
    run_ops_check('cpu', ['float32', 'float16'], [4, 2, 16], interpret=True)


@needs_gpu
def test_fused_block_ops_match_torch_on_the_gpu():
    run_ops_check('cuda', ['float32', 'float16', 'bfloat16'], [32, 2, 128], interpret=False)
    run_ops_check('cuda', ['float16'], [4, 2, 16], interpret=False)


# -- the graph runner's fixed-shape steps, eagerly on CPU ---------------------------------------------
def replies(chat, prompts, graphed, capture=False, joins_at=6):
    """Greedy replies (tokens and logprobs) of `prompts` through one engine, the later ones joining mid-way
    (the batch goes 1 -> 2 -> 3 sequences and back: buckets 1, 2 and 4). graphed: decode steps through the
    graph runner (capture=False: its fixed-shape step run eagerly)."""
    engine = chat.new_engine(max_batch=4)
    if graphed:
        kv = engine.runner.kv
        engine.runner.graphs = graphs.GraphRunner(chat.model, kv.pool, 4, kv.scratch_page, capture=capture)
    params = chat.sampling(max_new_tokens=40, do_sample=False, stop_ids=[])
    return replies_of(engine, prompts, params, stagger=joins_at), engine


@pytest.mark.parametrize('name', ['glm2', 'glm3', 'glm2-ptuning', 'glm2-int4'])
def test_graphed_decode_steps_give_the_eager_replies(make_checkpoint, name, monkeypatch):
    """The step the runner captures (ids, positions, pages and page tables in fixed buffers; the batch
    padded to its bucket with rows on a scratch page; tables padded to a power-of-two width), run without
    capture: the same greedy tokens and logprobs as the engine's ordinary forwards, across widths."""
    family = name.split('-')[0]
    extra = {'pre_seq_len': 4, 'prefix_projection': False} if 'ptuning' in name else {}
    if 'int4' in name:
        extra['quantization_bit'] = 4
    path = make_checkpoint(f'graphs-{name}', family, 'safetensors', shards=1, **extra)
    chat = modelscope_chatglm.load(path, device='cpu', dtype='float32')
    monkeypatch.setattr(graphs, 'MIN_WIDTH', 8)
    prompts = [chat.build_inputs(q) for q in ('你好', 'hello world, how are you today?', 'x')]
    eager, _ = replies(chat, prompts, graphed=False)
    stepped, engine = replies(chat, prompts, graphed=True)
    assert set(engine.runner.graphs.tables) >= {32, 64}
    for (tokens, logprobs), (tokens_, logprobs_) in zip(stepped, eager):
        assert tokens == tokens_
        assert max(abs(a - b) for a, b in zip(logprobs, logprobs_)) < 1e-4


# -- whole models on the GPU -----------------------------------------------------------------------
GPU_VARIANTS = [('glm2', {}), ('glm3', {}), ('glm2', {'rope_ratio': 16}), ('glm3', {'rope_ratio': 50}),
                ('glm1', {}), ('glm2', {'pre_seq_len': 4, 'prefix_projection': False})]
PRECISIONS = [('float16', 0), ('bfloat16', 0), ('float16', 8), ('float16', 4), ('bfloat16', 4)]


@needs_gpu
@pytest.mark.parametrize('family,extra', GPU_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize('dtype,bits', PRECISIONS, ids=lambda v: str(v))
def test_every_variant_runs_on_the_gpu(tmp_path, family, extra, dtype, bits):
    from modelscope_chatglm.testing import tiny
    path = tiny.build(str(tmp_path / 'ckpt'), family, 'safetensors', shards=2, **extra)
    cpu = modelscope_chatglm.load(path, device='cpu', dtype='float32', quantization_bit=bits or None,
                                  int8_activations=False)
    gpu = modelscope_chatglm.load(path, device='cuda', dtype=dtype, quantization_bit=bits or None)
    assert gpu.model.device.type == 'cuda' and gpu.dtype == getattr(torch, dtype)
    prompt = cpu.build_inputs('你好，请介绍一下你自己。')
    a, b = cpu.logits(prompt), gpu.logits(prompt).cpu()
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.03
    reply, history = gpu.chat('你好', max_new_tokens=12, do_sample=False)
    assert len(history) == 1 and isinstance(reply, str)


@needs_gpu
@pytest.mark.parametrize('family', ['glm2', 'glm3'])
@pytest.mark.parametrize('dtype,bits', PRECISIONS, ids=lambda v: str(v))
def test_graph_decode_matches_the_ordinary_decode(make_checkpoint, family, dtype, bits):
    """Graphs replay the fixed-shape step's kernels: identical to running them without capture, across
    buckets 1, 2 and 4. Against the engine's ordinary forwards (other shapes, so other kernel choices):
    close."""
    path = make_checkpoint(f'graphs-{family}', family, 'safetensors', shards=1)
    chat = modelscope_chatglm.load(path, device='cuda', dtype=dtype, quantization_bit=bits or None)
    prompts = [chat.build_inputs(q) for q in ('你好', 'hello world, how are you today?', 'x')]
    before = graphs.captures
    plain, _ = replies(chat, prompts, graphed=True, capture=False)
    captured, engine = replies(chat, prompts, graphed=True, capture=True)
    assert graphs.captures - before >= 3 and len(engine.runner.graphs.graphs) >= 3
    assert captured == plain
    eager, _ = replies(chat, prompts, graphed=False)
    for (_, logprobs), (_, eager_logprobs) in zip(captured, eager):
        n = 8     # (greedy paths may part once a near tie rounds the other way)
        assert max(abs(a - b) for a, b in zip(logprobs[:n], eager_logprobs[:n])) < (0.1 if dtype == 'bfloat16' else 0.02)


@needs_gpu
def test_graphs_follow_a_conversation_whose_cache_grows(glm3_dir):
    """Chat turns reuse the prefix cache's pages; the tables outgrow the first width and a wider graph is
    captured."""
    graphed = modelscope_chatglm.load(glm3_dir, device='cuda', dtype='float16')
    plain = modelscope_chatglm.load(glm3_dir, device='cuda', dtype='float16', cuda_graphs=False)
    history_a, history_b = [], []
    for question in ['你好', '请介绍一下你自己。', 'Hello! ' * 200, '谢谢']:
        a, history_a = graphed.chat(question, history_a, max_new_tokens=40, do_sample=False)
        b, history_b = plain.chat(question, history_b, max_new_tokens=40, do_sample=False)
        assert a == b


@needs_gpu
def test_cuda_through_the_pipeline_cli_and_server(glm2_dir, tmp_path):
    pytest.importorskip('modelscope')
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    expected, _ = modelscope_chatglm.load(glm2_dir, device='cuda').chat('你好', max_new_tokens=8, do_sample=False)
    pipe = pipeline(task=Tasks.chat, model=glm2_dir, device='gpu')
    assert pipe.chat_model.model.device.type == 'cuda'
    assert pipe({'text': '你好', 'history': []}, max_new_tokens=8, do_sample=False)['response'] == expected

    env = dict(os.environ, MODELSCOPE_CHATGLM_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, '-m', 'modelscope_chatglm.cli', 'chat', '--model', glm2_dir, '--device',
                          'cuda', '--max-new-tokens', '8'], input='你好\nexit\n', capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'device=cuda' in out.stderr and out.stdout.count('ChatGLM: ') == 1

    pytest.importorskip('fastapi')
    import httpx
    port = free_port()
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cuda', '--port', str(port)],
                         f'http://127.0.0.1:{port}/health', tmp_path / 'serve.log', env=env)
    try:
        body = {'model': 'x', 'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 8, 'temperature': 0}
        r = httpx.post(f'http://127.0.0.1:{port}/v1/chat/completions', json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()['choices'][0]['message']['content'] == expected
    finally:
        proc.terminate()
        proc.wait(30)

