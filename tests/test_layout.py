"""The house in order: the package's modules import each other one way only (no import cycles), and
importing the package changes nothing in the process that imports it.

The graph is built from the installed package's source (what the tests import: CI installs the wheel),
with every import in it: at module level and inside functions alike, since an import deferred into a
function to dodge a cycle still ties the two modules together.
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys

PACKAGE = 'modelscope_chatglm'


def package_modules():
    """{module name: source path} of every module of the installed package."""
    modules = {}
    for root in importlib.util.find_spec(PACKAGE).submodule_search_locations:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            for name in sorted(files):
                if name.endswith('.py'):
                    path = os.path.join(folder, name)
                    parts = [PACKAGE] + os.path.relpath(path, root)[:-3].split(os.sep)
                    if parts[-1] == '__init__':
                        parts.pop()
                    modules['.'.join(parts)] = path
    return modules


def imported(module: str, path: str, node, modules) -> list:
    """The package's modules one import statement of `module` names. `from X import name` names X.name
    where that is a module (a submodule imported by name), else X itself."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = node.module or ''
    if node.level:
        package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    names = [f'{base}.{alias.name}' for alias in node.names]
    found = [name for name in names if name in modules]
    if len(found) < len(names) and base in modules:
        found.append(base)
    return found


def import_graph(modules) -> dict:
    """{module: {imported module: line of the first import}}, every import statement counted."""
    graph = {}
    for module, path in modules.items():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(module, path, node, modules):
                    if target != module:
                        edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return graph


def find_cycle(graph):
    """One cycle of the graph as [a, b, ..., a], or None."""
    state = {}   # module -> 'open' (on the current path) or 'done'
    path = []

    def visit(node):
        state[node] = 'open'
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 'open':
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({'a': {'b': 1}, 'b': {'c': 1}, 'c': {}}) is None
    assert find_cycle({'a': {'b': 1}, 'b': {'c': 1}, 'c': {'a': 1}, 'd': {'a': 1}}) == ['a', 'b', 'c', 'a']
    # a function-level import counts, and so does `from package import submodule`
    source = {'p.a': 'def f():\n    from . import b\n', 'p.b': 'from .a import f\n'}
    graph = {}
    for module, text in source.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(module, module + '.py', node, source):
                    graph.setdefault(module, {})[target] = node.lineno
    assert find_cycle(graph) == ['p.a', 'p.b', 'p.a']


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    assert f'{PACKAGE}.cli' in modules and f'{PACKAGE}.serve.server' in modules, sorted(modules)
    graph = import_graph(modules)
    cycle = find_cycle(graph)
    if cycle:
        steps = [f'  {a} -> {b}   ({os.path.relpath(modules[a], os.path.dirname(modules[PACKAGE]))}:{graph[a][b]})'
                 for a, b in zip(cycle, cycle[1:])]
        raise AssertionError('an import cycle: each module below imports the next\n' + '\n'.join(steps)
                             + '\nmove what both need into a module lower down, so that imports point one way')


def test_importing_the_package_changes_nothing_in_the_process():
    """No environment variable set (the OpenMP setting is for our own processes: openmp.py), and no torch
    (nor ModelScope) loaded until something is used."""
    code = ('import json, os, sys\n'
            'before = dict(os.environ)\n'
            'import modelscope_chatglm\n'
            'after = dict(os.environ)\n'
            'changed = {k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}\n'
            'print(json.dumps({"changed": changed, "loaded": [m for m in ("torch", "modelscope") if m in sys.modules]}))\n')
    for extra in ({}, {'GOMP_SPINCOUNT': '123'}, {'OMP_WAIT_POLICY': 'PASSIVE'}):
        env = {k: v for k, v in os.environ.items() if k not in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}
        out = subprocess.run([sys.executable, '-c', code], env={**env, **extra}, capture_output=True, text=True,
                             check=True, cwd='/')
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen == {'changed': {}, 'loaded': []}, (extra, seen, out.stderr[-2000:])
