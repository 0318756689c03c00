"""Per-layer int8/int4 linear speed on the ChatGLM2-6B shapes, against torch fp32 and the THUDM CPU path.

Decode (M = 1): GB/s of weight bytes streamed per call (int8: 1 byte/weight, int4: 0.5, fp32: 4), and
the time ratio to torch fp32 `F.linear` measured in the same run. Each method cycles through enough
copies of the weights (>= 512 MB) that they come from DRAM, not from the CPU caches.
Rows (M = 1 ... 64, batched decode and short prompts): the time of one block's four linears through the
exact C kernel on fp32 x and on bf16 x (a bf16 model: `vdpbf16ps` on AVX512-BF16 builds), and through the
int8-activation kernel (`int8_activations`), median [min-max], each one's ratio to its own M = 1, and
the tiled path (dequantized tiles + matmul, fp32) at the same M, all in one run.
Prefill (M = 256, 1024): GFLOP/s (2*M*N*K per call) of the tiled path (bf16 tiles + oneDNN/AMX for a
bf16 model, fp32 tiles + MKL for an fp32 one) and of the int8-activation kernels against fp32 and bf16
dense `F.linear`.
Shared machine (M = 1): per-call times on an idle machine, then with one other CPU-bound process (a
busy loop in a process of its own), median and p10/p90, and each median's ratio to the idle best.

    python benchmarks/bench_quant_gemv.py [--threads 2] [--only decode|rows|prefill|shared]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modelscope_chatglm.quantization import QuantizedLinear, dequantize  # noqa: E402
from modelscope_chatglm.quantization.build import load_library  # noqa: E402

SHAPES = {'qkv 4608x4096': (4608, 4096), 'dense 4096x4096': (4096, 4096),
          'h_to_4h 27392x4096': (27392, 4096), '4h_to_h 4096x13696': (4096, 13696)}
POOL_BYTES = 512 << 20


def timed(fn, copies, min_seconds=1.0, min_calls=5, spread=False):
    """Median and best seconds per call (and the worst, with spread=True), rotating over `copies` (each
    a tuple of args)."""
    times, i, start = [], 0, time.perf_counter()
    fn(*copies[0])
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn(*copies[i % len(copies)])
        times.append(time.perf_counter() - t)
        i += 1
    if spread:
        return statistics.median(times), min(times), max(times)
    return statistics.median(times), min(times)


def quantized_layers(n, k, bits, count, dtype=torch.float32, int8_activations=False):
    layers = []
    for _ in range(count):
        layer = QuantizedLinear(k, n, bits, bias=False, dtype=dtype, scale_dtype=torch.float32)
        layer.int8_activations = int8_activations
        with torch.no_grad():
            layer.weight.copy_(torch.randint(-127 if bits == 8 else -128, 128, layer.weight.shape, dtype=torch.int8))
            layer.weight_scale.copy_(torch.rand(n) * 0.01)
        layers.append(layer)
    return layers


def thudm_linear(x, layer):
    """The reference CPU path: dequantize the whole W to fp32 on every call, then matmul."""
    return F.linear(x, dequantize(layer.weight, layer.weight_scale, layer.bits))


def decode_table(threads):
    print(f'\nDecode, M = 1, {threads} threads: median ms per call (GB/s of weights at the median; best GB/s)')
    print(f'{"shape":20s} {"method":28s} {"ms":>8s} {"GB/s":>7s} {"best":>7s} {"vs fp32":>8s}')
    x = torch.randn(1, 4096)
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k)
        fp32_bytes = n * k * 4
        dense = [(torch.randn(n, k),) for _ in range(max(2, POOL_BYTES // fp32_bytes))]
        rows = []
        med, best = timed(lambda w: F.linear(x, w), dense)
        rows.append(('torch fp32 F.linear', fp32_bytes, med, best))
        fp32_ms = med
        del dense
        for bits in (8, 4):
            nbytes = n * k * bits // 8
            layers = [(layer,) for layer in quantized_layers(n, k, bits, max(2, POOL_BYTES // nbytes))]
            med, best = timed(lambda layer: layer(x), layers)
            rows.append((f'int{bits} C GEMV ({load_library().kernel_isa().decode()})', nbytes, med, best))
            for layer, in layers:
                layer.int8_activations = True
            med, best = timed(lambda layer: layer(x), layers)
            rows.append((f'int{bits} int8-activation GEMV', nbytes, med, best))
            if bits == 8:
                med, best = timed(lambda layer: thudm_linear(x, layer), layers[:4], min_seconds=0.5, min_calls=3)
                rows.append(('int8 THUDM dequantize-all', nbytes, med, best))
            del layers
        for method, nbytes, med, best in rows:
            print(f'{name:20s} {method:28s} {med * 1e3:8.2f} {nbytes / med / 1e9:7.1f} {nbytes / best / 1e9:7.1f} '
                  f'{fp32_ms / med:7.2f}x')


def rows_table(threads, repeats=9):
    """One block's four linears (the ChatGLM2-6B shapes) at M rows, each layer in its own copies."""
    from modelscope_chatglm.quantization import linear
    print(f'\nRows, {threads} threads: ms for one block\'s 4 linears, median [min-max] of {repeats}; '
          'x M=1: ratio to one row on the same kernel; tiled: dequantized tiles + matmul at the same M')
    print(f'{"bits":>4s} {"M":>3s} {"exact, fp32 x ms":>22s} {"x M=1":>6s} {"exact, bf16 x ms":>22s} {"x M=1":>6s} '
          f'{"int8-act. kernel ms":>22s} {"x M=1":>6s} {"tiled ms":>9s}')
    for bits in (8, 4):
        nbytes = sum(n * k * bits // 8 for n, k in SHAPES.values())
        blocks = [[quantized_layers(n, k, bits, 1)[0] for n, k in SHAPES.values()]
                  for _ in range(max(2, POOL_BYTES // nbytes))]
        base = {}
        for m in (1, 2, 4, 8, 16, 32, 64):
            inputs = {torch.float32: {k: torch.randn(m, k) for _, k in SHAPES.values()}}
            inputs[torch.bfloat16] = {k: x.bfloat16() for k, x in inputs[torch.float32].items()}
            xs = inputs[torch.float32]

            def block(layers):
                for layer in layers:
                    layer(xs[layer.in_features])
            cells = []
            for mode in ('fp32', 'bf16', 'int8-act'):
                xs = inputs[torch.bfloat16 if mode == 'bf16' else torch.float32]
                for layers in blocks:
                    for layer in layers:
                        layer.int8_activations = mode == 'int8-act'
                med, best, worst = timed(block, [(b,) for b in blocks], min_seconds=0, min_calls=repeats, spread=True)
                base.setdefault(mode, med)
                cells.append(f'{med * 1e3:8.1f} [{best * 1e3:5.1f}-{worst * 1e3:5.1f}] {med / base[mode]:6.2f}')
            xs = inputs[torch.float32]
            for layers in blocks:
                for layer in layers:
                    layer.int8_activations = False
            saved, linear.DECODE_ROWS = linear.DECODE_ROWS, 0      # force the tiled path
            tiled = timed(block, [(b,) for b in blocks[:2]], min_seconds=0, min_calls=3)[0]
            linear.DECODE_ROWS = saved
            print(f'{bits:4d} {m:3d} {" ".join(cells)} {tiled * 1e3:9.1f}')
        del blocks


def prefill_table(threads):
    print(f'\nPrefill, {threads} threads: GFLOP/s (median)')
    print(f'{"shape":20s} {"M":>5s} {"fp32 dense":>11s} {"bf16 dense":>11s} {"int8 fp32 tiles":>16s} '
          f'{"int8 bf16 tiles":>16s} {"int4 bf16 tiles":>16s} {"int8 int8-act.":>15s} {"int4 int8-act.":>15s}')
    for name, (n, k) in SHAPES.items():
        for m in (256, 1024):
            flops = 2 * m * n * k
            x32, x16 = torch.randn(m, k), torch.randn(m, k).bfloat16()
            w32 = [(torch.randn(n, k),)]
            w16 = [(w32[0][0].bfloat16(),)]
            cells = [timed(lambda w: F.linear(x32, w), w32, 0.5, 2)[0],
                     timed(lambda w: F.linear(x16, w), w16, 0.5, 2)[0]]
            del w32, w16
            q8 = [(layer,) for layer in quantized_layers(n, k, 8, 1, torch.float32)]
            cells.append(timed(lambda layer: layer(x32), q8, 0.5, 2)[0])
            q8 = [(layer,) for layer in quantized_layers(n, k, 8, 1, torch.bfloat16)]
            cells.append(timed(lambda layer: layer(x16), q8, 0.5, 2)[0])
            q4 = [(layer,) for layer in quantized_layers(n, k, 4, 1, torch.bfloat16)]
            cells.append(timed(lambda layer: layer(x16), q4, 0.5, 2)[0])
            for bits in (8, 4):
                x8 = [(layer,) for layer in quantized_layers(n, k, bits, 1, torch.float32, int8_activations=True)]
                cells.append(timed(lambda layer: layer(x32), x8, 0.5, 2)[0])
            print(f'{name:20s} {m:5d} ' + ' '.join(f'{flops / t / 1e9:{w}.0f}' for t, w in
                                                   zip(cells, (11, 11, 16, 16, 16, 15, 15))))


def percentile(sorted_times, p):
    return sorted_times[round(p * (len(sorted_times) - 1))]


def shared_table(threads, seconds=3.0):
    """Decode GEMV calls (M = 1, weights from DRAM) with and without one busy process beside them."""
    cases = [('h_to_4h 27392x4096', 4, True), ('dense 4096x4096', 4, True), ('h_to_4h 27392x4096', 4, False),
             ('h_to_4h 27392x4096', 8, False), ('dense 4096x4096', 8, False)]
    pools = {}
    for name, bits, x8 in cases:
        n, k = SHAPES[name]
        if (name, bits) not in pools:
            pools[name, bits] = quantized_layers(n, k, bits, max(2, POOL_BYTES // (n * k * bits // 8)))
    print(f'\nShared machine, M = 1, {threads} threads: ms per call, median [p10-p90] over {seconds:.0f} s; '
          'x best: the median over the idle best')
    print(f'{"shape":20s} {"kernel":22s} {"idle":>24s} {"x best":>7s} {"one busy process":>24s} {"x best":>7s}')
    results = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, '-c', 'while True: pass']) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for name, bits, x8 in cases:
                x = torch.randn(1, SHAPES[name][1])
                layers = pools[name, bits]
                for layer in layers:
                    layer.int8_activations = x8
                times, i, start = [], 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    t = time.perf_counter()
                    layers[i % len(layers)](x)
                    times.append(time.perf_counter() - t)
                    i += 1
                results[name, bits, x8, busy] = sorted(times)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    for name, bits, x8 in cases:
        best = results[name, bits, x8, False][0]
        cells = []
        for busy in (False, True):
            t = results[name, bits, x8, busy]
            cells.append(f'{percentile(t, .5) * 1e3:7.2f} [{percentile(t, .1) * 1e3:6.2f}-{percentile(t, .9) * 1e3:6.2f}] '
                         f'{percentile(t, .5) / best:7.2f}')
        print(f'{name:20s} {"int" + str(bits) + (" int8-activation" if x8 else " exact"):22s} {cells[0]} {cells[1]}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    ap.add_argument('--only', choices=['decode', 'rows', 'prefill', 'shared'])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = load_library()
    if lib is None:
        sys.exit('the C kernels could not be built here (see the warning above)')
    print(f'kernels: {lib.kernel_isa().decode()}, OpenMP: {bool(lib.kernel_openmp())}, torch {torch.__version__}')
    with torch.inference_mode():
        for name, table in (('decode', decode_table), ('rows', rows_table), ('prefill', prefill_table),
                            ('shared', shared_table)):
            if args.only in (None, name):
                table(args.threads)


if __name__ == '__main__':
    main()
