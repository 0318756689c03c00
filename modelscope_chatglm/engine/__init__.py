"""One engine under every surface: the scheduler decides (scheduler.py), the runner executes
(runner.py), `LLMEngine` steps them (core.py); sampling.py chooses tokens, detokenize.py turns them
into text, prefix_cache.py keeps finished sequences' K/V for the next turn."""
from .core import LLMEngine
from .sampling import SamplingParams
from .scheduler import KVBudgetError, Sequence

__all__ = ['LLMEngine', 'SamplingParams', 'KVBudgetError', 'Sequence']
