"""Host-side arithmetic of the persistent CUDA kernels, on the CPU (every build has these ops).

- `lstm_fused::persistent_plan`: units per block, blocks, warp tiles, K slices and chunks,
  shared-memory layout, and whether it fits (csrc/cuda/persistent_plan.h), for each way a
  block multiplies (`product`: FMA, TF32 or 16-bit tensor-core products);
- `lstm_fused::persistent_steps`: the kernels' walk over (packed) batch sizes;
- `lstm_fused::set_cuda_persistent` / `cuda_persistent_enabled` / `cuda_persistent_stats`:
  the switch (off unless LSTM_FUSED_CUDA_PERSISTENT=1) and the launch counters.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lstm_fused  # noqa: F401  (loads the library)
from lstm_fused import _ops  # noqa: F401

ops = torch.ops.lstm_fused

FIELDS = ["ok", "reason", "units", "blocks", "threads", "col_tiles", "row_tiles", "rows_chunk",
          "k_slices", "k_total", "k_chunk", "k_chunks", "w_rows", "w_pitch", "stage_pitch",
          "partial_cols", "region_floats", "state_floats", "stage_offset", "state_offset",
          "smem_bytes", "product", "operand_bytes"]
REASONS = {0: "none", 1: "invalid size", 2: "column tiles", 3: "shared memory",
           4: "backward batch"}
BACKWARD_MAX_BATCH = 128  # persistent_plan.h kBackwardMaxBatch
FMA, TF32, BITS16 = 0, 1, 2  # persistent::Product
K_GRANULE = {FMA: 4, TF32: 8, BITS16: 16}  # one 16-byte load of floats; K of one mma.sync
WARPS, THREADS, TILE_ROWS = 16, 512, 16
TILE_COLS = {False: 16, True: 8}  # forward 16x16 warp tiles, backward 16x8

# (SM count, opt-in shared memory per block in bytes)
H100 = (132, 232448)
A100 = (108, 166912)
SMALL = (4, 49152)


def plan(hidden, batch, device=H100, backward=False, blocks_per_sm=1, product=FMA):
    values = ops.persistent_plan(hidden, batch, device[0], device[1], blocks_per_sm, backward,
                                 product=product)
    assert len(values) == len(FIELDS)
    return dict(zip(FIELDS, values))


def check_invariants(p, hidden, batch, device, backward, blocks_per_sm=1, product=FMA):
    """Everything the kernels rely on, for a plan that fits. Pitches count values of the
    operands (floats, or 16-bit values); regions and offsets count floats."""
    sm_count, smem = device
    U, G = p["units"], p["blocks"]
    assert p["ok"] == 1 and p["reason"] == 0
    assert p["product"] == product and p["operand_bytes"] == (2 if product == BITS16 else 4)
    granule = K_GRANULE[product]
    per_float = 4 // p["operand_bytes"]
    assert p["threads"] == THREADS
    # every unit in exactly one block; the last block is not empty
    assert U >= 1 and G * U >= hidden and (G - 1) * U < hidden
    assert G <= sm_count * blocks_per_sm
    K = 4 * hidden if backward else hidden
    k_padded = -(-K // granule) * granule
    assert p["k_total"] == K
    assert p["w_rows"] == (U if backward else 4 * U)
    assert p["col_tiles"] == -(-p["w_rows"] // TILE_COLS[backward])
    assert p["partial_cols"] == p["col_tiles"] * TILE_COLS[backward]
    # the warps: one tile and one K slice each, at most WARPS of them
    assert p["row_tiles"] >= 1 and p["k_slices"] >= 1
    assert p["row_tiles"] * p["col_tiles"] * p["k_slices"] <= WARPS
    assert p["rows_chunk"] == p["row_tiles"] * TILE_ROWS
    assert p["row_tiles"] <= max(1, -(-batch // TILE_ROWS))
    # K chunks: multiples of the granule covering roundup(K, granule)
    assert p["k_chunk"] % granule == 0 and p["k_chunk"] >= granule
    assert p["k_chunks"] * p["k_chunk"] >= k_padded > (p["k_chunks"] - 1) * p["k_chunk"]
    # pitches: room for the row; rows of an odd number of 16-byte units (in floats: 4 mod 8)
    for pitch, width in ((p["w_pitch"], k_padded), (p["stage_pitch"], p["k_chunk"])):
        assert pitch >= width and pitch % per_float == 0
        assert (pitch // per_float) % 8 == 4
    # the regions: W slice, staging buffer (also the partial sums), per-row state
    assert p["stage_offset"] == p["w_rows"] * p["w_pitch"] // per_float
    assert p["region_floats"] >= p["rows_chunk"] * p["stage_pitch"] // per_float
    assert p["region_floats"] >= p["k_slices"] * p["rows_chunk"] * p["partial_cols"]
    assert p["state_offset"] == p["stage_offset"] + p["region_floats"]
    assert p["state_floats"] >= 2 * batch * U and p["state_floats"] % 4 == 0
    assert p["stage_offset"] % 4 == 0 and p["state_offset"] % 4 == 0  # 16-byte aligned
    assert p["smem_bytes"] == 4 * (p["state_offset"] + p["state_floats"])
    assert p["smem_bytes"] <= smem


HIDDEN = [1, 2, 3, 5, 8, 13, 16, 17, 31, 64, 100, 128, 255, 256, 257, 384, 512, 768, 1000,
          1023, 1024, 1280, 1536, 2048]
BATCH = [1, 2, 15, 16, 17, 64, 100, 512, 600, 4096]


@pytest.mark.parametrize("product", [FMA, TF32, BITS16], ids=["fma", "tf32", "16bit"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("device", [H100, A100, SMALL], ids=["h100", "a100", "small"])
def test_invariants_over_a_sweep(device, backward, product):
    fits = 0
    for hidden, batch in itertools.product(HIDDEN, BATCH):
        p = plan(hidden, batch, device, backward, product=product)
        if p["ok"]:
            check_invariants(p, hidden, batch, device, backward, product=product)
            fits += 1
        else:
            assert REASONS[p["reason"]] in ("column tiles", "shared memory"), (hidden, batch, p)
    assert fits > len(HIDDEN) * len(BATCH) // 3  # most of the sweep fits somewhere


def test_h100_reference_shape():
    """T=1024 B=16 H=768 (the benchmark's headline row): one chunk forward, two backward."""
    f = plan(768, 16)
    assert (f["ok"], f["units"], f["blocks"], f["col_tiles"], f["row_tiles"], f["k_slices"],
            f["k_chunks"]) == (1, 8, 96, 2, 1, 8, 1)
    b = plan(768, 16, backward=True)
    assert (b["ok"], b["units"], b["blocks"], b["col_tiles"], b["k_slices"], b["k_chunks"]) \
        == (1, 8, 96, 1, 16, 2)
    for p in (f, b):
        assert p["smem_bytes"] <= H100[1]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_fits_and_does_not_fit(backward):
    # W_hh of one direction is 16 H^2 bytes; 132 SMs x 227 KB hold about 30 MB of it
    for hidden in (256, 512, 1024, 1280):
        assert plan(hidden, 16, backward=backward)["ok"], hidden
    for hidden in (1536, 2048, 4096):
        p = plan(hidden, 16, backward=backward)
        assert not p["ok"] and REASONS[p["reason"]] == "shared memory", hidden
    # an A100 (108 SMs, 163 KB per block) holds about 17 MB: 1024 no longer fits
    assert plan(768, 16, A100, backward)["ok"]
    assert not plan(1024, 16, A100, backward)["ok"]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_16bit_operands_fit_a_larger_hidden_size(backward):
    """16-bit W_hh (8 H^2 bytes): twice the float32 weights fit, H up to about 1800 on an H100
    or H200 (132 SMs, 227 KB per block) at batch 16, against 1280 in float32."""
    for hidden in (1536, 1792):
        assert not plan(hidden, 16, backward=backward)["ok"], hidden
        p = plan(hidden, 16, backward=backward, product=BITS16)
        check_invariants(p, hidden, 16, H100, backward, product=BITS16)
    p = plan(2048, 16, backward=backward, product=BITS16)
    assert not p["ok"] and REASONS[p["reason"]] == "shared memory"
    # the headline row: the same tiles as with FMA, K in steps of 16 (TF32: 8)
    fma = plan(768, 16, backward=backward)
    for product in (TF32, BITS16):
        other = plan(768, 16, backward=backward, product=product)
        for key in ("units", "blocks", "col_tiles", "row_tiles", "k_slices", "partial_cols"):
            assert fma[key] == other[key], (product, key)
    assert plan(768, 16, backward=backward, product=BITS16)["smem_bytes"] < fma["smem_bytes"]
    # TF32 keeps float32 values in shared memory: what fits is what fits with FMA
    assert plan(1280, 16, backward=backward, product=TF32)["ok"]
    assert not plan(1536, 16, backward=backward, product=TF32)["ok"]


def test_product_must_be_known():
    with pytest.raises(RuntimeError, match="product must be 0"):
        ops.persistent_plan(16, 16, 132, 232448, 1, False, product=3)


@pytest.mark.parametrize("hidden", [999, 1000, 13, 257, 771])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_hidden_not_a_multiple_of_the_slice(hidden, backward):
    p = plan(hidden, 8, backward=backward)
    check_invariants(p, hidden, 8, H100, backward)
    last = hidden - (p["blocks"] - 1) * p["units"]
    assert 1 <= last <= p["units"]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_tiny_hidden(backward):
    for hidden in (1, 2, 3):
        p = plan(hidden, 1, backward=backward)
        check_invariants(p, hidden, 1, H100, backward)
        assert p["units"] == hidden and p["blocks"] == 1
        assert p["k_chunks"] == 1


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_units_round_up_to_fill_the_tile(backward):
    """Units are rounded up to the warp tile's width when it fits (same work, fewer blocks)."""
    p = plan(768, 16, backward=backward)
    assert p["units"] == 8  # 768 / 132 -> 6, rounded to 8 (4 units = 16 forward columns)
    # H = 1280: 10 units; rounding to 12 (forward) would not fit in shared memory
    f = plan(1280, 16)
    assert f["ok"] and f["units"] == 10 and f["blocks"] == 128


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_batch_larger_than_the_thread_budget(backward):
    """B > 512 threads: rows are processed in chunks; the state (2 B U floats) must fit."""
    for batch in (513, 600, 2048):
        p = plan(512, batch, backward=backward)
        check_invariants(p, 512, batch, H100, backward)
        assert p["rows_chunk"] < batch
    huge = plan(512, 1_000_000, backward=backward)
    assert not huge["ok"] and REASONS[huge["reason"]] == "shared memory"


def test_row_chunks_follow_the_batch():
    assert plan(256, 1)["row_tiles"] == 1
    assert plan(256, 16)["row_tiles"] == 1
    assert plan(256, 17)["row_tiles"] == 2
    p = plan(256, 64, backward=True)
    assert p["rows_chunk"] in (16, 32, 48, 64)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_more_shared_memory_never_hurts(backward):
    for hidden, batch in itertools.product((64, 768, 1280, 1536), (1, 16, 300)):
        ok = [plan(hidden, batch, (132, smem), backward)["ok"]
              for smem in (16384, 49152, 101376, 166912, 232448)]
        assert ok == sorted(ok), (hidden, batch, ok)


def test_blocks_per_sm():
    p = plan(768, 16, blocks_per_sm=2)
    check_invariants(p, 768, 16, H100, False, blocks_per_sm=2)
    one = plan(4096, 16, (2, 232448))
    assert not one["ok"]


@pytest.mark.parametrize("args", [(0, 16), (16, 0), (-1, 4)])
def test_invalid_sizes_decline(args):
    p = plan(*args)
    assert not p["ok"] and REASONS[p["reason"]] == "invalid size"
    assert not ops.persistent_plan(16, 16, 0, 232448, 1)[0]
    assert not ops.persistent_plan(16, 16, 132, 0, 1)[0]
    assert not ops.persistent_plan(16, 16, 132, 232448, 0)[0]


def test_speed_policy_declines_large_backward_batches():
    """launch_plan (policy=True): the geometry's plan, except the backward from 128 rows on,
    where the per-step path is predicted to win; the forward is not capped."""
    for batch in (1, 16, BACKWARD_MAX_BATCH - 1):
        for backward in (False, True):
            geometric = ops.persistent_plan(512, batch, *H100, 1, backward)
            assert ops.persistent_plan(512, batch, *H100, 1, backward, True) == geometric
    for batch in (BACKWARD_MAX_BATCH, 600, 4096):
        assert plan(512, batch, backward=True)["ok"]  # the kernel could run it
        capped = dict(zip(FIELDS, ops.persistent_plan(512, batch, *H100, 1, True, True)))
        assert not capped["ok"] and REASONS[capped["reason"]] == "backward batch"
        assert ops.persistent_plan(512, batch, *H100, 1, False, True)[0] == \
            plan(512, batch)["ok"]


# --- the step walker ------------------------------------------------------------------------

def expected_steps(batch_sizes, reverse, backward):
    T = len(batch_sizes)
    offsets = [sum(batch_sizes[:t]) for t in range(T)]
    out = []
    for i in range(T):
        t = T - 1 - i if reverse != backward else i
        prev = t + 1 if reverse else t - 1
        if 0 <= prev < T:
            cont, prev_off = min(batch_sizes[t], batch_sizes[prev]), offsets[prev]
        else:
            cont, prev_off = 0, 0
        out += [t, batch_sizes[t], offsets[t], cont, prev_off]
    return out


SIZES = {
    "unpacked": [4] * 6,
    "packed": [5, 5, 4, 2, 2, 2, 1],
    "one-step": [3],
    "trailing-zero": [2, 1, 0],
    "all-distinct": list(range(40, 0, -1)),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("reverse", [False, True], ids=["dir0", "dir1"])
@pytest.mark.parametrize("name", list(SIZES))
def test_step_walker(name, reverse, backward):
    sizes = SIZES[name]
    assert ops.persistent_steps(sizes, reverse, backward) == expected_steps(sizes, reverse,
                                                                              backward)


def test_step_walker_segment_limit():
    ops.persistent_steps(list(range(64, 0, -1)), False, False)  # 64 runs: the limit
    with pytest.raises(RuntimeError, match="distinct batch sizes"):
        ops.persistent_steps(list(range(65, 0, -1)), False, False)


# --- the switch -----------------------------------------------------------------------------

def test_switch_round_trip():
    before = ops.cuda_persistent_enabled()
    try:
        assert ops.set_cuda_persistent(True) == before
        assert ops.cuda_persistent_enabled()
        assert ops.set_cuda_persistent(False) is True
        assert not ops.cuda_persistent_enabled()
    finally:
        ops.set_cuda_persistent(before)


def test_switch_off_by_default(monkeypatch):
    """A fresh process without the variable has it off; with =1 on (read once, at first use)."""
    import subprocess
    import sys
    code = ("import torch, lstm_fused._ops; "
            "print(torch.ops.lstm_fused.cuda_persistent_enabled())")
    for value, want in ((None, "False"), ("1", "True"), ("0", "False")):
        env = dict(__import__("os").environ)
        env.pop("LSTM_FUSED_CUDA_PERSISTENT", None)
        if value is not None:
            env["LSTM_FUSED_CUDA_PERSISTENT"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want, (value, out.stdout)


def test_cpu_never_launches():
    """The CPU path has its own sequence kernels; the CUDA counters (launches and declines,
    forward and backward) do not move."""
    before = ops.cuda_persistent_stats()
    assert len(before) == 4
    old = ops.set_cuda_persistent(True)
    try:
        m = lstm_fused.LSTM(4, 8)
        out, _ = m(torch.randn(3, 2, 4))
        out.sum().backward()
    finally:
        ops.set_cuda_persistent(old)
    assert ops.cuda_persistent_stats() == before
