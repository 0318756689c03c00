"""The per-row ops of a GLM2/3 block in C (quantization/kernels/block_ops.c, models/cpu_ops.py: RMSNorm, RoPE,
the MLP's SwiGLU) against glm2.py's torch code, on every instruction-set build; the bf16-in, bf16-out
int8-activation linears; and every block of a forward in one call (cpu_ops.glm2_layers) against the blocks'
modules one by one."""
import ctypes

import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.model_config import ModelConfig
from modelscope_chatglm.models import cpu_ops, glm2
from modelscope_chatglm.models.kv_cache import KVPool, PagedKV
from modelscope_chatglm.quantization import QuantizedLinear, quantize

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def rms_norm(lib, x, w, eps=1e-5, threads=2):
    """The kernel on x [M, K] (any row stride) -> [M, K]."""
    y = torch.empty(x.shape, dtype=x.dtype)
    kernel = lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.rms_norm_f32
    kernel(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], w.data_ptr(), eps, y.data_ptr(), x.shape[1], threads)
    return y


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('K', [64, 100, 4096])   # a tiny model's width, a width that is no multiple of 16, the 6B's
def test_rms_norm_is_torchs_up_to_the_order_of_its_sum(isa_lib, dtype, K):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(40, K, generator=g) * 3).to(DTYPES[dtype])
    w = (1 + 0.2 * torch.randn(K, generator=g)).to(DTYPES[dtype])
    ours, theirs = rms_norm(isa_lib, x, w), glm2.rms_norm(x, w, 1e-5)
    if dtype == 'fp32':
        assert ((ours - theirs).abs() / theirs.abs().clamp_min(1e-6)).max().item() < 1e-6
    else:   # the same fp32 value rounded once; a last-bit change in the row's scale moves a rare rounding
        ulp = 2.0 ** (torch.frexp(theirs.float())[1] - 8).float()
        assert ((ours.float() - theirs.float()).abs() <= ulp).all()
        assert (ours == theirs).float().mean().item() > 0.99
    # a row's result is its own: alone, in a batch on the threads, or read with another row stride
    alone = torch.cat([rms_norm(isa_lib, x[m:m + 1], w, threads=1) for m in range(40)])
    assert torch.equal(ours, alone)
    wide = torch.zeros(40, K + 24, dtype=x.dtype)
    wide[:, 5:5 + K] = x
    assert torch.equal(rms_norm(isa_lib, wide[:, 5:5 + K], w), ours)


def test_rms_norm_lets_a_nan_through_its_own_row_only(isa_lib):
    x, w = torch.randn(20, 256), torch.ones(256)
    x[3, 7] = float('nan')
    y = rms_norm(isa_lib, x, w)
    assert y[3].isnan().all() and not y[torch.arange(20) != 3].isnan().any()
    yb = rms_norm(isa_lib, x.bfloat16(), w.bfloat16())
    assert yb[3].isnan().all() and not yb[torch.arange(20) != 3].isnan().any()


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('heads,groups,d,n', [(32, 2, 128, 5), (3, 1, 8, 1), (4, 2, 16, 17)])
def test_rotary_is_torchs_bit_for_bit(isa_lib, dtype, heads, groups, d, n, monkeypatch):
    monkeypatch.setattr(cpu_ops, 'load_library', lambda: isa_lib)
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(1, n, (heads + 2 * groups) * d, generator=g).to(DTYPES[dtype])
    cos, sin = glm2.RotaryEmbedding(d // 2, 10000.0, 1.0)(torch.arange(300, 300 + n)[None])
    q_end, k_end = heads * d, (heads + groups) * d
    expected_q = glm2.apply_rotary(qkv[..., :q_end].reshape(1, n, heads, d), cos, sin).flatten(2)
    expected_k = glm2.apply_rotary(qkv[..., q_end:k_end].reshape(1, n, groups, d), cos, sin).flatten(2)
    ours = qkv.clone()
    cpu_ops.rotary_qk_(ours, cos, sin, heads + groups, d)
    assert torch.equal(ours[..., :q_end], expected_q)
    assert torch.equal(ours[..., q_end:k_end], expected_k)
    assert torch.equal(ours[..., k_end:], qkv[..., k_end:])     # V is never rotated
    assert not torch.equal(ours, qkv)


@pytest.mark.parametrize('bits', [8, 4])
def test_int8_activation_kernels_take_and_give_bf16_as_torch_converts(isa_lib, bits):
    """`*_x8_bf16`: bf16 x in, bf16 y out; the bits of the fp32 entry point with torch's conversions around it."""
    g = torch.Generator().manual_seed(bits)
    q, scale = quantize(torch.randn(77, 1000, generator=g), bits)
    x, bias = torch.randn(9, 1000, generator=g).bfloat16(), torch.randn(77, generator=g)
    xf, scale = x.float(), scale.float()   # (held in names: a temporary's memory is freed before the call)
    y32, y16 = torch.empty(9, 77), torch.empty(9, 77, dtype=torch.bfloat16)
    getattr(isa_lib, f'q{bits}_gemv_x8')(xf.data_ptr(), 9, 1000, q.data_ptr(), scale.data_ptr(), bias.data_ptr(),
                                         y32.data_ptr(), 77, 2)
    getattr(isa_lib, f'q{bits}_gemv_x8_bf16')(x.data_ptr(), 9, 1000, q.data_ptr(), scale.data_ptr(),
                                              bias.data_ptr(), y16.data_ptr(), 77, 2)
    assert torch.equal(y16, y32.bfloat16())


@pytest.mark.parametrize('bits', [8, 4])
def test_a_bf16_linear_with_int8_activations_rounds_once(lib, bits):
    """Through QuantizedLinear (the lane layout where the build has it): the bf16 entry point gives what
    the fp32 one gives, rounded to bf16 once."""
    layer = QuantizedLinear(4096, 300, bits, bias=True, dtype=torch.bfloat16, scale_dtype=torch.float32)
    layer.load_float_weight(torch.randn(300, 4096))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(300))
    layer.int8_activations = True
    x = torch.randn(3, 4096).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected, xf, bias = torch.empty(3, 300), x.float(), layer.bias.detach().float()
    name = f'q{bits}_gemv_x8' + ('_lanes' if layer.lane_layout else '')
    getattr(lib, name)(xf.data_ptr(), 3, 4096, layer.weight.data_ptr(), layer.weight_scale.data_ptr(),
                       bias.data_ptr(), expected.data_ptr(), 300, 2)
    assert torch.equal(y, expected.bfloat16())


def test_the_cpu_ops_take_fp32_and_bf16_without_autograd_only():
    x = torch.randn(2, 64)
    assert glm2.fused_ops(x) is cpu_ops and glm2.fused_ops(x.bfloat16()) is cpu_ops
    assert glm2.fused_ops(x.half()) is None                       # torch's code for what the C does not take
    assert glm2.fused_ops(x, torch.ones(64).bfloat16()) is None   # mixed dtypes: torch promotes, so does glm2.py
    w = torch.ones(64, requires_grad=True)
    assert glm2.fused_ops(x, w) is None                           # training records the torch ops
    with torch.no_grad():
        assert glm2.fused_ops(x, w) is cpu_ops


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_glm2_model_replies_alike_through_the_cpu_ops_and_torch(glm2_dir, dtype, monkeypatch):
    """The whole model: logits close to those of glm2.py's torch code, and the same greedy reply."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype=dtype)
    calls = []
    real = cpu_ops.rms_norm
    monkeypatch.setattr(cpu_ops, 'rms_norm', lambda *a: calls.append(1) or real(*a))
    ids = [5, 17, 33, 99, 120, 7, 64, 3]
    fused = chat.logits(ids)                                      # (in inference mode, as every surface runs)
    assert calls                                                  # the C ops ran
    reply = chat.chat('hello there', max_new_tokens=12, do_sample=False)[0]
    chat.clear_cache()                                            # the next reply prefills its prompt again
    monkeypatch.setattr(cpu_ops, 'applies', lambda *tensors: False)
    calls.clear()
    plain = chat.logits(ids)
    assert not calls
    tolerance = 1e-4 if dtype == 'float32' else 5e-2
    assert (fused - plain).abs().max().item() < tolerance * max(1.0, plain.abs().max().item())
    assert chat.chat('hello there', max_new_tokens=12, do_sample=False)[0] == reply
    assert not calls


def swiglu(lib, h, ref=''):
    s = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype)
    kernel = getattr(lib, ('swiglu_bf16' if h.dtype == torch.bfloat16 else 'swiglu_f32') + ref)
    kernel(h.data_ptr(), h.shape[0], h.shape[1] // 2, s.data_ptr(), *([] if ref else [2]))
    return s


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('F', [13696, 37])   # ChatGLM2-6B's, and one that leaves part vectors on every build
@pytest.mark.parametrize('rows', [3, 20])   # 20: on the threads
def test_swiglu_is_torchs_up_to_its_exp_and_its_references_bits_on_every_build(isa_lib, isa_builds, dtype, F, rows):
    g = torch.Generator().manual_seed(F)
    h = (torch.randn(rows, 2 * F, generator=g) * 4).to(DTYPES[dtype])
    h[0, :6] = torch.tensor([0.0, -0.0, 90.0, -90.0, -200.0, 200.0])   # past exp's clamps: still silu's values
    ours = swiglu(isa_lib, h)
    gate, up = h.float().chunk(2, dim=-1)
    if dtype == 'fp32':
        expected = torch.nn.functional.silu(gate) * up
        assert ((ours - expected).abs() <= 4e-7 * expected.abs() + 1e-30).all()
    else:   # silu rounded to bf16, then the product rounded: torch's two ops, a rare last-bit difference
        expected = (torch.nn.functional.silu(h[:, :F]) * h[:, F:]).float()
        ulp = 2.0 ** (torch.frexp(expected)[1] - 8).float()
        assert ((ours.float() - expected).abs() <= ulp).all()
        assert (ours[1:].float() == expected[1:]).float().mean().item() > 0.98   # (row 0 holds the clamped)
    # every build gives the reference's bits: vec.h's exp on full vectors, its scalar twin on the rest
    assert torch.equal(ours, swiglu(isa_lib, h, ref='_ref'))
    if 'x86-64' in isa_builds:
        assert torch.equal(ours, swiglu(isa_builds['x86-64'], h))


@pytest.mark.parametrize('dtype', list(DTYPES))
def test_swiglu_gives_silus_values_at_the_edges_in_vector_lanes_and_the_tail(isa_lib, dtype):
    """NaN, infinities and gates past exp's range, both in full vectors and past the last one (F = 37 on
    every build): what torch's silu gives, and the reference's bits (a NaN for a NaN)."""
    edges = torch.tensor([float('nan'), float('inf'), -float('inf'), -90.0, -200.0, 90.0, 89.0, -88.5, 0.0, -0.0])
    F = 37
    h = torch.ones(2, 2 * F)
    h[0, :len(edges)] = edges                 # lanes of the first vectors
    h[1, F - len(edges):F] = edges            # the last ones: the scalar tail on every build
    h = h.to(DTYPES[dtype])
    ours, ref = swiglu(isa_lib, h).float(), swiglu(isa_lib, h, ref='_ref').float()
    expected = torch.nn.functional.silu(h[:, :F].float())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    for row, cols in ((0, slice(0, len(edges))), (1, slice(F - len(edges), F))):
        got, want = ours[row, cols], expected[row, cols]
        assert torch.equal(got.isnan(), want.isnan())    # NaN and -inf give NaN, as torch's
        finite = ~want.isnan()
        assert torch.allclose(got[finite], want[finite], rtol=1e-2 if dtype == 'bf16' else 1e-6, atol=0)
        assert torch.equal(got[finite].signbit(), want[finite].signbit())   # -0 for a very negative gate


# -- every block in one call (cpu_ops.glm2_layers) ------------------------------------------------------

def quantized_block(cfg, bits, dtype, seed):
    """A GLMBlock of random weights, its four linears QuantizedLinear with int8 activations."""
    torch.manual_seed(seed)
    block = glm2.GLMBlock(cfg).to(dtype)
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight.data.uniform_(0.5, 1.5)
    for path in glm2.GLM2Model.QUANTIZED_LINEARS:
        parent_name, _, name = path.rpartition('.')
        parent, old = block.get_submodule(parent_name), block.get_submodule(path)
        new = QuantizedLinear(old.in_features, old.out_features, bits, old.bias is not None, dtype=dtype,
                              scale_dtype=torch.float32)
        new.load_float_weight(torch.randn(old.out_features, old.in_features) * old.in_features ** -0.5)
        if old.bias is not None:
            with torch.no_grad():
                new.bias.copy_(torch.randn(old.out_features) * 0.1)
        new.int8_activations = True     # (the lane layout of the library in use)
        setattr(parent, name, new)
    return block


def quantized_blocks(cfg, bits, dtype, count=2):
    return torch.nn.ModuleList(quantized_block(cfg, bits, dtype, seed=bits + 10 * i) for i in range(count))


def two_sequences(cfg, dtype, layers=2, cached=7, chunk=5):
    """A forward of a `chunk`-row prompt chunk after 7 cached positions (sequence A) and one decode row of
    sequence B (3 positions before it), over a pool of random K/V: its PagedKV and x [1, chunk + 1, D]."""
    pool = KVPool(layers, cfg.num_kv_heads, cfg.head_dim, 64, dtype, 'cpu')
    pool.k.copy_(torch.randn(pool.k.shape))
    pool.v.copy_(torch.randn(pool.v.shape))
    a = torch.arange(10, 10 + cached + chunk, dtype=torch.int32)
    b = torch.tensor([40, 3, 41, 50], dtype=torch.int32)       # pages need not be adjacent
    kv = PagedKV.build(pool, [a, b], [chunk, 1])
    positions = torch.cat([torch.arange(cached, cached + chunk), torch.tensor([3])])
    cos, sin = glm2.RotaryEmbedding(cfg.head_dim // 2, cfg.rope_base, 1.0)(positions[None])
    return pool, kv, (torch.randn(1, chunk + 1, cfg.hidden_size) * 2).to(dtype), cos, sin


def module_by_module(blocks, x, cos, sin, kv):
    for i, block in enumerate(blocks):
        x = block(x, cos, sin, kv.layer(i))
    return x


@pytest.fixture
def library(isa_lib):
    """The kernels of one instruction-set build, for everything in this test (restored after)."""
    from modelscope_chatglm.quantization import build
    real = build.load_library()
    build.use_library(isa_lib)
    yield isa_lib
    build.use_library(real)


FULL_WIDTH = ModelConfig('glm2', 1, 4096, 32, 128, 2, 13696, 64, 64)     # ChatGLM2-6B's layer
# Widths that leave part strips (QKV 240 rows) and short last blocks of 64 columns (200, 144, 336).
NARROW = ModelConfig('glm2', 1, 200, 3, 48, 1, 336, 64, 64)


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('cfg,chunk', [(FULL_WIDTH, 5), (NARROW, 17)], ids=['full-width', 'narrow-18-rows'])
def test_every_block_in_one_call_gives_the_modules_bits(library, cfg, chunk, bits, dtype):
    """glm2_layers over two blocks: bit for bit what their modules give, one by one, each layer's K/V written
    to the same pool slots, on every instruction-set build (18 rows: RMSNorm on threads)."""
    blocks = quantized_blocks(cfg, bits, DTYPES[dtype])
    pool, kv, x, cos, sin = two_sequences(cfg, DTYPES[dtype], chunk=chunk)
    with torch.inference_mode():
        fused = cpu_ops.glm2_layers(blocks, x, cos, sin, kv)
        fused_k, fused_v = pool.k.clone(), pool.v.clone()
        for cache in (pool.k, pool.v):  # the new rows' slots forgotten: each path must write them
            cache[:, kv.write] = torch.randn(2, len(kv.write), cfg.num_kv_heads, cfg.head_dim).to(cache.dtype)
        modules = module_by_module(blocks, x, cos, sin, kv)
        first = blocks[0](x, cos, sin, kv.layer(0))
    assert fused is not None and fused.shape == x.shape and fused.dtype == x.dtype
    assert torch.equal(fused, modules)
    assert not torch.equal(fused, first)    # the second block ran, on the first one's output
    assert torch.equal(pool.k, fused_k) and torch.equal(pool.v, fused_v)


def test_the_call_reads_the_layout_python_writes(lib):
    from modelscope_chatglm.quantization.build import GLM2Layer
    assert ctypes.sizeof(GLM2Layer) == lib.glm2_layer_bytes()


def test_every_block_in_one_call_only_where_its_kernels_apply(lib):
    cfg = NARROW
    blocks = quantized_blocks(cfg, 4, torch.float32).requires_grad_(False)
    pool, kv, x, cos, sin = two_sequences(cfg, torch.float32)
    with torch.inference_mode():
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is not None
        bf16_blocks = quantized_blocks(cfg, 4, torch.bfloat16)
        assert cpu_ops.glm2_layers(bf16_blocks, x.bfloat16(), cos, sin, kv) is None   # the pool holds fp32
        three = torch.nn.ModuleList([*blocks, quantized_block(cfg, 4, torch.float32, seed=5)])
        assert cpu_ops.glm2_layers(three, x, cos, sin, kv) is None                  # the pool has 2 layers
        down = blocks[1].mlp.dense_4h_to_h
        down.int8_activations = False                                               # the exact kernels
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        down.int8_activations = True
        blocks[1].mlp.dense_4h_to_h = torch.nn.Sequential(down)   # a wrapper (as an adapter's) runs the modules
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        blocks[1].mlp.dense_4h_to_h = down
        seen = []
        hook = blocks[1].self_attention.dense.register_forward_hook(lambda *a: seen.append(1))
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None    # a hook must see its module run
        module_by_module(blocks, x, cos, sin, kv)
        assert seen
        hook.remove()
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is not None
        hook = blocks[0].register_forward_pre_hook(lambda *a: seen.append(2))        # on a block itself
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        hook.remove()
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # on every module
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        hook.remove()
        blocks[1].mlp.forward = lambda h: h                                           # a forward replaced
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        del blocks[1].mlp.forward

        class Changed(glm2.GLMBlock):                                                 # a subclass
            pass
        blocks[0].__class__ = Changed
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        blocks[0].__class__ = glm2.GLMBlock
        norm = blocks[0].input_layernorm
        blocks[0].input_layernorm = torch.nn.LayerNorm(cfg.hidden_size, eps=norm.eps)  # another norm, same fields
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        blocks[0].input_layernorm = norm
        assert cpu_ops.glm2_layers(torch.nn.ModuleList(), x, cos, sin, kv) is None   # no blocks: the modules' x
        k = pool.k
        pool.k = torch.zeros(k.shape[0], 2 * k.shape[1], *k.shape[2:])[:, ::2]         # a pool with gaps
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        pool.k = k
        write = kv.write
        kv.write = write.int()                                                        # slots the C reads as int64
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        kv.write = write
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is not None
    x.requires_grad_(True)
    with torch.enable_grad():   # autograd records torch's ops (the weights take no grad here: x alone decides)
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
    with torch.no_grad():
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is not None


def test_a_write_slot_outside_the_pool_is_refused_as_the_modules_refuse_it(lib):
    """The C writes nothing and declines; the modules then raise torch's index error, as without it."""
    cfg = NARROW
    blocks = quantized_blocks(cfg, 8, torch.float32)
    pool = KVPool(2, cfg.num_kv_heads, cfg.head_dim, 16, torch.float32, 'cpu')
    kv = PagedKV.build(pool, [torch.tensor([0, 1, 2, 40], dtype=torch.int32)], [1])   # slot 40 of 16
    cos, sin = glm2.RotaryEmbedding(cfg.head_dim // 2, cfg.rope_base, 1.0)(torch.tensor([[3]]))
    x = torch.randn(1, 1, cfg.hidden_size)
    with torch.inference_mode():
        assert cpu_ops.glm2_layers(blocks, x, cos, sin, kv) is None
        assert not pool.k.any() and not pool.v.any()
        with pytest.raises(IndexError):
            module_by_module(blocks, x, cos, sin, kv)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_quantized_model_replies_alike_with_one_call_and_module_by_module(glm2_dir, dtype, monkeypatch):
    """The whole model, int4 with int8 activations (the CPU default): the same logits, bit for bit, and
    the same greedy reply, whether its blocks run in one call or module by module."""
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype=dtype, quantization_bit=4)
    results = []
    real = cpu_ops.glm2_layers
    monkeypatch.setattr(cpu_ops, 'glm2_layers', lambda *a: results.append(y := real(*a)) or y)
    ids = [5, 17, 33, 99, 120, 7, 64, 3]
    whole = chat.logits(ids)
    reply = chat.chat('hello there', max_new_tokens=12, do_sample=False)[0]
    assert results and all(y is not None for y in results)     # every forward ran in one call
    chat.clear_cache()
    monkeypatch.setattr(cpu_ops, 'glm2_layers', lambda *a: None)
    assert torch.equal(chat.logits(ids), whole)
    assert chat.chat('hello there', max_new_tokens=12, do_sample=False)[0] == reply
