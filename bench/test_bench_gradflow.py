"""Cost of gradient-flow recording: fused forward+backward on the CPU with and without
`record_gradient_flow` (T=100, B=32, I=H=128, one layer, float32).

    python -m pytest bench/test_bench_gradflow.py --benchmark-group-by=group

Compare the two medians of the group; the target is at most 5% extra with recording on.
Run it on an idle machine: 2-core CI machines vary by 10-20% between runs.
"""

import contextlib

import pytest
import torch

import lstm_fused
from lstm_fused.functional import backend_unavailable_reason

pytestmark = pytest.mark.skipif(backend_unavailable_reason("fused") is not None,
                                reason=str(backend_unavailable_reason("fused")))

T, B, H = 100, 32, 128


@pytest.fixture(scope="module")
def lstm_and_input():
    torch.manual_seed(0)
    return lstm_fused.LSTM(H, H), torch.randn(T, B, H)


@pytest.mark.parametrize("recording", [False, True], ids=["off", "on"])
def test_fused_fwd_bwd_gradient_flow(benchmark, lstm_and_input, recording):
    lstm, x = lstm_and_input
    benchmark.group = f"gradient flow recording, fused fwd+bwd, CPU T={T} B={B} H={H}"

    def step():
        lstm.zero_grad(set_to_none=True)
        recorder = (lstm_fused.record_gradient_flow(lstm) if recording
                    else contextlib.nullcontext())
        with recorder:
            lstm(x)[0].sum().backward()

    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
