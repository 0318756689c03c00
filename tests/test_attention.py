"""Attention over paged K/V (`attend_f32` / `attend_bf16`: quantization/kernels/attention.c and
attention_avx512_bf16.c; models/attention.py): the kernels against their definition on every
instruction-set build, and a query's bits independent of the chunk, the batch and the threads around it,
at ChatGLM2's full width (32 heads, 2 groups, d = 128)."""
import pytest
import torch

from modelscope_chatglm.models import attention
from modelscope_chatglm.models.kv_cache import KVPool, PagedKV

from conftest import replies_of


def paged_inputs(parts, H, G, d, seed=0, extra_pages=37):
    """parts = [(s new rows, keys, min_keys or None), ...]: random q rows (inside wider rows, as the QKV
    projection leaves them), a pool of random K/V, and each part's keys on pages in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    total_keys = sum(keys for _, keys, _ in parts)
    pages = total_keys + extra_pages
    order = torch.randperm(pages, generator=g)[:total_keys].to(torch.int32)
    tables, start = [], 0
    for _, keys, _ in parts:
        tables.append(order[start:start + keys])
        start += keys
    rows = sum(s for s, _, _ in parts)
    return dict(qkv=torch.randn(rows, H * d + 2 * G * d, generator=g), k=torch.randn(pages, G, d, generator=g),
                v=torch.randn(pages, G, d, generator=g), tables=tables, parts=parts, H=H, G=G, d=d)


def metadata(inputs):
    parts = inputs['parts']
    min_keys = [m or 0 for _, _, m in parts] if any(m for _, _, m in parts) else None
    pool = KVPool(1, inputs['G'], inputs['d'], 1, torch.float32, 'cpu')   # (only its device is read)
    return PagedKV.build(pool, inputs['tables'], [s for s, _, _ in parts], min_keys)


def paged_call(inputs, dtype):
    """The kernels' arguments for `inputs` in `dtype` and the output they write (made now: calling them
    then runs no torch op)."""
    H, G, d = inputs['H'], inputs['G'], inputs['d']
    qkv, k, v = (inputs[x].to(dtype) for x in ('qkv', 'k', 'v'))
    kv = metadata(inputs)
    out = torch.full((qkv.shape[0], H, d), float('nan'), dtype=dtype)
    min_keys = kv.min_keys.data_ptr() if kv.min_keys is not None else None
    key_start = torch.arange(kv.parts, dtype=torch.int64) * kv.tables.shape[1]
    keep = (qkv, k, v, kv, key_start)     # (alive as long as the arguments are used)
    args = [qkv.data_ptr(), qkv.shape[1], kv.parts, kv.rows.data_ptr(), kv.keys.data_ptr(), min_keys,
            kv.tables.data_ptr(), key_start.data_ptr(), k.data_ptr(), v.data_ptr(), G * d, H, G, d, d ** -0.5,
            out.data_ptr()]
    return args, out, keep


def run_paged(lib, name, inputs, dtype, threads=2):
    args, out, _keep = paged_call(inputs, dtype)
    done = getattr(lib, name)(*args, *([] if name.endswith('_ref') else [threads]))
    return out, done


def definition(inputs, dtype):
    """float64 softmax attention of every part, from inputs rounded to `dtype`."""
    H, G, d = inputs['H'], inputs['G'], inputs['d']
    qkv, k, v = (inputs[x].to(dtype).double() for x in ('qkv', 'k', 'v'))
    out, row = [], 0
    for (s, keys, min_keys), table in zip(inputs['parts'], inputs['tables']):
        q = qkv[row:row + s, :H * d].view(s, H, d).transpose(0, 1)                   # [H, s, d]
        kk, vv = (x[table.long()].transpose(0, 1).repeat_interleave(H // G, 0) for x in (k, v))
        visible = torch.ones(s, keys, dtype=torch.bool).tril(keys - s)
        if min_keys:
            visible[:, :min_keys] = True
        scores = (q @ kk.transpose(1, 2) * d ** -0.5).masked_fill(~visible, float('-inf'))
        out.append(torch.softmax(scores, -1).matmul(vv).transpose(0, 1))
        row += s
    return torch.cat(out)


# A decode step, a prompt with nothing cached, chunks after cached positions (keys not a multiple of 16),
# ChatGLM2's shape, heads per group not a multiple of 4, one head per group, d not a multiple of 16 and
# over 128, ChatGLM-6B's bidirectional prompt (min_keys), several parts of each kind in one call.
SHAPES = [([(1, 1, None)], 32, 2, 128), ([(1, 300, None)], 32, 2, 128), ([(37, 37, None)], 4, 2, 16),
          ([(40, 333, None)], 32, 2, 128), ([(5, 70, None)], 6, 2, 32), ([(3, 50, None)], 8, 8, 256),
          ([(16, 16, None)], 2, 1, 64), ([(7, 19, None), (1, 5, None)], 4, 2, 24),
          ([(12, 12, 9), (1, 40, None)], 4, 4, 32),
          ([(1, 90, None), (20, 45, None), (1, 3, None), (9, 9, 6)], 32, 2, 128)]


@pytest.mark.parametrize('parts,H,G,d', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_paged_attention_equals_its_definition_on_every_build(isa_lib, parts, H, G, d, dtype):
    """fp32: within fp32 rounding of the float64 definition, and of the scalar reference. bf16 (products
    of bf16 summed in fp32, p and the output rounded to bf16): within bf16 rounding."""
    inputs = paged_inputs(parts, H, G, d, seed=len(parts) + H)
    expected = definition(inputs, dtype)
    name = 'attend_f32' if dtype == torch.float32 else 'attend_bf16'
    ref, done_ref = run_paged(isa_lib, name + '_ref', inputs, dtype)
    fast, done = run_paged(isa_lib, name, inputs, dtype)
    assert done == done_ref == 1
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (ref.double() - expected).abs().max() < tol
    assert (fast.double() - expected).abs().max() < tol
    assert (fast.double() - ref.double()).abs().max() < tol
    if dtype == torch.bfloat16:
        assert (fast.double() - expected).abs().mean() < 2e-3


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_in_any_chunk_batch_or_thread_count(isa_lib, dtype):
    """Full width. One sequence of 700 positions: its queries computed as one prompt, as chunks (each
    after the positions before it), as decode steps, next to other sequences' parts, and on 1 or 3
    threads, give the same bits on every build."""
    s, H, G, d = 700, 32, 2, 128
    inputs = paged_inputs([(s, s, None)], H, G, d, seed=5)
    name = 'attend_f32' if dtype == torch.float32 else 'attend_bf16'
    whole, _ = run_paged(isa_lib, name, inputs, dtype)
    table, qkv = inputs['tables'][0], inputs['qkv']
    neighbours = paged_inputs([(3, 250, None), (1, 600, None)], H, G, d, seed=6)
    for cuts in ([0, 128, 256, 700], [0, 1, 17, 18, 300, 699, 700], [0, 333, 700]):
        pieces = []
        for a, b in zip(cuts, cuts[1:]):
            chunk = dict(inputs, qkv=qkv[a:b], tables=[table[:b]], parts=[(b - a, b, None)])
            if a % 2:   # every other chunk beside other sequences' rows (their pages are other rows of the pool)
                pages = inputs['k'].shape[0]
                chunk = dict(chunk, qkv=torch.cat([neighbours['qkv'], qkv[a:b]]),
                             k=torch.cat([inputs['k'], neighbours['k']]), v=torch.cat([inputs['v'], neighbours['v']]),
                             tables=[t + pages for t in neighbours['tables']] + [table[:b]],
                             parts=neighbours['parts'] + [(b - a, b, None)])
                pieces.append(run_paged(isa_lib, name, chunk, dtype)[0][-(b - a):])
            else:
                pieces.append(run_paged(isa_lib, name, chunk, dtype)[0])
        assert torch.equal(torch.cat(pieces), whole), cuts
    for threads in (1, 3):
        assert torch.equal(run_paged(isa_lib, name, inputs, dtype, threads)[0], whole)


@pytest.mark.parametrize('name', ['attend_f32', 'attend_bf16', 'attend_f32_ref', 'attend_bf16_ref'])
def test_paged_attention_lets_a_nan_through(isa_lib, name):
    """A NaN in q, K or V reaches the outputs that read it, as in SDPA: never a silently finite result."""
    H, G, d = 8, 2, 32
    for where in ('q', 'k', 'v'):
        inputs = paged_inputs([(4, 40, None)], H, G, d, seed=3)
        if where == 'q':
            inputs['qkv'][2, 5 * d + 3] = float('nan')          # position 2, head 5 (group 1)
        else:
            page = int(inputs['tables'][0][30])                     # key 30: seen by every query
            inputs[where][page, 1, 7] = float('nan')
        dtype = torch.float32 if 'f32' in name else torch.bfloat16
        out, done = run_paged(isa_lib, name, inputs, dtype)
        assert done == 1
        expected = torch.zeros(4, H, dtype=torch.bool)
        if where == 'q':
            expected[2, 5] = True
        else:
            expected[:, 4:] = True
        assert torch.equal(out.isnan().any(dim=-1), expected), (name, where)


def test_paged_attention_refuses_shapes_it_cannot_compute(lib):
    """More rows than keys, heads not a multiple of the groups: -> 0 (the caller falls back), nothing
    half-written is used."""
    for parts, H, G in (([(5, 4, None)], 4, 2), ([(2, 8, None)], 6, 4)):
        inputs = paged_inputs(parts, H, G, 16)
        for name in ('attend_f32', 'attend_bf16', 'attend_f32_ref'):
            assert run_paged(lib, name, inputs, torch.float32 if 'f32' in name else torch.bfloat16)[1] == 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_model_attention_takes_the_kernel_on_cpu_and_torch_agrees(lib, dtype):
    """models/attention.paged runs the kernel on CPU; the torch path (gathered pages, SDPA) that other
    devices take gives the same result to rounding."""
    H, G, d = 32, 2, 128
    inputs = paged_inputs([(1, 90, None), (20, 45, None), (9, 9, 6)], H, G, d, seed=9)
    kv = metadata(inputs)
    q = inputs['qkv'][:, :H * d].view(-1, H, d).to(dtype)
    k, v = inputs['k'].to(dtype), inputs['v'].to(dtype)
    out = attention.paged(q, k, v, kv, d ** -0.5)
    assert torch.equal(out, attention.compiled(q, k, v, kv, d ** -0.5))
    torch_path = attention.gathered(q, k, v, kv, d ** -0.5)
    assert (out.double() - torch_path.double()).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    assert (out.double() - definition(inputs, dtype)).abs().max() < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.fixture(scope='module')
def full_width(tmp_path_factory):
    """Two ChatGLM2-6B-wide layers (hidden 4096, 32 heads, 2 K/V groups, ffn 13696), int4, with int8
    activations: the shapes where fp32 SDPA's sums depended on the chunk."""
    import modelscope_chatglm
    from modelscope_chatglm.testing import tiny
    path = tiny.build(str(tmp_path_factory.mktemp('full-width')), 'glm2', 'safetensors', 1, seed=4, hidden_size=4096,
                      num_layers=2, num_heads=32, kv_channels=128, groups=2, ffn_hidden_size=13696,
                      quantization_bit=4)
    return modelscope_chatglm.load(path, device='cpu', dtype='float32', int8_activations=True)


def test_full_width_greedy_replies_do_not_depend_on_chunks_batches_or_arrival(full_width):
    """Eight prompts (30 to 300 tokens) prefilled whole, in 16-token chunks beside each other's decode
    steps, or one at a time: the same tokens and the same logprobs, bit for bit."""
    chat = full_width
    g = torch.Generator().manual_seed(0)
    vocab = chat.tokenizer.vocab_size
    prompts = [chat.build_inputs(chat.tokenizer.decode(torch.randint(20, vocab - 20, (n,), generator=g).tolist()))
               for n in (300, 30, 170, 64, 250, 45, 120, 90)]
    params = chat.sampling(max_new_tokens=6, do_sample=False, stop_ids=[])

    alone = replies_of(chat.new_engine(max_batch=1, prefill_chunk=4096), prompts, params)
    assert replies_of(chat.new_engine(max_batch=8, prefill_chunk=16), prompts, params) == alone
    assert replies_of(chat.new_engine(max_batch=8, prefill_chunk=37), prompts, params, stagger=3) == alone
