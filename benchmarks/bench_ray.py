"""Ray Serve: aggregate throughput with 1 and 2 replicas, and what routing through Ray costs per request.

Three servers on the same checkpoint, one after the other in one run, each a fresh
`modelscope-chatglm serve` process (the Ray ones start a private local Ray instance):
  direct      no Ray: the plain server (torch uses every core)
  ray x1      --ray --replicas 1 --cpus-per-replica <all cores>
  ray x2      --ray --replicas 2 --cpus-per-replica <half the cores each>
For each: --clients concurrent streaming clients, each with its own prompt of --prompt-tokens tokens
and --new-tokens greedy tokens: aggregate output tokens/s, TTFT p50/p99, p50 inter-token latency,
--repeats times (median [min-max] of the tokens/s). Then routing overhead: --latency-requests
sequential one-token requests with a short prompt; the median [p10-p90] latency through Ray minus the
direct server's is what the proxy, ingress and router add.

    python benchmarks/bench_ray.py                     # a 12-layer, 1024-wide ChatGLM2-shaped model
    python benchmarks/bench_ray.py --json benchmarks/results/bench_ray.json
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from bench_serving import percentile, prompt_text, start_serve, throughput, tokenizer_encode  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


async def latencies(url, n):
    import httpx
    out = []
    async with httpx.AsyncClient(timeout=None) as client:
        for i in range(n):
            t = time.perf_counter()
            r = await client.post(f'{url}/v1/chat/completions', json={
                'messages': [{'role': 'user', 'content': f'ping {i % 4}'}], 'max_tokens': 1, 'temperature': 0})
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--prompt-tokens', type=int, default=64)
    ap.add_argument('--new-tokens', type=int, default=64)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--latency-requests', type=int, default=40)
    ap.add_argument('--layers', type=int, default=12)
    ap.add_argument('--hidden', type=int, default=1024)
    ap.add_argument('--json', help='write the results here too')
    args = ap.parse_args()

    from modelscope_chatglm.testing import tiny
    model_dir = tiny.build(tempfile.mkdtemp(prefix='bench-ray-'), 'glm2', num_layers=args.layers,
                           hidden_size=args.hidden, num_heads=args.hidden // 64, kv_channels=64, groups=2,
                           ffn_hidden_size=args.hidden * 27 // 10, seq_length=4096, torch_dtype='float32')
    encode = tokenizer_encode(model_dir)
    cores = os.cpu_count()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0')
    env.pop('RAY_ADDRESS', None)
    common = ['--model', model_dir, '--device', 'cpu', '--dtype', 'float32', '--max-queue', '1000']
    setups = {
        'direct': common,
        'ray x1': common + ['--ray', '--replicas', '1', '--cpus-per-replica', str(cores)],
        'ray x2': common + ['--ray', '--replicas', '2', '--cpus-per-replica', str(max(cores // 2, 1))],
    }
    results = {'model': f'ChatGLM2-shaped, {args.layers} layers x {args.hidden}, float32', 'cores': cores,
               'clients': args.clients, 'prompt_tokens': args.prompt_tokens, 'new_tokens': args.new_tokens,
               'setups': {}}
    for name, server_args in setups.items():
        port = free_port()
        log = os.path.join(tempfile.gettempdir(), f'bench-ray-{name.replace(" ", "")}.log')
        proc = start_serve(server_args, port, log, env, minutes=10)
        url = f'http://127.0.0.1:{port}'
        try:
            asyncio.run(latencies(url, 4))   # warm up
            runs = []
            for r in range(args.repeats):
                prompts = [prompt_text(args.prompt_tokens, encode, seed=1000 * r + i) for i in range(args.clients)]
                runs.append(asyncio.run(throughput(url, args.clients, prompts, args.new_tokens)))
            lat = asyncio.run(latencies(url, args.latency_requests))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        rates = [run['tokens_per_s'] for run in runs]
        entry = {'tokens_per_s_median': statistics.median(rates), 'tokens_per_s_min': min(rates),
                 'tokens_per_s_max': max(rates), 'runs': runs,
                 'latency_median_s': statistics.median(lat), 'latency_p10_s': percentile(lat, 10),
                 'latency_p90_s': percentile(lat, 90)}
        results['setups'][name] = entry
        print(f'{name:8s} {entry["tokens_per_s_median"]:7.1f} tok/s [{min(rates):.1f}-{max(rates):.1f}]  '
              f'TTFT p50 {statistics.median(r["ttft_p50"] for r in runs):.2f}s  '
              f'ITL p50 {statistics.median(r["itl_p50"] for r in runs) * 1000:.1f}ms  '
              f'1-token request {entry["latency_median_s"] * 1000:.1f}ms '
              f'[{entry["latency_p10_s"] * 1000:.1f}-{entry["latency_p90_s"] * 1000:.1f}]', flush=True)
    direct = results['setups']['direct']
    for name in ('ray x1', 'ray x2'):
        s = results['setups'][name]
        s['vs_direct'] = s['tokens_per_s_median'] / direct['tokens_per_s_median']
        s['routing_overhead_ms'] = (s['latency_median_s'] - direct['latency_median_s']) * 1000
        print(f'{name}: {s["vs_direct"]:.2f}x the direct server; Ray adds {s["routing_overhead_ms"]:.1f} ms '
              'per request (median)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
