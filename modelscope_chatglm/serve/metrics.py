"""/metrics and /health from the engines' statistics (`AsyncEngine.stats()`, one dict per engine or
replica): Prometheus text, and several replicas' statistics as one.
"""
from __future__ import annotations

from typing import List

# name -> (Prometheus type, help) of what /metrics reports, from AsyncEngine.stats().
METRICS = {
    'running': ('gauge', 'sequences in the running batch'),
    'waiting': ('gauge', 'requests waiting to join the batch'),
    'max_batch': ('gauge', 'most sequences decoded together (--max-batch)'),
    'kv_budget_bytes': ('gauge', 'memory for K/V of running sequences and the prefix cache (--kv-cache-gb)'),
    'kv_reserved_bytes': ('gauge', 'K/V memory reserved by running sequences'),
    'kv_prefix_cache_bytes': ('gauge', 'K/V memory held by the prefix cache'),
    'prefix_cache_entries': ('gauge', 'token runs (radix-tree nodes) whose K/V the prefix cache keeps'),
    'prefix_cache_hit_rate': ('gauge', 'share of prompt tokens taken from the prefix cache'),
    'prompt_tokens': ('counter', 'prompt tokens of admitted requests'),
    'cached_prompt_tokens': ('counter', 'prompt tokens whose K/V came from the prefix cache'),
    'generated_tokens': ('counter', 'tokens generated'),
    'completed': ('counter', 'requests finished by a stop or their length'),
    'cancelled': ('counter', 'requests cancelled (client gone, shutdown)'),
    'failed': ('counter', 'requests that failed in the engine'),
    'preempted': ('counter', 'sequences preempted (memory freed, prefilled again) for lack of KV memory'),
    'steps': ('counter', 'scheduler iterations'),
    'tokens_per_second': ('gauge', 'generated tokens per second over the last tokens (up to 1,024, within 30 s)'),
}


def _label_value(text: str) -> str:
    return '"' + text.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n') + '"'


def prometheus_text(engines: List[dict], model: str) -> str:
    """Prometheus text for one engine's stats, or one series per replica (labelled by its id)."""
    lines = []
    for key, (kind, text) in METRICS.items():
        metric = f'chatglm_{key}' + ('_total' if kind == 'counter' else '')
        lines += [f'# HELP {metric} {text}', f'# TYPE {metric} {kind}']
        for stats in engines:
            labels = f'model={_label_value(model)}'
            if stats.get('replica'):
                labels += f',replica={_label_value(stats["replica"])}'
            lines.append(f'{metric}{{{labels}}} {float(stats[key])!r}')
    return '\n'.join(lines) + '\n'


def combined(engines: List[dict]) -> dict:
    """Several replicas' stats as one: counts and memory add up, the hit rate is recomputed."""
    total = {key: sum(s[key] for s in engines) for key in METRICS if key != 'prefix_cache_hit_rate'}
    total['prefix_cache_hit_rate'] = (total['cached_prompt_tokens'] / total['prompt_tokens']
                                      if total['prompt_tokens'] else 0.0)
    total.update(queued=total['waiting'], active=total['running'])
    return total
