"""What /metrics and /health report, from the engines' statistics (`AsyncEngine.stats()`: one dict per
engine, or per Ray Serve replica).

Two kinds of numbers:
- an engine's state and counters (the scheduler's `snapshot()`): sequences running and waiting, K/V
  memory, tokens, prefix-cache hits. Under Ray, one series per replica (label `replica`).
- per request (`RequestMetrics`): histograms of latencies and lengths, and finished requests by reason,
  fed on the engine thread from the timestamps the scheduler keeps on each sequence. They are plain
  bucket counts, so they travel in a Ray replica's stats and add up: /metrics shows them summed over
  the replicas.

The engine's numbers keep their `chatglm_*` series (label `model`); where vLLM has the same measure they
are also exported under vLLM's name, and the per-request ones only under vLLM's names and buckets (label
`model_name`), so dashboards built for vLLM read this server as they are. The text comes from
prometheus_client, in a registry of each app's own; it is imported only when an app is built (a
replica, and `import modelscope_chatglm`, never load it).
"""
from __future__ import annotations

import itertools
import logging
from bisect import bisect_left
from collections import OrderedDict
from typing import Dict, Iterable, List

logger = logging.getLogger(__name__)

# name -> (Prometheus type, help) of the engine's own series, `chatglm_<name>`, from AsyncEngine.stats().
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

# vLLM's name -> (Prometheus type, AsyncEngine.stats() key, help) for the engine's numbers that mean
# what vLLM's mean (vllm/v1/metrics/loggers.py).
VLLM_ENGINE_METRICS = {
    'vllm:num_requests_running': ('gauge', 'running', 'requests in the running batch'),
    'vllm:num_requests_waiting': ('gauge', 'waiting', 'requests waiting to join the batch'),
    'vllm:kv_cache_usage_perc': ('gauge', 'kv_cache_usage',
                                 'share of the K/V pool that running requests hold (1 = full; what the prefix '
                                 'cache could evict counts as free)'),
    'vllm:prefix_cache_queries': ('counter', 'prompt_tokens', 'prompt tokens looked up in the prefix cache'),
    'vllm:prefix_cache_hits': ('counter', 'cached_prompt_tokens', 'prompt tokens found in the prefix cache'),
    'vllm:prompt_tokens': ('counter', 'prompt_tokens', 'prompt tokens of admitted requests'),
    'vllm:generation_tokens': ('counter', 'generated_tokens', 'tokens generated'),
    'vllm:num_preemptions': ('counter', 'preempted', 'sequences preempted for lack of K/V memory'),
}

# vLLM's buckets, so that quantiles over them come out alike.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five(limit: int) -> List[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: vLLM's buckets for token counts (up to the context length)."""
    return [m * 10 ** e for e in range(len(str(limit))) for m in (1, 2, 5) if m * 10 ** e <= limit]


# Histogram name (after `vllm:`) -> help. Each request is observed once, when it finishes, except
# `time_to_first_token_seconds` (at its first token) and `inter_token_latency_seconds` (at each later one).
HISTOGRAMS = {
    'time_to_first_token_seconds': 'seconds from a request reaching the engine to its first token',
    'inter_token_latency_seconds': 'seconds between two tokens of a request',
    'e2e_request_latency_seconds': 'seconds from a request reaching the engine to its end',
    'request_queue_time_seconds': 'seconds a request waited before it joined the running batch',
    'request_inference_time_seconds': 'seconds from joining the running batch to the last token',
    'request_prefill_time_seconds': 'seconds from joining the running batch to the first token',
    'request_decode_time_seconds': 'seconds from the first token to the last',
    'request_prompt_tokens': 'prompt tokens of a request',
    'request_generation_tokens': 'tokens a request generated',
}

# How a request ended, as vLLM's `finished_reason` label says it (the engine's 'cancelled' is vLLM's 'abort').
FINISH_REASONS = ('stop', 'length', 'abort', 'error')
REQUEST_METRICS = 'request_metrics'   # the key of RequestMetrics.snapshot() in AsyncEngine.stats()


class Histogram:
    """Observations counted per bucket (`counts[i]`: bounds[i-1] < value <= bounds[i]; the last one past
    every bound) and their sum. Plain data: it pickles, and several add up."""
    __slots__ = ('bounds', 'counts', 'sum')

    def __init__(self, bounds: Iterable[float]):
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {'bounds': self.bounds, 'counts': list(self.counts), 'sum': self.sum}


class RequestMetrics:
    """One engine's per-request histograms and finish counts. `token` and `finished` are called on the
    stepping thread (one writer: no lock, an observation costs a bisect and two additions); `snapshot()`
    copies from any thread (a sum may lag its counts by the observation under way)."""

    def __init__(self, context_length: int):
        tokens = one_two_five(context_length)
        bounds = {'time_to_first_token_seconds': TIME_TO_FIRST_TOKEN_BUCKETS,
                  'inter_token_latency_seconds': INTER_TOKEN_BUCKETS,
                  'request_prompt_tokens': tokens, 'request_generation_tokens': tokens}
        self.histograms = {name: Histogram(bounds.get(name, REQUEST_LATENCY_BUCKETS)) for name in HISTOGRAMS}
        self.finish_reasons = dict.fromkeys(FINISH_REASONS, 0)

    def token(self, seq):
        """After a token was appended to `seq` (engine/scheduler.py keeps the times)."""
        if seq.previous_token_at is None:
            self.histograms['time_to_first_token_seconds'].observe(seq.first_token_at - seq.arrival)
        else:
            self.histograms['inter_token_latency_seconds'].observe(seq.last_token_at - seq.previous_token_at)

    def finished(self, seq, reason: str):
        """`seq` ended as its client was told: 'stop' | 'length' | 'cancelled' | 'error'."""
        reason = 'abort' if reason == 'cancelled' else reason
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        h = self.histograms
        h['e2e_request_latency_seconds'].observe(seq.finished_at - seq.arrival)
        h['request_prompt_tokens'].observe(len(seq.prompt))
        h['request_generation_tokens'].observe(len(seq.output))
        if seq.admitted is None:   # cancelled while it waited: it never ran
            return
        h['request_queue_time_seconds'].observe(seq.admitted - seq.arrival)
        if seq.last_token_at is not None:
            h['request_inference_time_seconds'].observe(seq.last_token_at - seq.admitted)
            h['request_prefill_time_seconds'].observe(seq.first_token_at - seq.admitted)
            h['request_decode_time_seconds'].observe(seq.last_token_at - seq.first_token_at)

    def snapshot(self) -> dict:
        return {'histograms': {name: h.snapshot() for name, h in self.histograms.items()},
                'finish_reasons': dict(self.finish_reasons)}


def summed(snapshots: Iterable[dict]) -> dict:
    """Several engines' RequestMetrics snapshots as one: bucket counts, sums and finish counts added."""
    total = {'histograms': {}, 'finish_reasons': dict.fromkeys(FINISH_REASONS, 0)}
    for snap in snapshots:
        for reason, n in snap['finish_reasons'].items():
            total['finish_reasons'][reason] = total['finish_reasons'].get(reason, 0) + n
        for name, h in snap['histograms'].items():
            into = total['histograms'].setdefault(name, {'bounds': h['bounds'], 'counts': [0] * len(h['counts']),
                                                         'sum': 0.0})
            if into['bounds'] != h['bounds']:   # (replicas of one app serve one model: never, unless mid-upgrade)
                logger.warning('%s: replicas report different buckets; one of them is left out', name)
                continue
            into['counts'] = [a + b for a, b in zip(into['counts'], h['counts'])]
            into['sum'] += h['sum']
    return total


MAX_REPLICAS_KEPT = 64   # replicas whose snapshots are kept apart; older ones are folded into one sum


class MetricsExporter:
    """The Prometheus text of one app's /metrics, from its own CollectorRegistry (several apps may live in
    one process). `render(engines)` takes the engines' stats as `backend.stats_list()` gave them.

    The per-request numbers of every engine ever seen are kept (its latest snapshot, by replica id), so
    the sums over Ray replicas never go down when a replica goes away: Prometheus would read that as a
    counter reset."""

    def __init__(self, model: str):
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError as e:
            raise ImportError(f'/metrics needs prometheus_client ({e}); pip install "modelscope-chatglm[serve]"') from e
        self.model = model
        self.content_type = CONTENT_TYPE_LATEST
        self._generate = generate_latest
        self._engines: List[dict] = []
        # replica id ('' for the one engine of a process) -> its latest snapshot, the least recently seen first
        self._requests: 'OrderedDict[str, dict]' = OrderedDict()
        self._retired = summed([])   # the replicas seen longest ago, folded into one (their number stays bounded)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def render(self, engines: List[dict]) -> bytes:
        self._engines = engines   # (read by collect(), called by the line below: no await in between)
        for stats in engines:
            replica = stats.get('replica') or ''
            self._requests[replica] = stats[REQUEST_METRICS]
            self._requests.move_to_end(replica)
        while len(self._requests) > MAX_REPLICAS_KEPT:   # (Ray replaced replicas again and again)
            self._retired = summed([self._retired, self._requests.popitem(last=False)[1]])
        return self._generate(self.registry)

    def collect(self):
        """prometheus_client's Collector protocol: the metric families of the engines last rendered."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString
        family = {'gauge': GaugeMetricFamily, 'counter': CounterMetricFamily}
        per_replica = any(stats.get('replica') for stats in self._engines)
        extra = ['replica'] if per_replica else []

        def engine_family(name, kind, key, text, model_label):
            metrics = family[kind](name, text, labels=[model_label] + extra)
            for stats in self._engines:
                metrics.add_metric([self.model] + ([stats['replica']] if per_replica else []), float(stats[key]))
            return metrics

        for key, (kind, text) in METRICS.items():   # (a counter family's samples end in _total)
            yield engine_family(f'chatglm_{key}', kind, key, text, 'model')
        for name, (kind, key, text) in VLLM_ENGINE_METRICS.items():
            yield engine_family(name, kind, key, text, 'model_name')

        requests = summed([self._retired, *self._requests.values()])
        finished = CounterMetricFamily('vllm:request_success', 'finished requests, by how they ended '
                                       '(abort: cancelled, the client gone or shutdown)',
                                       labels=['model_name', 'finished_reason'])
        for reason, n in requests['finish_reasons'].items():
            finished.add_metric([self.model, reason], n)
        yield finished
        for name, text in HISTOGRAMS.items():
            metrics = HistogramMetricFamily(f'vllm:{name}', text, labels=['model_name'])
            h = requests['histograms'].get(name)
            if h is not None:
                cumulative = itertools.accumulate(h['counts'])
                metrics.add_metric([self.model], [(floatToGoString(bound), n) for bound, n in
                                                  zip(h['bounds'] + [float('inf')], cumulative)], h['sum'])
            yield metrics


def without_request_metrics(stats: dict) -> dict:
    """An engine's stats as /health shows them (the histograms are /metrics' business)."""
    return {key: value for key, value in stats.items() if key != REQUEST_METRICS}


def combined(engines: List[dict]) -> dict:
    """Several replicas' stats as one: counts and memory add up, the hit rate is recomputed."""
    total = {key: sum(s[key] for s in engines) for key in METRICS if key != 'prefix_cache_hit_rate'}
    total['prefix_cache_hit_rate'] = (total['cached_prompt_tokens'] / total['prompt_tokens']
                                      if total['prompt_tokens'] else 0.0)
    total.update(queued=total['waiting'], active=total['running'])
    return total
