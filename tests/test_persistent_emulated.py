"""The persistent CUDA kernels (csrc/cuda/lstm_persistent_kernels.cuh) run on the CPU.

tests/emulation/persistent_emulator.cpp compiles the kernels' device code as C++ under a small
CUDA emulation (one fiber per CUDA thread, real block and grid barriers, blocks and threads
scheduled in three orders) and checks each case against a float64 reference of the driver's
semantics: every output written, close to the reference, and the same bits in every
scheduling order (a difference is a race between barriers). So the indexing, the barriers and
the packed-sequence walk are tested without a GPU; what the emulation cannot show (timing,
memory ordering of the real hardware, occupancy) is left to tests/test_cuda.py on a GPU.

Needs a C++20 compiler (c++, g++ or clang++) and ucontext (Linux); skipped otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "emulation")
SOURCES = [
    os.path.join(EMULATION, "persistent_emulator.cpp"),
    os.path.join(EMULATION, "cuda_emulation.h"),
    os.path.join(ROOT, "csrc", "cuda", "lstm_persistent_kernels.cuh"),
    os.path.join(ROOT, "csrc", "cuda", "persistent_plan.h"),
    os.path.join(ROOT, "csrc", "lstm_cell.h"),
    os.path.join(ROOT, "csrc", "lstm_steps.h"),
]


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def emulator():
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator uses ucontext fibers (Linux)")
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(cxx.encode())
    exe = os.path.join(tempfile.gettempdir(),
                       f"lstm_fused_persistent_emulator_{digest.hexdigest()[:16]}")
    if not os.path.exists(exe):
        tmp = exe + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas",
               "-I", os.path.join(ROOT, "csrc"), "-I", EMULATION, SOURCES[0], "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"emulator does not compile:\n{res.stderr[-4000:]}"
        os.replace(tmp, exe)
    return exe


# The cases of persistent_emulator.cpp (test_case_list_matches_the_binary keeps this in step).
CASES = ["seq", "packed-reverse", "packed-forward", "odd-hidden", "batch-1", "batch-7", "batch-11", "row-edges",
         "no-grad-output", "chunks", "wide-k-chunks", "big-batch"]


def test_case_list_matches_the_binary(emulator):
    out = subprocess.run([emulator, "--list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.split() == CASES


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernels(emulator, case):
    res = subprocess.run([emulator, case], capture_output=True, text=True, timeout=300)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines and lines[-1].startswith("PASS"), \
        res.stdout[-3000:] + res.stderr[-3000:]
