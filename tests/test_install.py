"""What users install is what we test: the package the tests import, the wheel's contents, and what
happens when a file the code needs at run time is missing anyway.

.ci/run builds the wheel, installs it (not editable) and runs pytest from outside the checkout with
CHATGLM_REQUIRE_INSTALLED=1 and CHATGLM_WHEEL set; run by hand against the checkout, the first two
tests skip.
"""
import logging
import os
import zipfile

import pytest

import modelscope_chatglm
from modelscope_chatglm.quantization import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_PACKAGE = os.path.join(ROOT, 'modelscope_chatglm')


def test_the_tests_import_the_installed_package():
    where = os.path.dirname(os.path.realpath(modelscope_chatglm.__file__))
    from_checkout = where == os.path.realpath(SOURCE_PACKAGE)    # (the venv may live inside the checkout)
    if os.environ.get('CHATGLM_REQUIRE_INSTALLED') != '1':
        pytest.skip(f'running against {where} (.ci/run tests the installed wheel)')
    assert not from_checkout, f'modelscope_chatglm was imported from the checkout ({where}), not the installed wheel'


def source_data_files():
    """Every file of the source package that is not Python, as it lands in the wheel. The YAML
    configurations live at the top of the repository and ship as modelscope_chatglm/configuration/."""
    files = set()
    for folder, dirs, names in os.walk(SOURCE_PACKAGE):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        for name in names:
            if not name.endswith(('.py', '.pyc')):
                files.add(os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, '/'))
    for name in os.listdir(os.path.join(ROOT, 'configuration')):
        files.add(f'modelscope_chatglm/configuration/{name}')
    return files


def test_the_wheel_holds_every_file_the_code_opens():
    wheel = os.environ.get('CHATGLM_WHEEL')
    if not wheel:
        pytest.skip('no wheel given (.ci/run builds one and sets CHATGLM_WHEEL)')
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = source_data_files()
    # The files the code opens by path, named here so that the walk above cannot silently miss them.
    assert {'modelscope_chatglm/quantization/kernels/quant_kernels.c',
            'modelscope_chatglm/quantization/kernels/common.h',   # the parts it #includes: .c and .h
            'modelscope_chatglm/quantization/kernels/reference.c',
            'modelscope_chatglm/modelscope_plugin/configuration.json',
            'modelscope_chatglm/configuration/chatglm3-6b.yaml'} <= needed
    assert needed - shipped == set(), f'{wheel} lacks files the code opens at run time'
    # ...and the installed package has them where the code looks.
    installed = os.path.dirname(os.path.dirname(os.path.abspath(modelscope_chatglm.__file__)))
    assert os.path.isfile(build.SOURCE) and os.path.commonpath([build.SOURCE, installed]) == installed
    assert all(os.path.isfile(os.path.join(installed, f)) for f in needed)


def test_a_missing_kernel_source_is_one_clear_warning_not_an_error(monkeypatch, tmp_path, caplog):
    """A broken install (the C source missing) must not raise on the first quantized forward and
    then silently run the slow path: every call gets None, and the user one warning with the fix."""
    monkeypatch.setattr(build, 'SOURCE', str(tmp_path / 'missing' / 'quant_kernels.c'))
    monkeypatch.setitem(build._state, 'loaded', False)
    monkeypatch.setitem(build._state, 'lib', None)
    monkeypatch.setenv('MODELSCOPE_CHATGLM_KERNEL_CACHE', str(tmp_path / 'cache'))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.load_library() is None
        assert build.load_library() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert 'FileNotFoundError' in warnings[0] and 'missing/quant_kernels.c' in warnings[0]
