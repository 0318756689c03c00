"""modelscope-chatglm: ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B chat models for ModelScope.

    import modelscope_chatglm                      # also registers the Tasks.chat pipeline
    model = modelscope_chatglm.load('ZhipuAI/chatglm3-6b', revision='master')
    response, history = model.chat('你好')

Importing this package is cheap and changes nothing in the process but ModelScope's registry (and only
once ModelScope itself is imported): the ModelScope classes load when a pipeline is first built, torch
when a model is, and the optional surfaces (server, web UI) only when used. It leaves the environment
alone: the OpenMP setting our own processes start with, and how to get it in yours, is `openmp.py`.
"""
__version__ = '0.1.0'

from .errors import CheckpointError, ContextLengthError, InputError


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
