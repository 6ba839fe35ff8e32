"""The persistent CUDA kernels (csrc/cuda/lstm_persistent_kernels.cuh) run on the CPU.

tests/emulation/persistent_emulator.cpp compiles the kernels' device code as C++ under a small
CUDA emulation (one fiber per CUDA thread, real block and grid barriers, blocks and threads
scheduled in three orders) and checks each case against a float64 reference of the driver's
semantics: every output written, close to the reference, and the same bits in every
scheduling order (a difference is a race between barriers). Every case runs the float32
kernels and the tensor-core kernels (16-bit in bfloat16 and float16, and TF32), whose
mma.sync the emulation computes from the lanes' fragments as the PTX ISA lays them out. So the indexing,
the barriers and the packed-sequence walk are tested without a GPU; what the emulation cannot
show (timing, memory ordering of the real hardware, occupancy, whether the hardware's fragment
layout is the one both sides assume) is left to tests/test_cuda.py on a GPU.

Needs a C++20 compiler (c++, g++ or clang++) and ucontext (Linux); skipped otherwise.
"""

from __future__ import annotations

import pytest

from conftest import assert_emulated_case_passes, build_emulator, emulator_cases


@pytest.fixture(scope="module")
def emulator():
    return build_emulator("persistent_emulator", [
        "cuda/lstm_persistent_kernels.cuh", "cuda/persistent_plan.h", "lstm_cell.h",
        "lstm_steps.h"])


# The cases of persistent_emulator.cpp (test_case_list_matches_the_binary keeps this in step):
# each with float32 operands, then on the emulated tensor cores in bfloat16, float16 and TF32.
BASE_CASES = ["seq", "packed-reverse", "packed-forward", "odd-hidden", "batch-1", "batch-7",
              "batch-11", "row-edges", "no-grad-output", "chunks", "wide-k-chunks", "big-batch"]
CASES = [name + suffix for name in BASE_CASES for suffix in ("", "-bf16", "-fp16", "-tf32")]


def test_case_list_matches_the_binary(emulator):
    assert emulator_cases(emulator) == CASES


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernels(emulator, case):
    assert_emulated_case_passes(emulator, case)
