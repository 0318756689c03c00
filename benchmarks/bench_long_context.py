"""Long context on a ChatGLM2-6B-32K-shaped checkpoint: peak memory of a prefill, and KV reuse across turns.

The checkpoint has the full ChatGLM2-6B-32K width (hidden 4096, ffn 13696, 32 heads, 2 K/V groups,
vocab 65024, rope_ratio 16) with random fp16 weights in the hub layout, and --layers of the 28 layers
(default 1). Each measurement runs in a fresh process.

1. Peak RSS while prefilling N tokens (4K..32K), for int4 and int8 blocks quantized on load (bf16
   activations, the CPU default). The 28-layer figure is extrapolated with the memory model
       peak(28) = weights(28) + KV bytes/token(28) * N + activations,
   where weights and KV are computed exactly from the shapes and "activations" is what the measured
   run used beyond its own weights and KV (it does not grow with depth: layers run one after another).
2. Time to first token of chat turn N+1 after a history of H tokens, with the KV cache of the
   conversation reused (only the new turn is prefilled) and without (the whole prompt is).

    python benchmarks/bench_long_context.py [--lengths 4096,8192,16384,32768] [--layers 1]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from memory import peak_rss  # noqa: E402  (benchmarks/memory.py)

LAYERS_28 = 28
PARAMS_PER_LAYER = 4608 * 4096 + 4096 * 4096 + 27392 * 4096 + 4096 * 13696   # the four quantized linears
SMALL_PARAMS_PER_LAYER = 4608 + 2 * 4096                                       # qkv bias, two RMSNorms
EMBED_PARAMS = 2 * 65024 * 4096                                                # embedding + output layer


def build(path, layers):
    from modelscope_chatglm.testing import tiny
    if not os.path.exists(os.path.join(path, '.complete')):
        tiny.build(path, family='glm2', fmt='bin', shards=2, hidden_size=4096, num_layers=layers, num_heads=32,
                   kv_channels=128, groups=2, ffn_hidden_size=13696, seq_length=32768, padded_vocab_size=65024,
                   rope_ratio=16.0)
        open(os.path.join(path, '.complete'), 'w').close()


def weights_bytes(layers, bits, act_bytes=2):
    return layers * (PARAMS_PER_LAYER * bits / 8 + (4608 + 4096 + 27392 + 4096) * 4
                     + SMALL_PARAMS_PER_LAYER * act_bytes) + EMBED_PARAMS * act_bytes


def kv_bytes_per_token(layers, act_bytes=2):
    return layers * 2 * 2 * 128 * act_bytes      # K and V, 2 groups of 128 dims


def child_prefill(path, bits, n):
    import modelscope_chatglm
    peak_rss(reset=True)
    chat = modelscope_chatglm.load(path, device='cpu', quantization_bit=bits)
    loaded = peak_rss(reset=True)
    prompt = [(i * 7919) % 60000 + 100 for i in range(n)]
    engine = chat.new_engine(prefill_chunk=512)
    t = time.perf_counter()
    engine.run_until_done([engine.submit(prompt, chat.sampling(max_new_tokens=1, do_sample=False))])
    seconds = time.perf_counter() - t
    return {'seconds': seconds, 'peak': peak_rss(), 'loaded_peak': loaded, 'kv': engine.scheduler.kv_bytes(n + 1)}


def child_turn(path, history_tokens):
    """TTFT of the turn after a history of about `history_tokens`, with and without the reused cache."""
    import modelscope_chatglm
    chat = modelscope_chatglm.load(path, device='cpu', quantization_bit=4, context_length=32768)
    words = 'The quick brown fox jumps over the lazy dog near the river bank today. '
    per_round = len(chat.tokenizer.encode(words * 20))
    history = [(words * 20, 'ok') for _ in range(max(1, history_tokens // per_round))]
    query = 'Summarise the story above in one sentence.'
    out = {}
    for mode in ('reuse', 'no reuse'):
        chat.configure_engine()    # an empty prefix cache
        chat.chat(history[-1][0], history[:-1], max_new_tokens=2, do_sample=False)   # the previous turn
        if mode == 'no reuse':
            chat.configure_engine()
        turn = chat.turn(query, history, max_new_tokens=1, do_sample=False)
        t = time.perf_counter()
        for _ in turn:
            pass
        out[mode] = time.perf_counter() - t
        out['prompt'] = len(turn.request.input_ids)
        out[f'{mode} reused'] = chat.engine.scheduler.stats['cached_prompt_tokens']
    return out


def run_child(args, *child_args):
    cmd = [sys.executable, os.path.abspath(__file__), '--dir', args.dir, '--layers', str(args.layers), *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--layers', type=int, default=1)
    ap.add_argument('--lengths', default='4096,8192,16384,32768')
    ap.add_argument('--histories', default='1024,4096,8192')
    ap.add_argument('--dir', default=None)
    ap.add_argument('--child', default=None)
    args = ap.parse_args()
    from modelscope_chatglm import openmp
    openmp.set_for_this_process()   # before torch loads here, and the children inherit it (openmp.py)
    args.dir = args.dir or os.path.join(tempfile.gettempdir(), f'chatglm2-6b-32k-shape-{args.layers}L')
    if args.child:
        kind, *rest = args.child.split(':')
        result = child_prefill(args.dir, int(rest[0]), int(rest[1])) if kind == 'prefill' else \
            child_turn(args.dir, int(rest[0]))
        print(json.dumps(result))
        return
    build(args.dir, args.layers)
    gb = 1e9
    print(f'checkpoint: {args.dir} (ChatGLM2-6B-32K width, {args.layers} of 28 layers, rope_ratio 16)\n')
    print('1. Peak RSS while prefilling (bf16 activations, chunks of 512 tokens)')
    print(f'{"blocks":6s} {"tokens":>7s} {"prefill s":>10s} {"measured peak":>14s} {"its weights+KV":>15s} '
          f'{"activations":>12s} {"28-layer model":>15s}')
    for bits in (4, 8):
        for n in (int(x) for x in args.lengths.split(',')):
            r = run_child(args, '--child', f'prefill:{bits}:{n}')
            measured_fixed = weights_bytes(args.layers, bits) + kv_bytes_per_token(args.layers) * n
            activations = r['peak'] - measured_fixed
            full = weights_bytes(LAYERS_28, bits) + kv_bytes_per_token(LAYERS_28) * n + activations
            print(f'int{bits:<3d} {n:7d} {r["seconds"]:10.1f} {r["peak"] / gb:11.2f} GB {measured_fixed / gb:12.2f} GB '
                  f'{activations / gb:9.2f} GB {full / gb:12.2f} GB', flush=True)
    print(f'\nKV cache per token, 28 layers, bf16: {kv_bytes_per_token(LAYERS_28) / 1e3:.1f} KB '
          f'({kv_bytes_per_token(LAYERS_28) * 32768 / gb:.2f} GB at 32K)')
    print('\n2. Time to first token of the next chat turn (int4, bf16)')
    print(f'{"history":>8s} {"prompt":>7s} {"reused":>7s} {"TTFT reuse s":>13s} {"TTFT no reuse s":>16s}')
    for h in (int(x) for x in args.histories.split(',')):
        r = run_child(args, '--child', f'turn:{h}')
        print(f'{h:8d} {r["prompt"]:7d} {r["reuse reused"]:7d} {r["reuse"]:13.2f} {r["no reuse"]:16.2f}', flush=True)


if __name__ == '__main__':
    main()
