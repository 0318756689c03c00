"""How `import modelscope_chatglm` plugs into ModelScope without importing ModelScope's pipelines.

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
import importlib.machinery
import json
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
    """Register with ModelScope (lazily). False when ModelScope is not installed."""
    try:
        from modelscope.utils.ast_utils import FILE_NAME_KEY, IMPORT_KEY, INDEX_KEY, MODULE_KEY
        from modelscope.utils.import_utils import LazyImportModule
    except ImportError:
        return False
    index = LazyImportModule.get_ast_index()[INDEX_KEY]
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pipeline.py')
    for sig in signatures():
        index[sig] = {FILE_NAME_KEY: here, IMPORT_KEY: [], MODULE_KEY: IMPLEMENTATION}
    _install_router()
    return True


# -- routing in front of modelscope.pipelines.pipeline -----------------------------------------------
def _install_router():
    """Wrap `modelscope.pipelines.builder.pipeline` when that module loads (now, if it already has).

    Importing `modelscope.pipelines` costs seconds (it imports transformers and datasets), so rather
    than import it here, a meta-path hook patches the builder module right after it executes; the
    package then re-exports the wrapped function as `modelscope.pipelines.pipeline`."""
    builder = sys.modules.get('modelscope.pipelines.builder')
    if builder is not None:
        _wrap(builder)
        for name in ('modelscope.pipelines', 'modelscope'):
            module = sys.modules.get(name)
            if module is not None and 'pipeline' in vars(module):
                module.pipeline = builder.pipeline
    elif not any(isinstance(f, _WrapBuilderOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapBuilderOnImport())


class _WrapBuilderOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != 'modelscope.pipelines.builder':
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _wrap(module)
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
