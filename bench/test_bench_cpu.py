"""CPU speed of lstm_fused.LSTM against torch.nn.LSTM (oneDNN) on the benchmark grid of
lstm_fused.benchmarking (the grid `python -m lstm_fused bench` times), forward (inference)
and forward+backward (a training step).

    python -m pytest bench/test_bench_cpu.py --benchmark-group-by=group

Each group holds one shape and mode, so pytest-benchmark shows the two implementations side
by side. Not part of the test suite (testpaths is tests/). The two are not interleaved here:
on a busy or 2-core machine prefer `python -m lstm_fused bench`, which is.
"""

import pytest

from lstm_fused import benchmarking
from lstm_fused.functional import backend_unavailable_reason

pytestmark = pytest.mark.skipif(backend_unavailable_reason("fused") is not None,
                                reason=str(backend_unavailable_reason("fused")))


@pytest.mark.parametrize("impl", benchmarking.IMPLS)
@pytest.mark.parametrize("case,mode", [(case, mode) for case in benchmarking.CPU_GRID
                                       for mode in case.modes],
                         ids=lambda v: v.name if isinstance(v, benchmarking.BenchCase) else v)
def test_lstm_cpu(benchmark, case, impl, mode):
    workload = benchmarking.make_workloads(case, mode, "cpu", impls=(impl,))[impl]
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(case=case.name, impl=impl, mode=mode,
                                useful_gflop=case.useful_flops(mode) / 1e9)
    benchmark.pedantic(workload, warmup_rounds=2, rounds=10)
