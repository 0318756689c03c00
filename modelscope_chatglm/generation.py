"""Our decode loop: logits processing, sampling, batching and streaming.

The model side is two calls (the contract: `models/base.py`):
    logits, state = model.prefill(input_ids, attention_mask, max_new_tokens)   # [b, V]
    logits = model.decode(next_ids, state)                                     # [b, V]
Everything about choosing tokens lives here and is the same for every family.

Logits are processed in the order transformers uses, so greedy and seeded sampling behave like the
official `generate`: repetition penalty, then temperature, top-k, top-p.
"""
from __future__ import annotations

import logging
import math
import numbers
import threading
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from .models.base import CausalLM

logger = logging.getLogger(__name__)

# A temperature below this samples greedily (vLLM's rule). Sampling at it already picks the best token
# unless another is within ~1e-4 of it; dividing float32 logits by 1e-300 gives 0 / 0 = NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (1e-4, 1e4)   # beyond it float32 logits overflow to inf (NaN after the shift)


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = None   # new tokens; wins over max_length when both are set
    max_length: Optional[int] = None       # prompt + new tokens
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from a token's logit per time it was generated / once if it was at all
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    stop_ids: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None

    @classmethod
    def from_kwargs(cls, defaults: 'SamplingParams', **kwargs) -> 'SamplingParams':
        """`defaults` updated with generation kwargs; unknown names are an error, not ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise TypeError(f'unknown generation argument(s) {unknown}; valid ones are {sorted(names)}')
        params = replace(defaults, **{k: v for k, v in kwargs.items() if v is not None})
        params.validate()
        return params

    def validate(self):
        for name, kind, text in (('max_new_tokens', int, 'an integer'), ('max_length', int, 'an integer'),
                                 ('top_k', int, 'an integer'), ('seed', int, 'an integer'),
                                 ('temperature', (int, float), 'a number'), ('top_p', (int, float), 'a number'),
                                 ('repetition_penalty', (int, float), 'a number'),
                                 ('frequency_penalty', (int, float), 'a number'),
                                 ('presence_penalty', (int, float), 'a number')):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f'{name} must be {text}, got {value!r} ({type(value).__name__})')
        if not isinstance(self.do_sample, bool):
            raise ValueError(f'do_sample must be True or False, got {self.do_sample!r}')
        if not isinstance(self.stop_ids, (list, tuple)) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in self.stop_ids):
            raise ValueError(f'stop_ids must be a list of non-negative token ids, got {self.stop_ids!r}')
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f'seed must be in [0, 2**63), got {self.seed}')
        for name in ('temperature', 'top_p', 'repetition_penalty', 'frequency_penalty', 'presence_penalty'):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f'{name} must be finite, got {getattr(self, name)!r}')
        for name in ('frequency_penalty', 'presence_penalty'):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f'{name} must be in [-2, 2] (as in the OpenAI API), got {getattr(self, name)}')
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                and isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
                for i, b in self.logit_bias.items()):
            raise ValueError('logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], got '
                             f'{self.logit_bias!r}'[:300])
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f'max_new_tokens must be >= 0, got {self.max_new_tokens}')
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f'max_length must be >= 1, got {self.max_length}')
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f'temperature must be > 0 when sampling, got {self.temperature} '
                             '(use do_sample=False for greedy decoding)')
        if not 0 < self.top_p <= 1:
            raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
        if self.top_k < 0:
            raise ValueError(f'top_k must be >= 0, got {self.top_k}')
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f'repetition_penalty must be in [{low:g}, {high:g}] (1.0 = none; >1 discourages '
                             f'repeating), got {self.repetition_penalty}')

    def bias_tensors(self, device):
        """logit_bias as (token ids, biases) tensors, made once per device: a request may carry tens of
        thousands of entries, and a Python loop over them at every token would slow the whole batch."""
        cache = self.__dict__.setdefault('_bias_tensors', {})   # not a field: replace() starts afresh
        key = str(device)
        if key not in cache:
            cache[key] = (torch.tensor(list(self.logit_bias), dtype=torch.long, device=device),
                          torch.tensor(list(self.logit_bias.values()), dtype=torch.float32, device=device))
        return cache[key]

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (do_sample with a temperature of at least 1e-5)."""
        return self.do_sample and self.temperature >= GREEDY_BELOW_TEMPERATURE

    def new_token_budget(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_len, 0)
        raise ValueError('set max_new_tokens or max_length')


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                   vocab_limit: int, generated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [b, V] (fp32) -> processed scores; seen [b, n] = ids so far (prompt + generated),
    generated [b, m] = the generated ones (what OpenAI's frequency and presence penalties count)."""
    logits = logits.float().clone()
    if params.logit_bias:
        ids, biases = params.bias_tensors(logits.device)
        inside = ids < logits.shape[-1]
        logits[:, ids[inside]] += biases[inside]   # (ids are unique: dict keys)
    logits[:, vocab_limit:] = float('-inf')   # padded embedding rows are not tokens
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = logits.gather(1, seen)
        picked = torch.where(picked < 0, picked * params.repetition_penalty,
                             picked / params.repetition_penalty)
        logits.scatter_(1, seen, picked)
    if (params.frequency_penalty or params.presence_penalty) and generated is not None and generated.numel():
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    if not params.sampling:
        return logits
    # Shift the best score to 0 before dividing: the same distribution, but a tiny temperature then
    # sharpens it towards greedy instead of overflowing to inf - inf = NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)
        drop[:, -1] = False   # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float('-inf'))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: List[int], top: int, vocab_limit: int):
    """Per row of the raw logits [n, V] (before penalties and temperature; padded embedding rows are
    not tokens): the model's log-probability of that row's token and its `top` most likely tokens
    -> [(logprob, [(id, logprob), ...]), ...]."""
    logprobs = torch.log_softmax(logits[:, :vocab_limit].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [(p, []) for p in chosen]
    best = logprobs.topk(top)
    return [(p, list(zip(ids, values))) for p, ids, values in zip(chosen, best.indices.tolist(), best.values.tolist())]


def choose(scores: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]):
    if not params.sampling:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: List[List[int]], pad_id: int):
    """-> input_ids [b, s], attention_mask [b, s] (1 = token, 0 = padding on the left)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


class PromptCache:
    """The KV cache of the last conversation, kept so that the next turn only prefills what is new.

    A chat turn's prompt repeats the whole history; the cache holds the K/V of the previous prompt and
    reply. The longest common prefix of the cached tokens and the new prompt is kept, the rest cut off,
    so an edited or truncated history simply reuses less. One conversation at a time: a turn that finds
    the cache busy (another thread generating) runs without it.
    """

    def __init__(self):
        self.ids: List[int] = []      # tokens whose K/V the cache holds
        self.state = None
        self.lock = threading.Lock()
        self.reused = 0               # prompt tokens the last turn did not have to prefill

    def prefill(self, model, prompt: List[int], budget: int):
        keep = 0
        if self.state is not None and not self._fits(model):
            self.clear()   # the model was cast or moved since (`model.to(...)`): its K/V would not do
        if self.state is not None:
            limit = min(len(self.ids), len(prompt) - 1)   # at least one new token gives the logits
            while keep < limit and self.ids[keep] == prompt[keep]:
                keep += 1
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        # Record what the cache is sure to hold before running: if the run is interrupted (Ctrl-C, an
        # error between chunks), positions past `keep` hold K/V of tokens that `ids` must not claim.
        if keep:
            self.ids = self.ids[:keep]
            logits = model.extend(self.state, keep, ids[:, keep:], budget)
        else:
            self.ids, self.state = [], None
            logits, self.state = model.prefill(ids, None, budget)
        self.ids, self.reused = list(prompt), keep
        return logits, self.state

    def clear(self):
        self.ids, self.state, self.reused = [], None, 0

    def _fits(self, model) -> bool:
        k = self.state.cache.k[0]
        return k.dtype == model.word_embeddings.weight.dtype and k.device == model.device


@torch.inference_mode()
def generate_tokens(model: CausalLM, prompts: List[List[int]], params: SamplingParams, pad_id: int,
                    vocab_limit: int, prompt_cache: Optional[PromptCache] = None) -> Iterator[List[Optional[int]]]:
    """Yield, per step, the new token of each sequence (None once a sequence has finished).

    A sequence finishes on a stop id (which is yielded) or when its budget of new tokens is spent.
    With `prompt_cache` (one prompt, a model with `supports_prefix_reuse`), the prompt's cached prefix
    is reused and the cache keeps this generation for the next call.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError('every prompt needs at least one token')
    budget = params.new_token_budget(max(len(p) for p in prompts))
    if budget == 0:
        return
    device = model.device
    input_ids, mask = left_pad(prompts, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    seen = input_ids.masked_fill(mask == 0, pad_id)
    use_cache = prompt_cache is not None and len(prompts) == 1 and model.supports_prefix_reuse \
        and prompt_cache.lock.acquire(blocking=False)
    try:
        if use_cache:
            logits, state = prompt_cache.prefill(model, prompts[0], budget)
        else:
            logits, state = model.prefill(input_ids, mask, budget)
        yield from _decode_loop(model, logits, state, seen, params, budget, vocab_limit, prompt_cache
                                if use_cache else None)
    finally:
        if use_cache:
            prompt_cache.lock.release()


def _decode_loop(model, logits, state, seen, params, budget, vocab_limit, prompt_cache):
    device = seen.device
    generator = None
    if params.sampling and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = torch.tensor(sorted(set(params.stop_ids)) or [-1], device=device)
    finished = torch.zeros(seen.shape[0], dtype=torch.bool, device=device)
    warned = False
    # The prompt and the tokens so far, in a buffer filled as they come (not a torch.cat per token,
    # which copies everything so far every time).
    prompt_width = seen.shape[1]
    history = torch.cat([seen, seen.new_empty((seen.shape[0], budget))], dim=1)
    for step in range(budget):
        seen = history[:, :prompt_width + step]
        broken = ~torch.isfinite(logits.float()).all(dim=-1)
        scores = process_logits(logits, seen, params, vocab_limit, generated=seen[:, prompt_width:])
        next_ids = choose(scores.masked_fill(broken[:, None], 0.0), params, generator)
        if bool(broken.any()):
            # NaN/inf logits mean the forward overflowed (typically fp16 activations). Whatever we
            # picked would be noise; end those sequences instead.
            if not warned:
                logger.warning('the model produced NaN/inf logits (fp16 overflow?); ending the affected '
                               'sequence(s). Load the model in bfloat16 or float32 to avoid this.')
                warned = True
            next_ids = torch.where(broken, stop[0].clamp(min=0), next_ids)
        out = [None if f else int(t) for f, t in zip(finished.tolist(), next_ids.tolist())]
        yield out
        finished |= torch.isin(next_ids, stop) | broken
        if bool(finished.all()) or step == budget - 1:
            return
        history[:, prompt_width + step] = next_ids
        logits = model.decode(next_ids, state)
        if prompt_cache is not None:
            prompt_cache.ids.append(int(next_ids[0]))


class TextDeltas:
    """Turn a growing list of token ids into text deltas: never text that a later token could still
    change, and at a cost per token that does not grow with the reply.

    Each push decodes a window of the latest tokens, not the whole reply (that made a token of an
    8,000-token reply cost 1.8 ms, and of a 32,000-token one 7.5 ms: bench_streaming_text.py). `start` is the window's first token, `sent` the part of
    the window's text already sent. The end of the text that more tokens could still change is held
    back (`tokenizer.unsettled_chars`: the bytes of an unfinished character, a half-spelled ChatGLM-6B
    placeholder). Once the window has grown to 2 x CONTEXT tokens it moves up to its last CONTEXT:
    those stay as context because decoding a slice drops the leading space of its first piece, and
    every difference that makes lies in text already sent.

    `context`: tokens the text continues (the end of a completion's prompt), counted as sent. Without
    it the ids are read as the start of a text, whose first piece's leading space decoding drops.
    """

    CONTEXT = 16   # more tokens than any held tail spans ('<|blank_80|' spelled a character at a time is 11)

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: List[int] = list(context)[-self.CONTEXT:] if context else []
        self.start = 0
        self.sent = tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.start:])
        settled = len(text) - self.tokenizer.unsettled_chars(text)
        delta = self._send(text, settled)
        if len(self.ids) - self.start >= 2 * self.CONTEXT:
            self._move_window(held=text[max(settled, len(self.sent)):])
        return delta

    def flush(self) -> str:
        """What is still held back once generation has ended (an unfinished character, as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self.start:])
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        if not text.startswith(self.sent):
            # Text already sent changed: the tokenizer's unsettled_chars missed a case. It cannot be
            # taken back; send what follows it, and the final reply (decoded whole) is right.
            logger.warning('streamed text changed after it was sent (%r -> %r); the stream may differ '
                           'from the final reply', self.sent[-20:], text[max(0, len(self.sent) - 20):])
        if end <= len(self.sent):
            return ''
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta

    def _move_window(self, held: str):
        start = len(self.ids) - self.CONTEXT
        text = self.tokenizer.decode(self.ids[start:])
        # The held tail (its tokens are all in the shorter window) must come out the same; if it does
        # not, keep the longer window for now.
        if text.endswith(held):
            self.start, self.sent = start, text[:len(text) - len(held)]


def text_after(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after the tokens `context` (the end of a prompt they continue): what
    decode(context + ids) has beyond decode(context). Decoded alone, ids read as the start of a text,
    and SentencePiece drops the leading space of a text's first piece (the space its encoder puts
    before every text); after a prompt that space is real: 'is' + ' Paris', not 'isParis'."""
    context = list(context)[-TextDeltas.CONTEXT:] if context else []
    before, whole = tokenizer.decode(context), tokenizer.decode(context + list(ids))
    # (A context ending in half a character decodes differently once ids complete it: then ids alone.)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(ids)


class StopStrings:
    """Cut streamed text at the first stop string (OpenAI's `stop`), never sending a part of one.

    The text is fed a delta at a time, and an end of it that could begin a stop string is held back
    until the next delta settles it. The reply ends at the first stop string to appear in full; it is
    cut where that string begins. Each stop string is matched as a Knuth-Morris-Pratt automaton over the
    characters as they come, so a token costs the same however long the reply or the stop strings are
    (searching the whole reply for each stop string after every token did not).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._fallback = [_kmp_fallback(s) for s in self.stops]
        self._matched = [0] * len(self.stops)   # per stop string: how much of it the text ends with
        self.held = ''                          # received, not sent: it may begin a stop string
        self.hit = False

    def push(self, delta: str) -> str:
        """The text to send now. Once a stop string is complete, the text before it, then `hit` is set
        and nothing more is sent."""
        if self.hit or not self.stops:
            return '' if self.hit else delta
        text = self.held + delta
        for i, char in enumerate(delta, start=len(self.held) + 1):   # i: the text's length so far
            complete = 0
            for k, stop in enumerate(self.stops):
                n, fallback = self._matched[k], self._fallback[k]
                while n and stop[n] != char:
                    n = fallback[n - 1]
                n += stop[n] == char
                if n == len(stop):
                    complete, n = max(complete, n), fallback[n - 1]
                self._matched[k] = n
            if complete:
                self.hit, self.held = True, ''
                return text[:i - complete]
        keep = max(self._matched)
        self.held = text[len(text) - keep:] if keep else ''
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once the reply has ended without a stop string."""
        rest, self.held = ('' if self.hit else self.held), ''
        return rest


def _kmp_fallback(s: str) -> List[int]:
    """fallback[j]: the length of the longest proper prefix of s[:j + 1] that is also its suffix."""
    fallback, n = [0] * len(s), 0
    for j in range(1, len(s)):
        while n and s[j] != s[n]:
            n = fallback[n - 1]
        n += s[j] == s[n]
        fallback[j] = n
    return fallback
