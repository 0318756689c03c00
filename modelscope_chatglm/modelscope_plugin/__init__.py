"""How `import modelscope_chatglm` plugs into ModelScope without importing ModelScope (nor torch).

ModelScope finds a model/pipeline/preprocessor class through its AST index: before looking a name
up in a registry, it imports the module the index names for it (`LazyImportModule.import_module`).
`install()` points the index entries of our names, and of the built-in ChatGLM names we take over,
at `modelscope_chatglm.modelscope_plugin.pipeline`. That module registers the classes when
ModelScope first needs them, so importing this package stays cheap, and ModelScope's own ChatGLM
module (which breaks on transformers 5) is never imported for these names.

`install()` also puts a thin router in front of `modelscope.pipelines.pipeline` for the inputs
ModelScope cannot route by itself: our YAML configurations, and ChatGLM model directories or hub ids
whose `configuration.json` names no pipeline (ModelScope would send those to swift or transformers).
Everything else goes to ModelScope's function unchanged.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import logging
import os
import sys

PIPELINE_NAME = 'modelscope-chatglm'
PREPROCESSOR_NAME = 'modelscope-chatglm-chat'
MODEL_NAME = 'modelscope-chatglm'
# The names ModelScope's built-in ChatGLM classes use; hub configuration.json files name these.
BUILTIN_PIPELINES = ('chatglm2_6b-text-generation', 'chatglm6b-text-generation')
BUILTIN_MODELS = ('chatglm2-6b', 'chatglm6b')
TASKS = ('chat', 'text-generation')
IMPLEMENTATION = __name__ + '.pipeline'


def signatures():
    """(registry, group, name) of everything the implementation module registers."""
    for task in TASKS:
        for name in (PIPELINE_NAME,) + BUILTIN_PIPELINES:
            yield 'PIPELINES', task, name
        for name in (MODEL_NAME,) + BUILTIN_MODELS:
            yield 'MODELS', task, name
    yield 'PREPROCESSORS', 'nlp', PREPROCESSOR_NAME


def install() -> bool:
    """Register with ModelScope: now if ModelScope is imported, else the moment it is (importing it
    imports torch, a second or more: a program that never uses ModelScope does not pay for it, and the
    command line can set the OpenMP environment before torch loads). False when ModelScope is not
    installed."""
    if 'modelscope' not in sys.modules:
        try:
            if importlib.util.find_spec('modelscope') is None:
                return False
        except (ImportError, ValueError):
            return False
        _after_import('modelscope', lambda module: _register())
    else:
        _register()
    _install_router()
    return True


def _register():
    """Point the AST index entries of our names at the implementation module."""
    try:
        from modelscope.utils.ast_utils import FILE_NAME_KEY, IMPORT_KEY, INDEX_KEY, MODULE_KEY
        from modelscope.utils.import_utils import LazyImportModule
    except ImportError:
        return
    try:
        index = LazyImportModule.get_ast_index()[INDEX_KEY]
    except Exception as e:   # this runs inside the user's `import modelscope`: never break it
        logging.getLogger(__name__).warning('could not register the ChatGLM pipelines with ModelScope (%s: %s); '
                                            'pipeline(Tasks.chat, ...) will not find them', type(e).__name__, e)
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pipeline.py')
    for sig in signatures():
        index[sig] = {FILE_NAME_KEY: here, IMPORT_KEY: [], MODULE_KEY: IMPLEMENTATION}


# -- routing in front of modelscope.pipelines.pipeline -----------------------------------------------
def _install_router():
    """Wrap `modelscope.pipelines.builder.pipeline` when that module loads (now, if it already has).

    Importing `modelscope.pipelines` costs seconds (it imports transformers and datasets), so rather
    than import it here, an import hook patches the builder module right after it executes; the
    package then re-exports the wrapped function as `modelscope.pipelines.pipeline`."""
    builder = sys.modules.get('modelscope.pipelines.builder')
    if builder is not None:
        _wrap(builder)
        for name in ('modelscope.pipelines', 'modelscope'):
            module = sys.modules.get(name)
            if module is not None and 'pipeline' in vars(module):
                module.pipeline = builder.pipeline
    else:
        _after_import('modelscope.pipelines.builder', _wrap)


def _after_import(name: str, then):
    """Call then(module) right after the module `name` is first imported (once its code has run)."""
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):   # as the import system asks them
            find = getattr(finder, 'find_spec', None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module):
            execute(module)
            then(module)
        spec.loader.exec_module = exec_module
        return spec


def _wrap(builder):
    original = builder.pipeline
    if getattr(original, '__wrapped_by__', None) == __name__:
        return

    @functools.wraps(original)
    def pipeline(task=None, model=None, *args, **kwargs):
        """ModelScope's `pipeline`, plus routing of ChatGLM inputs to modelscope-chatglm."""
        if not args and kwargs.get('pipeline_name') is None and route_to_us(task, model):
            kwargs['pipeline_name'] = PIPELINE_NAME
            # ModelScope does not hand model_revision to a named pipeline; pass it on ourselves.
            if kwargs.get('model_revision') is not None:
                kwargs.setdefault('revision', kwargs['model_revision'])
        return original(task, model, *args, **kwargs)

    pipeline.__wrapped_by__ = __name__
    builder.pipeline = pipeline


def route_to_us(task, model) -> bool:
    if task not in (None,) + TASKS or not isinstance(model, str):
        return False
    from .. import yaml_configs
    try:
        if yaml_configs.find(model):
            return True
    except FileNotFoundError:
        return True   # a .yaml path that does not exist: our pipeline reports it clearly
    if os.path.isdir(model):
        return _is_chatglm_dir(model)
    if not os.path.exists(model) and model.count('/') == 1:
        return 'chatglm' in model.lower()   # hub ids such as ZhipuAI/chatglm3-6b
    return False


def _is_chatglm_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            if json.load(f).get('model_type') != 'chatglm':
                return False
    except (OSError, ValueError):
        return False
    try:   # respect a configuration.json that names some other pipeline
        with open(os.path.join(path, 'configuration.json'), encoding='utf-8') as f:
            named = (json.load(f).get('pipeline') or {}).get('type')
    except (OSError, ValueError, AttributeError):
        named = None
    return named in (None, PIPELINE_NAME) + BUILTIN_PIPELINES
