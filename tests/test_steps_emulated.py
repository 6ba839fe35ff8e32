"""The CUDA step kernels (csrc/cuda/lstm_steps_kernels.cuh) run on the CPU.

tests/emulation/steps_emulator.cpp compiles the kernels' device code as C++ under the CUDA
emulation of tests/emulation/cuda_emulation.h (one fiber per CUDA thread, real block barriers
and warp shuffles, per-block __shared__ arrays, blocks and threads scheduled in three orders)
and launches them as lstm_steps_cuda.cu's host side does (the same vector-width choice and
grids, 256 threads). Each case is checked against a float64 reference of lstm_steps.h's
semantics: close to it, every output element written and nothing else (write-only outputs
start as NaN, inactive rows and other columns must keep their values, NaN guards around every
buffer), the same bits in every scheduling order (a difference is a race).

Covered: float and double; VEC 1 and the 16-byte width (H odd, an odd row stride, a
misaligned pointer); the forward step; the hidden-gradient and backward steps in clip modes
off / value / norm (rescaling and not), with and without sum_squares; steps without rows;
packed prev_split (rows that start from cell_initial); steps of more than 256 x 256 packed
elements (both reduction stages on 256 blocks with a grid-stride loop); the cell variants'
kernels (one block per row: layer norm, zoneout of c and h by masks and by probability,
recurrent dropout's masked h, H up to 300 > 256 threads), forward and backward in every flag
set, against their formulas. What the emulation cannot show (the hardware memory model,
timing, occupancy) is left to tests/test_cuda.py on a GPU.

Mutations checked by hand (each fails at least one case): stage 2 adding one partial too few,
or only its own block's; stage 1 storing one thread's sum instead of the block's; the shuffle
tree starting at offset 8; block_sum without its middle __syncthreads; block_sum adding the
warps' sums in arrival order (caught as a scheduling-order difference); the norm-clip finish
without its rescale, or the backward's without its second pass; the backward step without
its value clamp; the grid-stride loop running once (only the big cases catch it); a step
processing one row too many (forward, hidden gradient); an off-by-one in prev_split; no block
for a step without rows; the VEC choice ignoring the output row stride (a misaligned 16-byte
access: the emulator crashes, as the GPU would fault); for the variants, zoneout's direct
dL/dc[t-1] path dropped, the recurrent norm's backward mean taken with the input norm's
values, zoneout of c mixing in c~ instead of c[t-1]. (Stage 2 on a single block is not a bug:
its grid-stride loop covers the step.)

Needs a C++20 compiler (c++, g++ or clang++) and ucontext (Linux); skipped otherwise.
"""

from __future__ import annotations

import pytest

from conftest import assert_emulated_case_passes, build_emulator, emulator_cases


@pytest.fixture(scope="module")
def emulator():
    return build_emulator("steps_emulator", [
        "cuda/lstm_steps_kernels.cuh", "lstm_cell.h", "lstm_steps.h", "bits16.h"])


# The cases of steps_emulator.cpp (test_case_list_matches_the_binary keeps this in step).
CASES = ["emulator",
         "forward-float-vec4", "forward-float-vec1", "forward-double-vec2", "forward-double-vec1",
         "hidden-grad-float-vec4", "hidden-grad-float-vec1", "hidden-grad-double-vec2",
         "hidden-grad-double-vec1",
         "backward-float-vec4", "backward-float-vec1", "backward-double-vec2",
         "backward-double-vec1",
         "rows-0-float", "rows-0-double", "big-hidden-grad", "big-backward",
         "variants-forward-float-all", "variants-forward-double-all-eval",
         "variants-forward-float-layer-norm", "variants-forward-double-zoneout",
         "variants-backward-float-all", "variants-backward-double-all-eval",
         "variants-backward-float-layer-norm", "variants-backward-double-zoneout",
         "bits16-rounding"]


def test_case_list_matches_the_binary(emulator):
    assert emulator_cases(emulator) == CASES


@pytest.mark.parametrize("case", CASES)
def test_emulated_step_kernels(emulator, case):
    assert_emulated_case_passes(emulator, case)
