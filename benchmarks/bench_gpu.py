"""GPU benchmark: int8/int4 kernels and end-to-end ChatGLM2-6B decode/prefill on CUDA.

    python benchmarks/bench_gpu.py kernels [--sweep]        # quantized linear vs cuBLAS, per layer shape
    python benchmarks/bench_gpu.py e2e --dir /tmp/glm2-6b    # full-size random checkpoint, every dtype

`kernels`: the four linear shapes of a ChatGLM2-6B block at M = 1, 16 (decode) and 1024, 8192
(prefill): our Triton int8/int4 kernels against cuBLAS on the bf16 weight, median of
triton.testing.do_bench with p20/p80, and the weight bytes per second at M = 1. `--sweep` tries
launch shapes around the defaults and prints the best per shape.

`e2e`: builds (once) a checkpoint with the real ChatGLM2-6B shapes (28 layers, hidden 4096, ffn
13696, vocab 65024; random fp16 weights, safetensors shards in the hub layout) and loads it through
`modelscope_chatglm.load` as bf16, fp16, int8 and int4 (quantized on load). Per mode, through the engine
the server steps (paged K/V, one attention call per layer, decode steps from CUDA graphs per batch
bucket): decode tok/s at batch 1 with graphs and without, at batch 16 (16 streams of the continuous
batch), prefill tok/s at 1K and 8K prompt tokens, peak GPU memory; then a ChatGLM2-6B-32K int4 model (rope_ratio 16) prefilling and
decoding at 32K context, with its peak memory. Results also go to --json.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

LAYER_SHAPES = {'qkv': (4608, 4096), 'dense': (4096, 4096), 'h_to_4h': (27392, 4096), '4h_to_h': (4096, 13696)}


def spread(values):
    values = sorted(values)
    return {'median': statistics.median(values), 'min': values[0], 'max': values[-1], 'n': len(values)}


# -- kernels ---------------------------------------------------------------------------------------
def bench_kernels(sweep: bool, out: dict):
    from triton.testing import do_bench
    from modelscope_chatglm.quantization import formats, triton_kernels as tk
    dev = torch.device('cuda')
    rows = []
    print(f'{"shape":9s} {"M":>5s} {"bf16 cuBLAS us":>15s} {"int8 us":>9s} {"int4 us":>9s}  '
          f'{"int8 x":>6s} {"int4 x":>6s}  {"int8 GB/s":>9s} {"int4 GB/s":>9s}')
    for name, (n, k) in LAYER_SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
        quant = {bits: formats.quantize(w, bits) for bits in (8, 4)}
        for m in (1, 16, 64, 1024, 8192):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t = {'bf16': do_bench(lambda: torch.nn.functional.linear(x, w), return_mode='all')}
            for bits, (q, s) in quant.items():
                t[f'int{bits}'] = do_bench(lambda: tk.quantized_linear(x, q, s, None, bits), return_mode='all')
            med = {key: statistics.median(v) * 1e3 for key, v in t.items()}   # us
            gbs = {bits: (quant[bits][0].numel() + m * k * 2) / (med[f'int{bits}'] * 1e-6) / 1e9 for bits in (8, 4)}
            rows.append({'shape': name, 'M': m, **{f'{key}_us': spread([v * 1e3 for v in vals]) for key, vals in t.items()}})
            print(f'{name:9s} {m:5d} {med["bf16"]:15.1f} {med["int8"]:9.1f} {med["int4"]:9.1f}  '
                  f'{med["bf16"] / med["int8"]:6.2f} {med["bf16"] / med["int4"]:6.2f}  {gbs[8]:9.0f} {gbs[4]:9.0f}',
                  flush=True)
    out['kernels'] = rows
    if sweep:
        out['sweep'] = sweep_configs(dev)


def sweep_configs(dev):
    """Launch shapes around the defaults, per layer shape and bits: GEMV at M = 1, tiles at M = 16 and
    64; then where tiles stop beating dequantise + cuBLAS (TILE_ROWS)."""
    from triton.testing import do_bench
    from modelscope_chatglm.quantization import formats, triton_kernels as tk
    gemv = [{'BLOCK_N': bn, 'BLOCK_K': bk, 'num_warps': nw} for bn in (4, 8, 16) for bk in (256, 512, 1024)
            for nw in (1, 2, 4)]
    gemm = [{'BLOCK_N': bn, 'BLOCK_K': bk, 'GROUP_M': 8, 'num_warps': nw, 'num_stages': st}
            for bn in (32, 64, 128) for bk in (64, 128, 256) for nw, st in ((4, 3), (4, 4), (8, 3))]
    best = []

    def bench(fn):
        try:
            return do_bench(fn, warmup=5, rep=20)
        except Exception:   # a shape that does not fit (shared memory, registers): counts as never
            return float('inf')

    for name, (n, k) in LAYER_SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
        for bits in (8, 4):
            q, s = formats.quantize(w, bits)
            for m, configs, key in ((1, gemv, 'gemv_config'), (16, gemm, 'gemm_config'), (64, gemm, 'gemm_config')):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                results = sorted(((bench(lambda: tk.quantized_linear(x, q, s, None, bits, **{key: c})), c)
                                  for c in configs), key=lambda r: r[0])
                default = bench(lambda: tk.quantized_linear(x, q, s, None, bits))
                print(f'sweep {name:8s} int{bits} M={m:5d}: default {default * 1e3:8.1f} us, best '
                      f'{results[0][0] * 1e3:8.1f} us {results[0][1]}', flush=True)
                best.append({'shape': name, 'bits': bits, 'M': m, 'default_us': default * 1e3,
                             'best_us': results[0][0] * 1e3, 'best': results[0][1]})
            line = []
            for m in (16, 32, 64, 128, 256, 512):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                tiles = bench(lambda: tk.quantized_linear(x, q, s, None, bits, tile_rows=10 ** 9))
                dq = bench(lambda: tk.quantized_linear(x, q, s, None, bits, tile_rows=0))
                line.append(f'M={m}: {tiles * 1e3:.0f}/{dq * 1e3:.0f}')
            print(f'tiles/dequant+cuBLAS us {name:8s} int{bits}: ' + '  '.join(line), flush=True)
    return best


# -- end to end ------------------------------------------------------------------------------------
def build_checkpoint(path: str):
    """ChatGLM2-6B shapes, random fp16 weights drawn on the GPU, safetensors shards."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fullsize import build     # benchmarks/fullsize.py
    build(path, fmt='safetensors', device='cuda')


def variant_dir(path: str, name: str, **config):
    """The same weights under another config.json (symlinked shards)."""
    out = path.rstrip('/') + '-' + name
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(path):
        if f != 'config.json' and not os.path.exists(os.path.join(out, f)):
            os.symlink(os.path.join(path, f), os.path.join(out, f))
    cfg = json.load(open(os.path.join(path, 'config.json')))
    cfg.update(config)
    json.dump(cfg, open(os.path.join(out, 'config.json'), 'w'), indent=2)
    return out


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, result


def decode_rate(chat, batch: int, new_tokens: int, repeats: int, prompt_len: int = 32, graphs: bool = True):
    """Decode tokens/s per sequence through an engine of its own (as chat() and the server run it):
    greedy, stop ids off, after the first token (prefill excluded)."""
    g = torch.Generator().manual_seed(batch)
    vocab = chat.tokenizer.vocab_size
    prompts = [torch.randint(5, vocab, (prompt_len - 3 * i % 7,), generator=g).tolist() for i in range(batch)]
    params = chat.sampling(max_new_tokens=new_tokens + 1, do_sample=False, stop_ids=[])
    rates = []
    chat.model.cuda_graphs = graphs
    engine = chat.new_engine(max_batch=16, kv_cache_bytes=4 << 30)
    chat.model.cuda_graphs = True
    for _ in range(repeats + 1):        # the first run captures the graphs and is not counted
        stamps = []
        seqs = [engine.submit(p, params) for p in prompts]
        while not all(s.finished for s in seqs):
            engine.step()
            if all(s.output for s in seqs):   # every prompt has run: from here on, decode steps
                stamps.append(time.perf_counter())
        rates.append(new_tokens / (stamps[-1] - stamps[0]))
    del engine
    torch.cuda.empty_cache()
    return spread(rates[1:])


def prefill_rate(chat, tokens: int, repeats: int):
    """Prompt tokens/s through the engine, the whole prompt in one forward (a new prompt each time: no
    prefix-cache hits)."""
    engine = chat.new_engine(prefill_chunk=tokens, kv_cache_bytes=4 << 30)
    params = chat.sampling(max_new_tokens=1, do_sample=False)
    times = []
    for i in range(repeats + 1):
        g = torch.Generator().manual_seed(tokens + i)
        prompt = torch.randint(5, chat.tokenizer.vocab_size, (tokens,), generator=g).tolist()
        seq = engine.submit(prompt, params)
        elapsed, _ = timed(lambda: engine.run_until_done([seq]))
        times.append(elapsed)
    return spread([tokens / t for t in times[1:]])


def bench_e2e(path: str, modes, repeats: int, new_tokens: int, out: dict):
    import modelscope_chatglm
    t = time.perf_counter()
    build_checkpoint(path)
    print(f'checkpoint {path}: {time.perf_counter() - t:.0f}s to build or find', flush=True)
    results = out.setdefault('e2e', {})
    for mode in modes:
        dtype, bits = {'bf16': ('bfloat16', 0), 'fp16': ('float16', 0), 'int8': ('float16', 8),
                       'int4': ('float16', 4), 'int8-bf16': ('bfloat16', 8), 'int4-bf16': ('bfloat16', 4)}[mode]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        load_s, chat = timed(lambda: modelscope_chatglm.load(path, device='cuda', dtype=dtype, quantization_bit=bits))
        r = {'load_s': load_s, 'weights_gb': torch.cuda.memory_allocated() / 1e9}
        r['decode_b1'] = decode_rate(chat, 1, new_tokens, repeats)
        r['decode_b1_eager'] = decode_rate(chat, 1, min(new_tokens, 32), max(2, repeats // 2), graphs=False)
        r['decode_b16'] = decode_rate(chat, 16, new_tokens, repeats)
        r['prefill_1k'] = prefill_rate(chat, 1024, repeats)
        r['prefill_8k'] = prefill_rate(chat, 8192, repeats)
        r['peak_gb'] = torch.cuda.max_memory_allocated() / 1e9
        results[mode] = r
        print(f'{mode:9s} load {load_s:5.1f}s  weights {r["weights_gb"]:5.2f} GB  decode b1 '
              f'{r["decode_b1"]["median"]:6.1f} tok/s [{r["decode_b1"]["min"]:.1f}-{r["decode_b1"]["max"]:.1f}] '
              f'(eager {r["decode_b1_eager"]["median"]:5.1f})  b16 {r["decode_b16"]["median"]:6.1f}/seq '
              f'({16 * r["decode_b16"]["median"]:6.0f} total)  prefill 1K {r["prefill_1k"]["median"]:7.0f} '
              f'8K {r["prefill_8k"]["median"]:7.0f} tok/s  peak {r["peak_gb"]:5.2f} GB', flush=True)
        del chat
    if 'bf16' in results:
        base = results['bf16']['decode_b1']['median']
        for mode in results:
            print(f'decode b1 {mode} / bf16: {results[mode]["decode_b1"]["median"] / base:.2f}x')


def bench_long(path: str, tokens: int, out: dict):
    """ChatGLM2-6B-32K int4: prefill `tokens`, decode 16, peak memory."""
    import modelscope_chatglm
    long_dir = variant_dir(path, '32k', rope_ratio=16, seq_length=32768)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    chat = modelscope_chatglm.load(long_dir, device='cuda', dtype='float16', quantization_bit=4)
    weights = torch.cuda.memory_allocated() / 1e9
    prompt = torch.randint(5, chat.tokenizer.vocab_size, (tokens - 64,), generator=torch.Generator().manual_seed(1))
    stamps, start = [], time.perf_counter()
    for _ in chat.stream_tokens(prompt.tolist(), max_new_tokens=64, do_sample=False, stop_ids=[]):
        stamps.append(time.perf_counter())
    # stamps[1] follows the first decode step, which captures the graph for the 32K table width
    r = {'context': tokens, 'weights_gb': weights, 'prefill_s': stamps[0] - start, 'capture_s': stamps[1] - stamps[0],
         'decode_tok_s': (len(stamps) - 2) / (stamps[-1] - stamps[1]),
         'peak_allocated_gb': torch.cuda.max_memory_allocated() / 1e9,
         'peak_reserved_gb': torch.cuda.max_memory_reserved() / 1e9}
    out['long'] = r
    print(f'ChatGLM2-6B-32K int4 at {tokens} tokens: weights {weights:.2f} GB, prefill {r["prefill_s"]:.2f}s, '
          f'graph capture {r["capture_s"]:.2f}s, decode {r["decode_tok_s"]:.1f} tok/s, peak allocated {r["peak_allocated_gb"]:.2f} GB, '
          f'reserved {r["peak_reserved_gb"]:.2f} GB', flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('what', nargs='+', choices=['kernels', 'e2e', 'long'])
    ap.add_argument('--sweep', action='store_true')
    ap.add_argument('--dir', default='/tmp/chatglm2-6b-random')
    ap.add_argument('--modes', default='bf16,fp16,int8,int4')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--new-tokens', type=int, default=128)
    ap.add_argument('--long-tokens', type=int, default=32768)
    ap.add_argument('--json', default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit('bench_gpu.py needs a CUDA GPU')
    out = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__}
    print(f'{out["device"]}, torch {torch.__version__}', flush=True)
    try:
        if 'kernels' in args.what:
            bench_kernels(args.sweep, out)
        if 'e2e' in args.what:
            bench_e2e(args.dir, args.modes.split(','), args.repeats, args.new_tokens, out)
        if 'long' in args.what:
            build_checkpoint(args.dir)
            bench_long(args.dir, args.long_tokens, out)
    finally:
        if args.json:
            json.dump(out, open(args.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
