"""Our dealings with the OpenMP runtime (libgomp: torch's, which our CPU kernels share): the setting our
own processes start with (idle spinning shortened), and ending a thread's idle workers (`release_workers`).

**The setting.** libgomp keeps an idle thread spinning for 300,000 rounds after each parallel region.
On a machine where another process is busy, that spinning takes the core from the thread that still has
work, and decode slows down by about a third; on an idle machine the short spin costs nothing (numbers:
benchmarks/README.md, "Design choices" and "A shared machine"). libgomp reads the setting once, when it loads with
torch, so it must be in the environment before `import torch`.

The processes we start set it, before anything imports torch: the `modelscope-chatglm` command (and so
the server and the web page it runs; `cli.main`), each Ray Serve replica (its worker process starts with
it: `ray_app.app`), and the benchmark scripts that measure what those processes get. Never over a
setting of the user's own (GOMP_SPINCOUNT or OMP_WAIT_POLICY).

`import modelscope_chatglm` changes nothing in the environment: a library does not retune the OpenMP
runtime of the program that imports it. To get the same in a program of your own, start it with
`GOMP_SPINCOUNT=10000` in the environment, or set `os.environ['GOMP_SPINCOUNT'] = '10000'` before the
first `import torch` (later it has no effect).
"""
from __future__ import annotations

import ctypes
import os
from typing import Dict, Mapping, Optional

SPIN_COUNT = '10000'
# What a user may have set: either decides libgomp's spinning, and then we leave both alone.
USER_SETTINGS = ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')


# -- the setting our processes start with --------------------------------------------------------------
def environment(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The OpenMP variables a process of ours starts with, given the environment it comes from (default:
    this process's): the user's own GOMP_SPINCOUNT / OMP_WAIT_POLICY where either is set, else
    GOMP_SPINCOUNT=10000."""
    environ = os.environ if environ is None else environ
    own = {name: environ[name] for name in USER_SETTINGS if name in environ}
    return own or {'GOMP_SPINCOUNT': SPIN_COUNT}


def set_for_this_process() -> None:
    """Put `environment()` into this process's environment (a no-op where the user set either variable).
    Call it before torch is imported; the processes this one starts inherit it."""
    os.environ.update(environment())


# -- a thread's idle workers ------------------------------------------------------------------------------
def release_workers() -> bool:
    """End the OpenMP worker threads that the calling thread started (loading a model runs parallel
    torch ops); -> whether a runtime did.

    libgomp keeps one pool of workers per thread that ran a parallel region. Once it manages more
    threads than there are CPUs (the loading thread's idle pool beside the engine thread's), its workers
    stop spinning between parallel regions and sleep, and every region waits for them to wake (a
    ChatGLM2-6B int4 decode step on 2 cores: benchmarks/bench_scheduler.py). Nothing breaks if the
    thread runs parallel code again: it starts a new pool."""
    try:   # the libgomp this process has loaded (torch's copy, which the kernels share)
        with open('/proc/self/maps', encoding='utf-8', errors='replace') as maps:
            paths = {line.split()[-1] for line in maps if '/libgomp' in line}
    except OSError:
        return False
    released = False
    for path in paths:
        try:
            released |= ctypes.CDLL(path).omp_pause_resource_all(2) == 0   # omp_pause_hard
        except (OSError, AttributeError):   # a libgomp older than OpenMP 5.0
            pass
    return released
