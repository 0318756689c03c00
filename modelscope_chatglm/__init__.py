"""modelscope-chatglm: ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B chat models for ModelScope.

    import modelscope_chatglm                      # also registers the Tasks.chat pipeline
    model = modelscope_chatglm.load('ZhipuAI/chatglm3-6b', revision='master')
    response, history = model.chat('你好')

Importing this package is cheap: the ModelScope classes load when a pipeline is first built, and
the optional surfaces (server, web UI) only when used.
"""
__version__ = '0.1.0'

import os as _os
import sys as _sys

# torch's OpenMP runtime (libgomp, which our CPU kernels share) keeps an idle thread spinning for
# 300,000 rounds after each parallel region. On a machine where another process is busy, that
# spinning takes the core from the thread that still has work: full-size int4 decode measured 2.2-2.4
# tok/s beside one busy process by default, 3.0-3.3 with 10,000 rounds, and the same speed within noise
# on an idle machine (benchmarks/bench_quant_e2e.py --busy 1, README "A shared machine"). libgomp reads the setting once, when torch loads: so only
# when we are imported before torch, and never over a setting of the user's own.
if 'torch' not in _sys.modules and not {'GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'} & set(_os.environ):
    _os.environ['GOMP_SPINCOUNT'] = '10000'

from .errors import CheckpointError, ContextLengthError, InputError  # noqa: E402


def load(model, revision=None, device=None, dtype=None, quantization_bit=None, **kwargs):
    """Load a chat model from a hub id, a hub-layout directory or a YAML configuration.

    See `modelscope_chatglm.loading.load` for every option.
    """
    from .loading import load as _load
    return _load(model, revision=revision, device=device, dtype=dtype,
                 quantization_bit=quantization_bit, **kwargs)


from .modelscope_plugin import install as _install_modelscope_plugin  # noqa: E402

_install_modelscope_plugin()

__all__ = ['load', 'CheckpointError', 'ContextLengthError', 'InputError', '__version__']
