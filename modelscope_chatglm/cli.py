"""`modelscope-chatglm`: the command line.

    modelscope-chatglm demo                      offline: tiny random checkpoint -> ModelScope pipeline
    modelscope-chatglm chat --config chatglm3-6b interactive chat, streamed
    modelscope-chatglm serve --config chatglm3-6b OpenAI-compatible HTTP server (extra [serve])
    modelscope-chatglm serve --ray --replicas 2 ... the same on Ray Serve, several replicas (extra [ray])
    modelscope-chatglm web --config chatglm3-6b   chat page in the browser (extra [web])
    modelscope-chatglm configs                   the YAML configurations this install knows
    modelscope-chatglm export --model M --out DIR a hub-layout checkpoint (adapter merged, quantized) or --gguf
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import openmp   # (no torch: main() sets the OpenMP environment before anything loads torch)


def cmd_demo(args):
    from .testing.tiny import demo_checkpoint
    t0 = time.time()
    path = demo_checkpoint(args.family)
    import modelscope_chatglm  # noqa: F401  (registers the pipeline)
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    print(f'tiny {args.family} checkpoint in the hub layout: {path} ({time.time() - t0:.1f}s)')
    print('(random weights: the replies are noise; the machinery is what is shown)\n')
    t1 = time.time()
    pipe = pipeline(task=Tasks.chat, model=path, device='cpu')
    print(f'pipeline(task=Tasks.chat) -> {type(pipe).__name__} ({time.time() - t1:.1f}s)')
    history = []
    for query in ('你好', '介绍下清华大学', 'Tell me a joke.'):
        t = time.time()
        out = pipe({'text': query, 'history': history}, max_new_tokens=args.max_new_tokens, do_sample=False)
        history = out['history']
        print(f'\nuser: {query}\nChatGLM: {out["response"]!r}   [{time.time() - t:.2f}s, '
              f'history has {len(history)} turns]')
    print('\nstreaming the next reply through pipe.stream():')
    print('ChatGLM: ', end='', flush=True)
    for delta in pipe.stream({'text': '再见', 'history': history}, max_new_tokens=args.max_new_tokens,
                             do_sample=True, seed=0):
        print(delta, end='', flush=True)
    print(f'\n\ndone in {time.time() - t0:.1f}s')


def int8_activations_from(args):
    """--exact -> False, --int8-activations -> True, neither -> None (load()'s default)."""
    return False if args.exact else True if args.int8_activations else None


def load_from_args(args):
    from .adapters import parse_specs
    from .loading import load
    t = time.time()
    print(f'loading {args.config or args.model} ...', file=sys.stderr, flush=True)
    model = load(args.config or args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                 quantization_bit=args.quantize, int8_activations=int8_activations_from(args),
                 progress=progress_bar,
                 cuda_graphs=False if args.no_cuda_graphs else None,
                 adapter=parse_specs(args.adapter, several=args.command == 'serve'),
                 adapter_revision=args.adapter_revision)
    print(f'loaded {model} in {time.time() - t:.1f}s', file=sys.stderr, flush=True)
    return model


def progress_bar(done: int, total: int, path: str):
    """Shard-by-shard loading progress on stderr (downloads show ModelScope's own bars)."""
    width = 30
    filled = width * done // total
    print(f'\r  [{"#" * filled}{"." * (width - filled)}] {done}/{total} {os.path.basename(path)}',
          end='\n' if done == total else '', file=sys.stderr, flush=True)


def read_message(prompt: str):
    """One message; a line ending in a backslash continues on the next line. None at end of input."""
    lines = []
    while True:
        try:
            line = input(prompt if not lines else '... ')
        except EOFError:
            return '\n'.join(lines) if lines else None
        if line.endswith('\\'):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return '\n'.join(lines)


def cmd_chat(args):
    model = load_from_args(args)
    if args.max_new_tokens is not None and args.max_new_tokens >= model.context_length:
        raise ValueError(f'--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the '
                         f'{model.context_length}-token context window; ask for fewer')
    print('Type a message (end a line with \\ to continue it); "clear" resets the history, "exit" quits, '
          'Ctrl-C stops a reply.')
    history = []
    while True:
        try:
            query = read_message('\nuser: ')
        except KeyboardInterrupt:   # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print()
            continue
        if query is None or query.strip() in ('exit', 'stop', 'quit'):
            break
        if query.strip() == 'clear':
            history = []
            print('(history cleared)')
            continue
        if not query.strip():
            continue
        try:
            turn = model.turn(query, history, max_new_tokens=args.max_new_tokens)
        except ValueError as e:
            print(f'error: {e}')
            continue
        print('ChatGLM: ', end='', flush=True)
        try:
            for delta in turn:
                print(delta, end='', flush=True)
        except KeyboardInterrupt:
            print(' [interrupted]', end='')
        history = turn.history
        print()


def cmd_web(args):
    try:
        from .web import serve_web
        import gradio  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f'the web UI needs the [web] extra ({e}); pip install "modelscope-chatglm[web]"')
    serve_web(load_from_args(args), host=args.host, port=args.port)


def cmd_serve(args):
    if args.ray:
        return cmd_serve_ray(args)
    ray_only = [flag for flag, value in (('--replicas', args.replicas), ('--autoscale', args.autoscale),
                                         ('--cpus-per-replica', args.cpus_per_replica),
                                         ('--gpus-per-replica', args.gpus_per_replica)) if value is not None]
    if ray_only:
        raise ValueError(f'{", ".join(ray_only)} need --ray (replicas run on Ray Serve)')
    try:
        from .serve.server import serve
    except ImportError as e:
        raise RuntimeError(f'the server needs the [serve] extra ({e}); pip install "modelscope-chatglm[serve]"')
    from .serve.auth import api_keys
    keys = api_keys(args.api_key or os.environ.get('MODELSCOPE_CHATGLM_API_KEY'))   # (refused before loading)
    serve(load_from_args(args), host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
          model_name=args.name, api_key=keys or None,
          max_queue=args.max_queue, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
          max_logprobs=args.max_logprobs, max_connections=args.max_connections, header_timeout=args.header_timeout,
          kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30),
          allow_unknown_fields=args.allow_unknown_fields, allow_runtime_adapters=args.allow_runtime_adapters)


def cmd_serve_ray(args):
    try:
        from .serve.ray_app import RaySettings, run
    except ImportError as e:
        raise RuntimeError(f'serve --ray needs the [ray] extra ({e}); pip install "modelscope-chatglm[ray]"')
    if args.replicas is not None and args.autoscale is not None:
        raise ValueError('give --replicas N or --autoscale MIN:MAX, not both')
    from .adapters import parse_specs
    from .serve.auth import api_keys
    settings = RaySettings(
        model=args.config or args.model, revision=args.revision, device=args.device, dtype=args.dtype,
        quantize=args.quantize, int8_activations=int8_activations_from(args),
        adapter=parse_specs(args.adapter, several=True),
        adapter_revision=args.adapter_revision, no_cuda_graphs=args.no_cuda_graphs, name=args.name,
        api_key=api_keys(args.api_key or os.environ.get('MODELSCOPE_CHATGLM_API_KEY')) or None,
        max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
        max_logprobs=args.max_logprobs, allow_unknown_fields=args.allow_unknown_fields,
        allow_runtime_adapters=args.allow_runtime_adapters,
        kv_cache_gb=args.kv_cache_gb, prefill_chunk=args.prefill_chunk, replicas=args.replicas or 1,
        autoscale=args.autoscale, cpus_per_replica=1 if args.cpus_per_replica is None else args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica or 0)
    settings.autoscale_range()   # a malformed MIN:MAX fails here, before Ray starts
    run(settings, host=args.host, port=args.port)


def cmd_configs(args):
    from . import yaml_configs
    for name, path in sorted(yaml_configs.available().items()):
        spec = yaml_configs.read(path)
        print(f'{name:20s} {spec.model:28s} {spec.description}')


def cmd_export(args):
    """The arguments of export(): the work and its checks are modelscope_chatglm/export/."""
    from .adapters import parse_specs
    from .export import export, export_gguf
    hub_only = [flag for flag, value in (('--quantize', args.quantize), ('--format', args.format),
                                         ('--max-shard-size', args.max_shard_size)) if value is not None]
    if args.gguf and hub_only:
        raise ValueError(f'{", ".join(hub_only)} shape a hub-layout export (--out DIR); a GGUF\'s quantization is '
                         '--gguf-type q8_0 or q4_0')
    if args.out and args.gguf_type is not None:
        raise ValueError('--gguf-type is for --gguf FILE; a hub-layout export quantizes with --quantize 4|8')
    model, t = args.config or args.model, time.time()
    common = dict(adapter=parse_specs(args.adapter, several=False), revision=args.revision,
                  adapter_revision=args.adapter_revision, force=args.force)
    print(f'exporting {model} ...', file=sys.stderr, flush=True)
    if args.gguf:
        path = export_gguf(model, args.gguf, gguf_type=args.gguf_type or 'f16', **common)
    else:
        given = {name: value for name, value in (('quantization_bit', args.quantize), ('weights_format', args.format),
                                                 ('max_shard_bytes', args.max_shard_size)) if value is not None}
        path = export(model, args.out, **given, **common)
    print(f'wrote {path} in {time.time() - t:.1f}s', file=sys.stderr, flush=True)


def _byte_size(text):
    """'2GB', '500MB', '1GiB' or a number of bytes -> bytes (an argparse type)."""
    units = {'': 1, 'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'KIB': 2 ** 10, 'MIB': 2 ** 20, 'GIB': 2 ** 30}
    number = text.strip().upper().rstrip('BKMGI')
    unit = text.strip().upper()[len(number):]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f'a size like 2GB, 500MB or 1GiB, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be positive, got {text!r}')
    return value


def _int_in(low: int, high: float, why: str):
    """An argparse type: an integer in [low, high], else one line saying `why`."""
    def parse(text):
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'{why}, got {value}')
        return value
    parse.__name__ = 'integer'   # (argparse names it in "invalid integer value: 'abc'")
    return parse


_positive_int = _int_in(1, float('inf'), 'must be >= 1')
_port = _int_in(1, 65535, 'a TCP port is 1 to 65535')
_body_limit = _int_in(1024, float('inf'), 'must be at least 1024 (bytes; a request body is JSON)')
_logprob_count = _int_in(0, 20, "must be 0 to 20 (OpenAI's top_logprobs range)")


def _positive_float(text):
    value = float(text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def _nonnegative_float(text):
    value = float(text)
    if not 0 <= value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def main(argv=None):
    openmp.set_for_this_process()   # first: libgomp reads it when torch loads (openmp.py says why)
    from .families import FAMILIES
    ap = argparse.ArgumentParser(prog='modelscope-chatglm', description='ChatGLM chat models for ModelScope')
    sub = ap.add_subparsers(dest='command', required=True)
    p = sub.add_parser('demo', help='offline demo on a tiny random checkpoint through pipeline()')
    p.add_argument('--family', default='glm2', choices=list(FAMILIES),
                   help='which generation of ChatGLM the tiny checkpoint has (default glm2)')
    p.add_argument('--max-new-tokens', type=_positive_int, default=16, help='tokens per reply (default 16)')
    p.set_defaults(func=cmd_demo)
    for name, func, help_text in (('chat', cmd_chat, 'interactive chat in the terminal'),
                                  ('serve', cmd_serve, 'OpenAI-compatible HTTP server'),
                                  ('web', cmd_web, 'chat page in the browser')):
        p = sub.add_parser(name, help=help_text)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument('--config', help='a configuration name or YAML path')
        src.add_argument('--model', help='a hub id or a model directory')
        p.add_argument('--revision', help='hub revision of --model (default: the newest)')
        p.add_argument('--device', help='auto | cpu | cuda | cuda:N')
        p.add_argument('--dtype', help='float32 | bfloat16 | float16')
        p.add_argument('--quantize', type=int, choices=[4, 8], default=None, help='quantize the blocks on load')
        activations = p.add_mutually_exclusive_group()
        activations.add_argument('--exact', action='store_true',
                                 help='CPU, int8/int4 models: keep fp32/bf16 activations (the exact kernels, '
                                      'the reference\'s logits on the same weights) instead of the default int8 '
                                      'activations (faster; they add about the error of int8 weights)')
        activations.add_argument('--int8-activations', action='store_true',
                                 help='CPU, int8/int4 models: int8 activations (the default where the compiled '
                                      'kernels are; asked for on a GPU or an unquantized model it is an error)')
        p.add_argument('--adapter', action='append', metavar='[NAME=]PATH',
                       help='a LoRA (peft, ms-swift) or P-tuning v2 checkpoint directory or hub id on top of '
                            'the model; serve: NAME=PATH, repeated, holds several LoRA adapters over one base '
                            '(a request\'s "model" picks one)')
        p.add_argument('--adapter-revision', help='revision of a hub-id adapter')
        p.add_argument('--no-cuda-graphs', action='store_true',
                       help='on a GPU, launch decode kernels one by one instead of replaying CUDA graphs')
        p.set_defaults(func=func)
        if name == 'chat':
            p.add_argument('--max-new-tokens', type=_positive_int, default=None,
                           help='tokens per reply at most (default: what the context window leaves)')
        else:
            p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this '
                                                                'machine only; 0.0.0.0: every interface)')
            port = 8000 if name == 'serve' else 7860
            p.add_argument('--port', type=_port, default=port, help=f'TCP port, 1-65535 (default {port})')
        if name == 'serve':
            p.add_argument('--name', default=None, help='model name reported by /v1/models')
            p.add_argument('--max-body-bytes', type=_body_limit, default=1 << 20,
                           help='largest request body accepted, in bytes, at least 1024 (default 1048576)')
            p.add_argument('--max-queue', type=_positive_int, default=100,
                           help='requests that may wait for the model; more get 503 + Retry-After (default 100)')
            p.add_argument('--api-key', action='append',
                           help='require "Authorization: Bearer KEY" on every route but /health and /metrics; '
                                'give it once per tenant (or a comma list): each key\'s requests share cached '
                                'prompts only with each other (default: $MODELSCOPE_CHATGLM_API_KEY; none: open)')
            p.add_argument('--max-logprobs', type=_logprob_count, default=20,
                           help='most alternatives per token a request may ask logprobs for, 0-20 (default 20); '
                                'a response carries at most 131,072 logprobs in all')
            p.add_argument('--allow-unknown-fields', action='store_true',
                           help='ignore request fields that are neither OpenAI\'s nor vLLM\'s (default: a 400 that '
                                'names them, so no option is dropped silently)')
            p.add_argument('--allow-runtime-adapters', action='store_true',
                           help='POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM\'s) load and unload LoRA '
                                'adapters while serving; any client may then read adapter paths on this machine '
                                '(default: off, they answer 404)')
            p.add_argument('--max-batch', type=_positive_int, default=None,
                           help='most sequences decoded together (default 16; 1 = one request at a time)')
            p.add_argument('--max-connections', type=_int_in(16, 10 ** 6, 'must be at least 16'), default=1000,
                           help='open connections at most; more are closed at once (default 1000)')
            p.add_argument('--header-timeout', type=_positive_float, default=30.0,
                           help='seconds a client has to send a request\'s head (line and headers) after it '
                                'connects or after the previous response; slower ones are disconnected '
                                '(default 30)')
            p.add_argument('--kv-cache-gb', type=_positive_float, default=None,
                           help='GiB for the K/V of running sequences and the prefix cache (default: a quarter '
                                'of available RAM up to 16, or half of free GPU memory); a request waits until its '
                                'K/V fit')
            p.add_argument('--prefill-chunk', type=_positive_int, default=None,
                           help='prompt tokens prefilled per step between decode steps (default 128 on CPU, 1024 on GPU)')
            ray = p.add_argument_group('Ray Serve (extra [ray]): replicas on the cluster at $RAY_ADDRESS, or a local one')
            ray.add_argument('--ray', action='store_true', help='serve through Ray Serve')
            ray.add_argument('--replicas', type=_positive_int, default=None, help='model replicas (default 1)')
            ray.add_argument('--autoscale', metavar='MIN:MAX', default=None,
                             help='scale between MIN and MAX replicas on ongoing requests (a full batch each)')
            ray.add_argument('--cpus-per-replica', type=_nonnegative_float, default=None,
                             help='CPUs Ray reserves for each replica (default 1; also its torch threads)')
            ray.add_argument('--gpus-per-replica', type=_nonnegative_float, default=None,
                             help='GPUs for each replica (default 0; > 0 runs the replica on cuda)')
    p = sub.add_parser('configs', help='list the YAML configurations')
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser('export', help='write the model as load() builds it (adapter merged, quantized) as a '
                                      'hub-layout checkpoint, or as a GGUF for llama.cpp (docs/export.md)')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--config', help='a configuration name or YAML path')
    src.add_argument('--model', help='a hub id or a model directory')
    p.add_argument('--revision', help='hub revision of --model (default: the newest)')
    p.add_argument('--adapter', action='append', metavar='PATH',
                   help='a LoRA (merged into the weights) or P-tuning v2 checkpoint directory or hub id')
    p.add_argument('--adapter-revision', help='revision of a hub-id adapter')
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument('--out', metavar='DIR', help='write a hub-layout checkpoint directory')
    dest.add_argument('--gguf', metavar='FILE', help='write a GGUF file (ChatGLM2/3; extra [export])')
    p.add_argument('--quantize', type=int, choices=[4, 8], default=None,
                   help='--out: THUDM\'s int4/int8 blocks, as chatglm2-6b-int4 ships them')
    p.add_argument('--format', choices=['safetensors', 'bin'], default=None,
                   help='--out: the weight files (default safetensors; bin: pytorch_model-*.bin as the hub has them)')
    p.add_argument('--max-shard-size', type=_byte_size, default=None, metavar='SIZE',
                   help='--out: the largest weight file, e.g. 2GB (the default) or 500MB')
    p.add_argument('--gguf-type', choices=['f32', 'f16', 'q8_0', 'q4_0'], default=None,
                   help='--gguf: the blocks\' and head\'s type (default f16; norms and biases are f32)')
    p.add_argument('--force', action='store_true',
                   help='replace an existing --out model directory or --gguf file')
    p.set_defaults(func=cmd_export)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C while a model loads (the chat loop handles its own)
        print('\ninterrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
