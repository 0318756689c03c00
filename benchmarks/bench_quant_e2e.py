"""End-to-end int8/int4 decode on a full-size ChatGLM2-6B-shaped checkpoint, quantized while loading.

Builds (once, ~12.5 GB on disk) a checkpoint with the real ChatGLM2-6B shapes (28 layers, hidden 4096,
ffn 13696, vocab 65024) and random fp16 weights in the hub layout (7 `.bin` shards + index), then, each
in a fresh process: load with `quantization_bit=8|4` (quantize on load), and report
  - load time, peak RSS during the load, RSS once loaded,
  - prefill time for the prompt, decode tokens/s (greedy, stop ids off),
  - the THUDM-style CPU path (dequantize each whole W to fp32 on every call, then matmul) on the same
    int8 model, for the baseline ratio (a couple of tokens: it is slow).
A mode is BITS:DTYPE; `int4-x8:float32` loads with int8_activations=True (integer dot products).
Each decode also reports the time per step spent in the quantized linears, next to what the same 112
calls cost in isolation (one after another, same process, M = 1): the rest of a step must not slow
them down. `--busy N` runs N CPU-bound processes beside the benchmark (a shared machine).

    python benchmarks/bench_quant_e2e.py --dir /var/tmp/chatglm2-6b-random [--modes int4:float32,int4-x8:float32]
        [--repeats 3] [--busy 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fullsize import build  # noqa: E402  (benchmarks/fullsize.py)
from memory import peak_rss, rss  # noqa: E402  (benchmarks/memory.py)

def child(path, bits, dtype, new_tokens, baseline, int8_activations=False):
    import torch
    import modelscope_chatglm
    from modelscope_chatglm.quantization import QuantizedLinear, dequantize
    peak_rss(reset=True)
    t = time.perf_counter()
    chat = modelscope_chatglm.load(path, device='cpu', dtype=dtype, quantization_bit=bits,
                                   int8_activations=int8_activations)
    load_s = time.perf_counter() - t
    peak = peak_rss() / 1e9
    loaded = rss() / 1e9
    if baseline:
        def dequantize_all(self, x):   # what the reference's CPU path does on every call
            w = dequantize(self.weight, self.weight_scale, self.bits)
            y = torch.nn.functional.linear(x.float(), w, None if self.bias is None else self.bias.float())
            return y.to(x.dtype)
        QuantizedLinear.forward = dequantize_all
    linears = [m for m in chat.model.modules() if isinstance(m, QuantizedLinear)]
    in_linears = [0.0]
    if not baseline:
        forward = QuantizedLinear.forward

        def timed_forward(self, x):
            t = time.perf_counter()
            y = forward(self, x)
            in_linears[0] += time.perf_counter() - t
            return y
        QuantizedLinear.forward = timed_forward
    prompt = chat.build_inputs('你好，请介绍一下你自己。' * 2)
    times, start = [], time.perf_counter()
    for _ in chat.stream_tokens(prompt, max_new_tokens=new_tokens + 1, do_sample=False, stop_ids=[]):
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            in_linears[0] = 0.0      # count decode steps only
    result = {'load_s': load_s, 'peak_rss_gb': peak, 'rss_gb': loaded, 'prompt': len(prompt),
              'prefill_s': times[0], 'decode_tok_s': new_tokens / (times[-1] - times[0])}
    if not baseline:
        result['linears_ms_per_step'] = in_linears[0] / new_tokens * 1e3
        dtype_ = next(chat.model.parameters()).dtype
        xs = [torch.randn(1, layer.in_features, dtype=dtype_) for layer in linears]
        passes = []
        with torch.inference_mode():
            for _ in range(5):
                t = time.perf_counter()
                for layer, x in zip(linears, xs):
                    forward(layer, x)
                passes.append(time.perf_counter() - t)
        result['linears_isolated_ms'] = statistics.median(passes) * 1e3
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dir', default=os.path.join('/var/tmp', 'chatglm2-6b-random'))
    ap.add_argument('--modes', default='int8:float32,int4:float32,int8-x8:float32,int4-x8:float32,int8:bfloat16,'
                                       'int4:bfloat16,baseline-int8:float32')
    ap.add_argument('--new', type=int, default=16)
    ap.add_argument('--repeats', type=int, default=1, help='fresh processes per mode, taken in turns')
    ap.add_argument('--busy', type=int, default=0, help='CPU-bound processes to run beside the benchmark')
    ap.add_argument('--child', default=None)
    args = ap.parse_args()
    if args.child:
        kind, dtype = args.child.split(':')
        baseline, x8 = kind.startswith('baseline'), kind.endswith('-x8')
        bits = int(kind.removesuffix('-x8').rsplit('int', 1)[1])
        print(json.dumps(child(args.dir, bits, dtype, 2 if baseline else args.new, baseline, x8)))
        return
    t = time.perf_counter()
    build(args.dir)
    print(f'checkpoint: {args.dir} (ChatGLM2-6B shapes, 28 layers, random fp16 weights, '
          f'{time.perf_counter() - t:.0f}s to build or find)\n')
    if args.busy:
        print(f'with {args.busy} CPU-bound process(es) running beside it\n')
    print(f'{"mode":24s} {"load s":>7s} {"peak RSS GB":>12s} {"RSS GB":>7s} {"prefill s":>10s} {"decode tok/s":>13s} '
          f'{"linears ms/step":>16s} {"isolated":>9s}')
    runs = {mode: [] for mode in args.modes.split(',')}
    for _ in range(args.repeats):      # modes in turns, so a noisy minute does not hit one mode only
        for mode in runs:
            cmd = [sys.executable, os.path.abspath(__file__), '--dir', args.dir, '--child', mode, '--new', str(args.new)]
            busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(args.busy)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
            if proc.returncode != 0:
                print(f'{mode}: failed\n{proc.stderr[-3000:]}')
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            linears = (f'{r["linears_ms_per_step"]:16.1f} {r["linears_isolated_ms"]:9.1f}'
                       if 'linears_ms_per_step' in r else '')
            print(f'{mode:24s} {r["load_s"]:7.1f} {r["peak_rss_gb"]:12.2f} {r["rss_gb"]:7.2f} {r["prefill_s"]:10.2f} '
                  f'{r["decode_tok_s"]:13.3f} {linears}   (prompt {r["prompt"]} tokens)', flush=True)
    results = {}
    if args.repeats > 1:
        print(f'\nmedian [min-max] of {args.repeats} runs:')
    for mode, rs in runs.items():
        if not rs:
            continue
        speeds = sorted(r['decode_tok_s'] for r in rs)
        results[mode] = dict(rs[0], decode_tok_s=statistics.median(speeds))
        if args.repeats > 1:
            print(f'{mode:24s} decode {statistics.median(speeds):.3f} [{speeds[0]:.3f}-{speeds[-1]:.3f}] tok/s, '
                  f'prefill {statistics.median(r["prefill_s"] for r in rs):.2f} s, '
                  f'load {statistics.median(r["load_s"] for r in rs):.1f} s')
    if 'baseline-int8:float32' in results and 'int8:float32' in results:
        ratio = results['int8:float32']['decode_tok_s'] / results['baseline-int8:float32']['decode_tok_s']
        print(f'\nint8 decode, our kernels vs the THUDM dequantize-whole-W path: {ratio:.1f}x')


if __name__ == '__main__':
    main()
