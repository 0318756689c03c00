"""Ours against llama.cpp on the same ChatGLM2-6B shapes, same threads, prompt and decode length, one run.

What it sets up (each once, then reused):
  - our checkpoint: full-size ChatGLM2-6B shapes, random fp16 weights, hub layout (`fullsize.py`),
    quantized while loading, as a user loads it (default settings unless `--ours` says otherwise);
  - llama.cpp's `llama-bench`, built natively (`GGML_NATIVE=ON`) from the llama.cpp that the
    llama-cpp-python sdist on the package index vendors;
  - the same checkpoint as GGUFs in llama.cpp's `chatglm` architecture (q4_0 and q8_0), written by the
    package's exporter (`modelscope_chatglm.export.export_gguf`, extra [export]: every matrix quantized
    as llama.cpp's converter does, norms and biases f32); loading the checkpoint for it takes 12.5 GB.
Then, in rounds, each engine in a fresh process taking turns: prefill of a `--prompt`-token prompt
(tokens/s; llama-bench's pp) and `--new` greedy decode tokens after it (tokens/s; llama-bench's tg).
Random token ids for both; our prompts differ per round, so the prefix cache never serves them.
Each round also measures the machine's memory read bandwidth (bench_cpu_peak.memory_read_gbs, the same
threads), and each engine's decode is also given as the GB/s of weights it streams: the bytes a decode
step reads (every weight but the token embedding, of which it reads one row) times tokens/s. A decode
step at memory speed is bound by those bytes, whichever engine runs it.

    pip install ".[export]" cmake   # (cmake: where the system has none)
    python benchmarks/bench_vs_llamacpp.py [--layers 28] [--threads 2] [--prompt 128] [--new 32] [--rounds 3]
        [--ours int4,int8] [--llama q4_0,q8_0] [--isa native|avx2] [--json benchmarks/results/bench_vs_llamacpp-CPU.json]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
from bench_cpu_peak import memory_read_gbs  # noqa: E402
from fullsize import build  # noqa: E402

LLAMA_CPP_PYTHON = '0.3.36'
CACHE = os.path.expanduser('~/.cache/modelscope_chatglm/bench')


# -- llama.cpp ------------------------------------------------------------------------------------------

# What each engine is built for. 'avx2' stands in for an AVX2-only CPU on a newer one: llama.cpp without
# its AVX-512 paths, our kernels for x86-64-v3 (AVX2, FMA, F16C) in an fp32 model (the default where the
# CPU has no bf16 units). The memory and clocks stay this machine's.
LLAMA_FLAGS = {'native': ['-DGGML_NATIVE=ON'],
               'avx2': ['-DGGML_NATIVE=OFF', '-DGGML_AVX=ON', '-DGGML_AVX2=ON', '-DGGML_FMA=ON', '-DGGML_F16C=ON',
                        '-DGGML_BMI2=ON', '-DGGML_AVX512=OFF', '-DGGML_AVX512_VBMI=OFF', '-DGGML_AVX512_VNNI=OFF',
                        '-DGGML_AVX512_BF16=OFF', '-DGGML_AVX_VNNI=OFF', '-DGGML_AMX_TILE=OFF',
                        '-DGGML_AMX_INT8=OFF', '-DGGML_AMX_BF16=OFF']}
OUR_MARCH = {'native': None, 'avx2': 'x86-64-v3'}


def llama_bench_binary(cache: str, isa: str = 'native') -> str:
    """llama-bench built from the llama-cpp-python sdist's vendored llama.cpp, for `isa` (LLAMA_FLAGS)."""
    root = os.path.join(cache, f'llama-cpp-python-{LLAMA_CPP_PYTHON}')
    build_dir = os.path.join(root, 'build' if isa == 'native' else f'build-{isa}')
    binary = os.path.join(build_dir, 'bin', 'llama-bench')
    if os.path.exists(binary):
        return binary
    src = os.path.join(cache, f'llama_cpp_python-{LLAMA_CPP_PYTHON}', 'vendor', 'llama.cpp')
    if not os.path.isdir(src):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
                        f'llama-cpp-python=={LLAMA_CPP_PYTHON}', '-d', cache], check=True)
        with tarfile.open(glob.glob(os.path.join(cache, f'llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz'))[0]) as tar:
            tar.extractall(cache, filter='data')
    subprocess.run(['cmake', '-S', src, '-B', build_dir, '-DCMAKE_BUILD_TYPE=Release', *LLAMA_FLAGS[isa],
                    '-DLLAMA_CURL=OFF', '-DLLAMA_OPENSSL=OFF', '-DLLAMA_BUILD_TESTS=OFF',
                    '-DLLAMA_BUILD_EXAMPLES=OFF', '-DLLAMA_BUILD_SERVER=OFF', '-DLLAMA_BUILD_TOOLS=ON'],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(['cmake', '--build', build_dir, '--target', 'llama-bench', f'-j{os.cpu_count()}'],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


def gguf_of(checkpoint: str, path: str, qtype: str) -> str:
    """The checkpoint we benchmark, exported once as a `qtype` GGUF (export_gguf writes it whole or not at all)."""
    if not os.path.exists(path):
        from modelscope_chatglm.export import export_gguf
        export_gguf(checkpoint, path, gguf_type=qtype)
    return path


def run_llama(binary: str, model: str, threads: int, prompt: int, new: int) -> dict:
    out = subprocess.run([binary, '-m', model, '-t', str(threads), '-p', str(prompt), '-n', str(new),
                          '-r', '1', '-o', 'json'], check=True, capture_output=True, text=True,
                         env=openmp_environment()).stdout
    rows = json.loads(out)
    rate = {('prefill' if r['n_prompt'] else 'decode'): r['avg_ts'] for r in rows}
    return {'prefill_tok_s': rate['prefill'], 'decode_tok_s': rate['decode'], 'decode_bytes': gguf_decode_bytes(model)}


def openmp_environment() -> dict:
    """The environment both engines run in: libgomp's setting as the modelscope-chatglm command starts
    with it (llama.cpp's threads are libgomp's too). Ours must have it before the child imports torch,
    which this module does (through fullsize.py) before child() runs."""
    from modelscope_chatglm import openmp
    return dict(os.environ, **openmp.environment())


def gguf_decode_bytes(path: str) -> int:
    """Bytes of a GGUF's tensors that a decode step reads: all but the token embedding."""
    from gguf import GGUFReader
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != 'token_embd.weight')


# -- ours -----------------------------------------------------------------------------------------------

def child(path: str, bits: int, threads: int, prompt: int, new: int, seed: int, extra: dict,
          march: str = None) -> dict:
    from cpu_model import load
    chat = load(path, bits, threads, march, **extra)   # (march: the kernels for another instruction set)
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(100, 60000, (n,), generator=g).tolist()  # noqa: E731
    for _ in chat.stream_tokens(ids(16), max_new_tokens=2, do_sample=False, stop_ids=[]):
        pass                                    # warm-up, as llama-bench does
    times, start = [], time.perf_counter()
    for _ in chat.stream_tokens(ids(prompt), max_new_tokens=new + 1, do_sample=False, stop_ids=[]):
        times.append(time.perf_counter() - start)
    from modelscope_chatglm.quantization.build import load_library
    decode_bytes = sum(p.numel() * p.element_size() for name, p in chat.model.named_parameters()
                       if 'word_embeddings' not in name)
    return {'prefill_tok_s': prompt / times[0], 'decode_tok_s': new / (times[-1] - times[0]),
            'decode_bytes': decode_bytes,
            'model': repr(chat), 'kernels': load_library().isa}   # dtype, blocks and activations as loaded


def run_ours(path: str, mode: str, threads: int, prompt: int, new: int, seed: int, march: str = None) -> dict:
    bits, _, option = mode.removeprefix('int').partition('-')
    extra = {'exact': {'int8_activations': False}, 'x8': {'int8_activations': True}, '': {}}[option]
    code = (f'import json, sys; sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r}); '
            f'from bench_vs_llamacpp import child; '
            f'print(json.dumps(child({path!r}, {int(bits)}, {threads}, {prompt}, {new}, {seed}, {extra!r}, {march!r})))')
    # torch's own ops (the few small ones a step has besides ours) on AVX2 too, where the kernels are
    env = dict(os.environ, **({'ATEN_CPU_CAPABILITY': 'avx2'} if march else {}))
    env.update(openmp_environment())
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', default='/var/tmp/chatglm2-6b-random', help='our checkpoint (built if missing)')
    ap.add_argument('--gguf-dir', default='/var/tmp/chatglm2-6b-gguf')
    ap.add_argument('--layers', type=int, default=28)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--prompt', type=int, default=128)
    ap.add_argument('--new', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--ours', default='int4,int8',
                    help='comma list of int4|int8, each optionally -exact or -x8 (default: our defaults)')
    ap.add_argument('--llama', default='q4_0,q8_0')
    ap.add_argument('--isa', choices=list(LLAMA_FLAGS), default='native',
                    help='avx2: both engines built without AVX-512, as on an AVX2-only CPU (see LLAMA_FLAGS)')
    ap.add_argument('--json', help='write every round here')
    args = ap.parse_args()

    build(args.dir, layers=args.layers)
    binary = llama_bench_binary(CACHE, args.isa)
    os.makedirs(args.gguf_dir, exist_ok=True)
    ggufs = {q: gguf_of(args.dir, os.path.join(args.gguf_dir, f'chatglm2-{args.layers}l-{q}-export.gguf'), q)
             for q in args.llama.split(',') if q}
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')), '?')
    flags = next((line.split(':', 1)[1].split() for line in open('/proc/cpuinfo') if line.startswith('flags')), [])
    isa = [f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_int8', 'asimddp') if f in flags]
    print(f'CPU: {cpu} ({", ".join(isa)}); engines built for: {args.isa}; {args.threads} threads; {args.layers} layers; '
          f'prompt {args.prompt}, decode {args.new}', flush=True)

    runs = {**{f'ours {m}': m for m in args.ours.split(',') if m}, **{f'llama.cpp {q}': q for q in ggufs}}
    results = {name: [] for name in runs}
    memory = []   # the memory read bandwidth, each round (median of its passes)
    for r in range(args.rounds):
        memory.append(statistics.median(memory_read_gbs(args.threads)))
        print(f'round {r + 1}: memory read {memory[-1]:.1f} GB/s', flush=True)
        for name, what in runs.items():
            if name.startswith('ours'):
                res = run_ours(args.dir, what, args.threads, args.prompt, args.new, seed=r, march=OUR_MARCH[args.isa])
            else:
                res = run_llama(binary, ggufs[what], args.threads, args.prompt, args.new)
            results[name].append(res)
            print(f'round {r + 1}: {name:<20} prefill {res["prefill_tok_s"]:7.2f} tok/s   '
                  f'decode {res["decode_tok_s"]:6.2f} tok/s ({gbs(res):.1f} GB/s of weights)', flush=True)

    def summary(values):
        return f'{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]'
    print(f'\nmemory read ({args.threads} threads), per round: {summary(memory)} GB/s')
    print(f'| engine | prefill {args.prompt} tok/s | decode tok/s | GB a decode step reads | decode GB/s |\n'
          f'|---|---|---|---|---|')
    for name, rows in results.items():
        print(f'| {name} | {summary([x["prefill_tok_s"] for x in rows])} | '
              f'{summary([x["decode_tok_s"] for x in rows])} | {rows[0]["decode_bytes"] / 1e9:.2f} | '
              f'{summary([gbs(x) for x in rows])} |')
    med = {name: {k: statistics.median(x[k] for x in rows) for k in ('prefill_tok_s', 'decode_tok_s')}
           for name, rows in results.items()}
    for ours, theirs in (('ours int4', 'llama.cpp q4_0'), ('ours int8', 'llama.cpp q8_0')):
        if ours in med and theirs in med:
            print(f'{ours} / {theirs}: decode {med[ours]["decode_tok_s"] / med[theirs]["decode_tok_s"]:.2f}x, '
                  f'prefill {med[ours]["prefill_tok_s"] / med[theirs]["prefill_tok_s"]:.2f}x')
    if args.json:
        json.dump({'cpu': cpu, 'isa': isa, 'args': vars(args), 'memory_read_gbs': memory, 'results': results},
                  open(args.json, 'w'), indent=1)


def gbs(result: dict) -> float:
    """GB/s of weights a decode streams: the bytes of a step times steps a second."""
    return result['decode_bytes'] * result['decode_tok_s'] / 1e9


if __name__ == '__main__':
    main()
