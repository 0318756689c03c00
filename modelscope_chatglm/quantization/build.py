"""Compile the C kernels on first use, cache the library, load it with ctypes.

- The library is built with the machine's compiler for the machine's CPU (`-O3 -march=native
  -fopenmp`), into a per-user cache dir ($MODELSCOPE_CHATGLM_KERNEL_CACHE, else
  $XDG_CACHE_HOME/modelscope_chatglm/kernels, else ~/.cache/...). It is one compile of one file,
  kernels/quant_kernels.c, which #includes the other parts of kernels/ (its top comment is the map).
  The library's file name carries a hash of every source file there, the flags, the compiler's
  version and the CPU, so a valid cached library is loaded as is and a changed part, compiler or CPU
  gets its own build.
- The compiler writes to a temporary file that is renamed into place: two processes compiling at
  once both succeed, and nobody ever loads a half-written library.
- Loading a library runs its code, so the cache must be ours alone: a cache dir is created 0700 and
  refused (one warning, then the next candidate) unless it is a real directory owned by this user that
  nobody else can write. Each library's size and SHA-256 are recorded next to it when it is built, and
  a library is only loaded when they match: a truncated or altered file is rebuilt, never dlopen'ed.
- A read-only or refused cache dir falls back to a private dir under $TMPDIR; a compiler without
  OpenMP gets a single-threaded build; no compiler at all returns None, and the caller falls back to
  torch with one clear warning.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from typing import List, Optional

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels', 'quant_kernels.c')   # the unity file
_lock = threading.Lock()
_state = {'loaded': False, 'lib': None}


def cache_dir() -> str:
    explicit = os.environ.get('MODELSCOPE_CHATGLM_KERNEL_CACHE')
    if explicit:
        return explicit
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'modelscope_chatglm', 'kernels')


def find_compiler() -> Optional[str]:
    for name in (os.environ.get('CC'), 'gcc', 'cc', 'clang'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags (a -march=native build is only valid on the same CPU)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags', 'Features'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, '--version'], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cc


def compile_flags(openmp: bool, march: str = 'native') -> List[str]:
    # -ffp-contract=off: a * b + c stays two roundings, as torch computes it (GCC's -std=c11 already
    # implies it; clang, macOS's cc, fuses by default).
    flags = ['-O3', f'-march={march}', '-fPIC', '-shared', '-std=c11', '-ffp-contract=off']
    if openmp:
        flags += ['-Xpreprocessor', '-fopenmp', '-lomp'] if sys.platform == 'darwin' else ['-fopenmp']
    return flags + ['-lm']   # fmaf: a call into libm where the CPU has no fused multiply-add


# The aarch64 builds, by -march: the KERNEL_ISA each gives (kernels/common.h). An Arm machine needs none of
# this: its -march=native build is one of them (dotprod where the CPU has it). The tests cross-compile both
# to run them under qemu on x86 (tests/test_kernels_arm.py).
ARM_VARIANTS = {'armv8.2-a+dotprod': 'neon-dotprod', 'armv8-a': 'neon'}


def find_cross_compiler(triple: str = 'aarch64-linux-gnu') -> Optional[str]:
    """`<triple>-gcc` on PATH (Debian: apt-get install gcc-aarch64-linux-gnu), or None."""
    return shutil.which(f'{triple}-gcc')


def harness_flags(openmp: bool, march: str) -> List[str]:
    """The library's flags (compile_flags) for a program that #includes the kernels, linked statically: the
    same code generation (-O3, -march, and -ffp-contract=off, which keeps the compiler from fusing a * b + c), so
    it runs the code the library would; static, so that qemu-user needs no libraries of the target."""
    return [f for f in compile_flags(openmp, march) if f not in ('-fPIC', '-shared')] + ['-static']


def build_harness(source: str, target: str, march: str, cc: str, openmp: bool = True) -> None:
    """Compile `source`, a C program that #includes "quant_kernels.c", into the executable `target` with `cc`
    (a cross compiler too): how the tests run the kernels of an instruction set this machine lacks.
    RuntimeError with the compiler's message when it fails."""
    proc = subprocess.run([cc, source, '-I', os.path.dirname(SOURCE), *harness_flags(openmp, march), '-o', target],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:] or f'{cc} exited with {proc.returncode}')


def _sources() -> bytes:
    """SOURCE and every other .c and .h beside it (the parts it #includes), names and contents: what the
    build reads, so that editing any part changes the library's name. FileNotFoundError without SOURCE."""
    with open(SOURCE, 'rb') as f:
        parts = [b'', f.read()]
    folder = os.path.dirname(SOURCE)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(('.c', '.h')) and path != SOURCE and os.path.isfile(path):
            with open(path, 'rb') as f:
                parts += [name.encode(), f.read()]
    return b'\0'.join(parts)


def library_path(cc: str, openmp: bool, directory: str, march: str = 'native') -> str:
    key = hashlib.sha256(b'\0'.join([_sources(), ' '.join(compile_flags(openmp, march)).encode(),
                                     _compiler_version(cc).encode(), _cpu_signature().encode()]))
    suffix = ('' if openmp else '-serial') + ('' if march == 'native' else f'-{march}')
    return os.path.join(directory, f'quant_kernels-{key.hexdigest()[:16]}{suffix}.so')


def private_dir(path: str) -> str:
    """`path`, created 0700 if missing; PermissionError unless it is a real directory owned by this
    user that nobody else can write (a library planted there would run as us)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f'{path} is not a directory (a symbolic link?)')
    if hasattr(os, 'getuid') and st.st_uid != os.getuid():
        raise PermissionError(f'{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})')
    if st.st_mode & 0o022:
        raise PermissionError(f'{path} is writable by others (mode {oct(st.st_mode & 0o777)})')
    return path


def _writable_dirs():
    """The cache dir, then a private dir under $TMPDIR: each one that is ours and writable, in turn."""
    candidates = (cache_dir(), os.path.join(tempfile.gettempdir(), f'modelscope_chatglm-kernels-{os.getuid()}'))
    found = False
    for d in candidates:
        try:
            private_dir(d)
            probe = tempfile.NamedTemporaryFile(dir=d, delete=True)
            probe.close()
        except PermissionError as e:
            logger.warning('not using %s for the compiled kernels: %s. Remove it, or point '
                           '$MODELSCOPE_CHATGLM_KERNEL_CACHE at a directory of your own (mode 700).', d, e)
            continue
        except OSError:
            logger.info('kernel cache dir %s is not writable; trying the next one', d)
            continue
        found = True
        yield d
    if not found:
        raise OSError(f'no private, writable directory for the compiled kernels among {list(candidates)}')


def _disk_full(error: BaseException) -> bool:
    """Whether a build failed for want of room to write it (a full or over-quota disk), not for the code."""
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        'No space left on device' in str(error) or 'Disk quota exceeded' in str(error)


def _digest(path: str) -> str:
    with open(path, 'rb') as f:
        data = f.read()
    return f'{len(data)} {hashlib.sha256(data).hexdigest()}'


def _first_error(compiler_output: str) -> str:
    """The line of a compiler's output that names the problem (its last line is often a caret)."""
    lines = [line.strip() for line in compiler_output.splitlines() if line.strip()]
    return next((line for line in lines if 'error' in line), lines[-1] if lines else 'no output')


def _compile(cc: str, openmp: bool, target: str, march: str = 'native') -> None:
    """Compile into a temporary file next to `target`, record its size and digest, then rename both
    into place atomically."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix='.build-', suffix='.so')
    os.close(fd)
    record = tmp + '.sha256'
    try:
        proc = subprocess.run([cc, SOURCE, *compile_flags(openmp, march), '-o', tmp], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-2000:] or f'{cc} exited with {proc.returncode}')
        with open(record, 'w') as f:
            f.write(_digest(tmp))
        os.replace(record, target + '.sha256')
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, record):
            if os.path.exists(leftover):
                os.remove(leftover)


def _verified(path: str) -> bool:
    """The library is ours (a regular file we own, that nobody else can write) and has the size and
    digest recorded when it was built."""
    try:
        st = os.lstat(path)
        with open(path + '.sha256') as f:
            recorded = f.read().strip()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022 or (hasattr(os, 'getuid') and st.st_uid != os.getuid()):
        return False
    return _digest(path) == recorded


def _try_load(path: str):
    if not _verified(path):
        logger.warning('the cached kernel library %s does not match the size and digest recorded when it was '
                       'built (a crash while writing it, a full disk, or tampering); rebuilding it', path)
        return None
    try:
        return _declare(ctypes.CDLL(path))
    except OSError:
        return None


def load_library():
    """The compiled kernel library (a ctypes.CDLL), or None when it cannot be built here.
    Called on every quantized forward: after the first call it is a dict lookup, no lock."""
    if _state['loaded']:
        return _state['lib']
    with _lock:
        if _state['loaded']:
            return _state['lib']
        try:
            _state['lib'] = _build_and_load()
        except Exception as e:   # whatever it was, say so once: later calls must not fail silently
            logger.warning('the CPU kernels could not be built or loaded (%s: %s); quantized layers (and the LM '
                           'head of a decode step) run on the slower pure-torch path. Check that %s exists (reinstall the package if not) and that '
                           '$MODELSCOPE_CHATGLM_KERNEL_CACHE or ~/.cache is writable.', type(e).__name__, e, SOURCE)
            _state['lib'] = None
        _state['loaded'] = True
        return _state['lib']


def build_variant(march: str, directory: str, openmp: bool = True):
    """The kernels compiled for `march` (e.g. 'x86-64-v3' for AVX2, 'x86-64' for the scalar code) into
    `directory`: how the tests reach the instruction-set branches this CPU would not pick."""
    cc = find_compiler()
    if cc is None:
        raise RuntimeError('no C compiler found')
    path = library_path(cc, openmp, private_dir(directory), march)
    if not (os.path.exists(path) and _verified(path)):
        _compile(cc, openmp, path, march)
    return _declare(ctypes.CDLL(path))


def use_library(lib) -> None:
    """From now on, load_library() in this process returns `lib`: how the benchmarks run another
    instruction set's build (build_variant) on this CPU, or the library with its calls timed."""
    with _lock:
        _state.update(lib=lib, loaded=True)


def _build_and_load():
    if os.environ.get('MODELSCOPE_CHATGLM_NO_KERNELS') == '1':
        return None
    cc = find_compiler()
    if cc is None:
        logger.warning('no C compiler found (gcc/cc/clang on PATH, or $CC): quantized layers run on the '
                       'slower pure-torch path. Install gcc (e.g. apt-get install gcc) for the fast CPU kernels.')
        return None
    for directory in _writable_dirs():
        lib = _build_in(cc, directory)
        if lib is not _FULL:
            return lib
        logger.warning('no room to write the compiled kernels in %s (disk full?); building them in a private '
                       'directory under $TMPDIR instead', directory)
    return None


_FULL = object()   # _build_in's answer when the directory's disk had no room


def _build_in(cc: str, directory: str):
    for openmp in (True, False):
        path = library_path(cc, openmp, directory)
        if os.path.exists(path):
            lib = _try_load(path)
            if lib is not None:
                return lib
        try:
            _compile(cc, openmp, path)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            if _disk_full(e):
                return _FULL
            if openmp:
                logger.warning('compiling the CPU kernels with OpenMP failed (%s); building them '
                               'single-threaded', _first_error(str(e)))
                continue
            logger.warning('compiling the CPU kernels failed: %s\nquantized layers run on the slower '
                           'pure-torch path', e)
            return None
        lib = _try_load(path)
        if lib is not None:
            logger.info('compiled the CPU kernels (%s) into %s', lib.isa, path)
            return lib
    return None


class X8Linear(ctypes.Structure):
    """kernels/block_ops.c's x8_linear: one QuantizedLinear with int8 activations."""
    _fields_ = [('w', ctypes.c_void_p), ('scale', ctypes.c_void_p), ('bias', ctypes.c_void_p),
                ('out', ctypes.c_int), ('in_', ctypes.c_int), ('lanes', ctypes.c_int)]


class GLM2Layer(ctypes.Structure):
    """kernels/block_ops.c's glm2_layer: what glm2_layers reads of a GLMBlock.
    (The same fields in the same order; tests/test_block_ops.py compares the sizes.)"""
    _fields_ = [('bits', ctypes.c_int), ('bf16', ctypes.c_int), ('heads', ctypes.c_int), ('kv_heads', ctypes.c_int),
                ('head_dim', ctypes.c_int), ('eps1', ctypes.c_float), ('eps2', ctypes.c_float),
                ('scale', ctypes.c_float), ('norm1', ctypes.c_void_p), ('norm2', ctypes.c_void_p),
                ('qkv', X8Linear), ('dense', X8Linear), ('up', X8Linear), ('down', X8Linear)]


def _declare(lib):
    """argtypes for every exported function (ctypes then converts ints and pointers for us)."""
    p, i = ctypes.c_void_p, ctypes.c_int
    variants = ('', '_x8', '_xbf16')   # fp32 x, int8-quantized x, bf16 x
    for name in [f'q{bits}_gemv{v}' for bits in (8, 4)
                 for v in variants + ('_x8_lanes', '_x8_bf16', '_x8_lanes_bf16')]:
        getattr(lib, name).argtypes = [p, i, i, p, p, p, p, i, i]
        getattr(lib, name).restype = None
    lib.x8_relayout_weights.argtypes = [p, i, i, i, i, i]
    lib.x8_relayout_weights.restype = ctypes.c_int
    for name in [f'q{bits}_gemv{v}_ref' for bits in (8, 4) for v in variants]:
        getattr(lib, name).argtypes = [p, i, i, p, p, p, p, i]
        getattr(lib, name).restype = None
    for name in ('q8_dequant_rows_f32', 'q8_dequant_rows_bf16', 'q4_dequant_rows_f32', 'q4_dequant_rows_bf16'):
        getattr(lib, name).argtypes = [p, p, i, i, i, p, i]
        getattr(lib, name).restype = None
    for name in ('f32_gemv', 'bf16_gemv', 'f16_gemv'):
        getattr(lib, name).argtypes = [p, i, i, p, p, p, i, i]
        getattr(lib, name).restype = None
        getattr(lib, name + '_ref').argtypes = [p, i, i, p, p, p, i]
        getattr(lib, name + '_ref').restype = None
    lg, f = ctypes.c_long, ctypes.c_float
    paged = [p, lg, i, p, p, p, p, p, p, p, lg, i, i, i, f, p]   # see kernels/attention.c, "attention over paged K/V"
    for name in ('attend_f32', 'attend_bf16'):
        getattr(lib, name).argtypes = paged + [i]
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name + '_ref').argtypes = paged
        getattr(lib, name + '_ref').restype = ctypes.c_int
    for name in ('rms_norm_f32', 'rms_norm_bf16'):   # kernels/block_ops.c
        getattr(lib, name).argtypes = [p, lg, i, i, p, f, p, lg, i]
        getattr(lib, name).restype = None
    for name in ('rotary_f32', 'rotary_bf16'):
        getattr(lib, name).argtypes = [p, lg, i, i, i, p, p, i]
        getattr(lib, name).restype = None
    for name in ('swiglu_f32', 'swiglu_bf16'):
        getattr(lib, name).argtypes = [p, i, i, p, i]
        getattr(lib, name).restype = None
        getattr(lib, name + '_ref').argtypes = [p, i, i, p]
        getattr(lib, name + '_ref').restype = None
    # every GLM2/3 block of a forward in one call (block_ops.c)
    lib.glm2_layers.argtypes = [ctypes.POINTER(GLM2Layer), i, p, i, p, p, i, i, p, p, p, p, p, p, p, lg, lg, p, p, i]
    lib.glm2_layers.restype = ctypes.c_int
    lib.glm2_layer_bytes.restype = ctypes.c_size_t
    lib.kernel_isa.restype = ctypes.c_char_p
    lib.kernel_openmp.restype = ctypes.c_int
    lib.isa = lib.kernel_isa().decode()   # the SIMD branch compiled in: 'avx512-vnni-bf16', ..., 'scalar'
    return lib
