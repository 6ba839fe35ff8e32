"""DistributedDataParallel with lstm_fused.LSTM: two CPU processes (gloo over loopback) train
on halves of each global batch and end with the parameters and gradients of single-process
training on the whole batch. Every wait is bounded, so a stuck worker fails the test instead of
hanging CI."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import lstm_fused
from lstm_fused import functional

pytestmark = [
    pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                       reason=str(functional.backend_unavailable_reason("fused"))),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8                 # split evenly: DDP's gradient mean = the global batch's mean
TEST_TIMEOUT_S = 180             # the whole run: spawning, importing torch, training
PROCESS_GROUP_TIMEOUT_S = 60     # each collective (and the rendezvous) in the workers


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = lstm_fused.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True,
                                    proj_size=3, dtype=torch.float64)
        self.head = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def _batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(GLOBAL_BATCH, 7, 4, generator=g, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def _train(model, module, rank=0, world_size=1):
    """SGD with momentum over _batches(); this rank takes its contiguous share of each batch.
    Returns (parameters, gradients of the last step) of `module` (the unwrapped model)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    for x, y in _batches():
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        opt.step()
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return params, grads


def _make_model():
    torch.manual_seed(0)
    return _Model()


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo picks its network device from the host name unless told: keep it on loopback
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux")
                          else "lo0")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    try:
        module = _make_model()
        ddp = DistributedDataParallel(module)
        result = _train(ddp, module, rank, WORLD_SIZE)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TEST_TIMEOUT_S
    try:
        # join() re-raises a worker's exception with its traceback
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TEST_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)

    module = _make_model()
    expected_params, expected_grads = _train(module, module)
    for rank in range(WORLD_SIZE):
        params, grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in expected_params:
            torch.testing.assert_close(params[name], expected_params[name], atol=1e-12,
                                       rtol=1e-10, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
            torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-12,
                                       rtol=1e-10,
                                       msg=lambda m, n=name: f"rank {rank} grad {n}: {m}")
    # the training moved the weights: the comparison is not between two untouched copies
    assert not torch.equal(expected_params["lstm.weight_hh_l1"],
                           _make_model().lstm.weight_hh_l1)
