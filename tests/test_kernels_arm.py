"""The aarch64 NEON kernels (quantization/kernels/: vec.h's 4-lane vf, x8_neon.c), where no Arm machine is at
hand. A C harness (kernels_arm_harness.c) that holds every kernel to its scalar reference, as
test_quantization.py and test_attention.py hold the x86 builds, is cross-compiled with the library's own
flags (build.harness_flags) for Armv8.2-A with dotprod and for plain Armv8-A, linked statically, and run
under qemu-aarch64 on a CPU model with those features and no more: Neoverse N1, and Cortex-A53, where one
`sdot` in the plain build would be an illegal instruction.

Needs Debian's gcc-aarch64-linux-gnu and qemu-user: without them these tests skip, unless
$CHATGLM_REQUIRE_ARM=1 (.ci/run sets it and installs both). On an Arm machine the native build is a NEON
build, and the other tests run it as they run x86's.
"""
import os
import re
import shutil
import subprocess

import pytest

from conftest import missing_optional
from modelscope_chatglm.quantization import build

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels_arm_harness.c')
# -march -> the qemu CPU that runs it: one with the build's features and no more
QEMU_CPU = {'armv8.2-a+dotprod': 'neoverse-n1', 'armv8-a': 'cortex-a53'}
# The checks the harness made when it was written (shapes x kernels, rows, threads, NaN, attention): fewer
# would mean part of it no longer runs.
LEAST_CHECKS = 500


@pytest.fixture(scope='module')
def arm_tools():
    cc, qemu = build.find_cross_compiler(), shutil.which('qemu-aarch64')
    missing = [what for what, found in (('aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)', cc),
                                        ('qemu-aarch64 (apt-get install qemu-user)', qemu)) if not found]
    if missing:
        missing_optional(f'no {" and no ".join(missing)}: the Arm NEON kernels cannot be built and run here',
                         'CHATGLM_REQUIRE_ARM')
    return cc, qemu


@pytest.fixture(scope='module', params=list(build.ARM_VARIANTS))
def harness(request, arm_tools, tmp_path_factory):
    """(-march, the harness built for it, whether it has OpenMP threads)."""
    march, (cc, _) = request.param, arm_tools
    target = str(tmp_path_factory.mktemp('arm') / 'harness')
    try:
        build.build_harness(HARNESS, target, march, cc)
        return march, target, True
    except RuntimeError as e:   # no cross libgomp: the kernels single-threaded, as the library falls back
        if 'gomp' not in str(e) and 'omp.h' not in str(e):
            raise
    build.build_harness(HARNESS, target, march, cc, openmp=False)
    return march, target, False


def run_harness(path, cpu):
    proc = subprocess.run([shutil.which('qemu-aarch64'), '-cpu', cpu, path], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_neon_kernels_equal_the_scalar_reference_under_qemu(harness):
    """int8 activations: the reference's bits; exact, head and attention kernels: within fp32 rounding;
    every kernel: a row's bits independent of the other rows and of the threads, NaN let through (the
    harness's top comment lists what it checks)."""
    march, path, openmp = harness
    code, out, err = run_harness(path, QEMU_CPU[march])
    assert out.startswith(f'isa {build.ARM_VARIANTS[march]} openmp {int(openmp)}\n'), (out[:300], err[-2000:])
    failures = [line for line in out.splitlines() if line.startswith('FAIL')]
    assert not failures, '\n'.join(failures[:40])
    summary = re.search(r'^passed (\d+) of (\d+) checks$', out, re.M)
    assert code == 0 and summary and summary[1] == summary[2], (code, out[-3000:], err[-2000:])
    assert int(summary[2]) >= LEAST_CHECKS, out


def test_only_the_dotprod_build_multiplies_with_sdot(harness):
    """The dotprod build's int8-activation kernels use `sdot` (so the test above ran it); the plain build
    has none (Cortex-A53 would also refuse it)."""
    march, path, _ = harness
    objdump = shutil.which('aarch64-linux-gnu-objdump')   # binutils-aarch64-linux-gnu, with the cross gcc
    if objdump is None:
        missing_optional('no aarch64-linux-gnu-objdump (apt-get install binutils-aarch64-linux-gnu): which '
                         'instructions each build holds cannot be checked', 'CHATGLM_REQUIRE_ARM')
    code = subprocess.run([objdump, '-d', path], capture_output=True, text=True, timeout=300).stdout
    sdot = len(re.findall(r'\tsdot\t', code))
    assert (sdot > 0) == ('dotprod' in march), sdot
