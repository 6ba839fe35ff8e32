"""lstm_fused.LSTM inside real training stacks: autocast, torch.compile (inductor, dynamic
lengths, packed input), serialization and dtype conversion, concurrent threads, bad input.

Error cases already covered by test_module.py (not repeated here): hx on another device or
dtype, int input, wrong number of hx tensors (unpacked input), wrong hx shapes, empty batch,
packed sequences with a wrong hx batch."""

from __future__ import annotations

import copy
import io
import math
import operator
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

import lstm_fused
from lstm_fused import functional
from conftest import (TOL, assert_same_structure, compare_modules, make_input, make_pair,
                      requires_cuda, run_and_grad)

requires_fused = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                    reason=str(functional.backend_unavailable_reason("fused")))

I, H = 3, 5  # input and hidden size of the small models

# 16-bit against another implementation in the same dtype: outputs and gradients
TOL_16 = {
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


class _Autocast(nn.Module):
    """Runs the wrapped module's forward under torch.autocast (the backward runs outside, as
    in a training loop), so conftest's compare_modules can drive both modules."""

    def __init__(self, m, device_type, dtype):
        super().__init__()
        self.m, self.device_type, self.dtype = m, device_type, dtype

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.m(*args)


def _leaf(*shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device) \
        .requires_grad_()


# --- autocast --------------------------------------------------------------------------------
#
# nn.LSTM under CPU autocast (torch 2.14, checked empirically): aten::lstm itself is not on the
# autocast list; its oneDNN path (float32/bfloat16, unpacked, no projection) runs
# aten::mkldnn_rnn_layer, which is, so input, hx, cx and weights are cast to the autocast dtype
# and output, hy, cy come back in it; gradients of the float32 leaves are float32. Its other
# paths (packed input, proj_size) fall back to per-op autocast inside the native cell and return
# a mix (packed: float32 output/hy/cy; proj: bfloat16 output/hy, float32 cy). lstm_fused follows
# the oneDNN path everywhere: all three results in the autocast dtype. float64 tensors are not
# cast (autocast's rule), and, like nn.LSTM, the module's input/weight dtype check is skipped.

AUTOCAST_CONFIGS = {
    "L1": dict(num_layers=1),
    "L2-bi": dict(num_layers=2, bidirectional=True),
    "nobias-bf": dict(bias=False, batch_first=True),
}


_32, _BF16 = torch.float32, torch.bfloat16
# id -> (config, input dtype, hx dtype or None): each value at least once, not all products
# (nn.LSTM's bfloat16 oneDNN calls take about a second each on a CPU without native bfloat16)
AUTOCAST_CASES = {
    "L1-x32-nohx": ("L1", _32, None),
    "L1-xbf16-hx32": ("L1", _BF16, _32),
    "L1-x32-hxbf16": ("L1", _32, _BF16),
    "L2bi-x32-hx32": ("L2-bi", _32, _32),
    "nobias_bf-xbf16-hxbf16": ("nobias-bf", _BF16, _BF16),
}


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_autocast_cpu_like_nn_lstm(backend, case):
    cfg, x_dtype, hx_dtype = AUTOCAST_CASES[case]
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          **AUTOCAST_CONFIGS[cfg])
    T, B, LD = 6, 3, ref.num_layers * (2 if ref.bidirectional else 1)
    x = _leaf(*((B, T) if ref.batch_first else (T, B)), I, dtype=x_dtype)
    leaves = [x]
    hx = None
    if hx_dtype is not None:
        hx = (_leaf(LD, B, H, dtype=hx_dtype, seed=1), _leaf(LD, B, H, dtype=hx_dtype, seed=2))
        leaves += list(hx)
    # compare_modules asserts the same output types, shapes and dtypes, then values and the
    # gradients of x, hx and every float32 parameter
    compare_modules(_Autocast(ref, "cpu", torch.bfloat16), _Autocast(ours, "cpu", torch.bfloat16),
                    x, hx, leaves, tol=TOL_16[torch.bfloat16])
    assert all(p.grad is None for p in ours.parameters())  # autograd.grad, not .backward


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind,cfg", [("packed_unsorted", {}), ("seq", dict(proj_size=2))])
def test_autocast_cpu_other_paths_stay_in_autocast_dtype(backend, kind, cfg):
    """Where nn.LSTM returns mixed dtypes (see above) we keep the oneDNN path's behaviour."""
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          num_layers=2, **cfg)
    inp, hx, leaves = make_input(ref, kind, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (hy, cy) = ours(inp, hx)
    data = out.data if kind.startswith("packed") else out
    assert data.dtype == hy.dtype == cy.dtype == torch.bfloat16
    expected, (ehy, ecy) = ref(inp, hx)
    expected = expected.data if kind.startswith("packed") else expected
    for a, b in ((data, expected), (hy, ehy), (cy, ecy)):
        torch.testing.assert_close(a.float(), b, **TOL_16[torch.bfloat16])


def test_autocast_cpu_float64_is_not_cast(backend):
    """float64 is outside autocast: a float64 model runs in float64, and a float64 input to a
    float32 model is an error (RuntimeError, as nn.LSTM's; the reference backend casts the
    weights to the input's dtype and runs)."""
    ref, ours = make_pair(backend, dtype=torch.float64, input_size=I, hidden_size=H)
    x = _leaf(4, 2, I, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (hy, cy) = ours(x)
        expected = ref(x)
    assert_same_structure(expected, (out, (hy, cy)))
    torch.testing.assert_close(out, expected[0], **TOL[torch.float64])
    ref32 = nn.LSTM(I, H)
    ours32 = lstm_fused.LSTM(I, H, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref32(x)
        if backend != "reference":
            with pytest.raises(RuntimeError):
                ours32(x)


@requires_fused
def test_autocast_functional_op_like_aten_lstm():
    """The op has its own autocast kernel (lstm_fused/_ops.py) for callers of functional.lstm:
    same dtypes as aten::lstm (what nn.LSTM calls), and the current autocast dtype is used."""
    torch.manual_seed(0)
    m = nn.LSTM(I, H, 2)
    x = _leaf(5, 2, I, dtype=torch.float32)
    h0 = torch.zeros(2, 2, H)
    args = (x, h0, h0, m._flat_weights, True, 0, 2, 0.0, False, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hy, cy = functional.lstm(*args, backend="fused")
        expected = torch._VF.lstm(x, (h0, h0), m._flat_weights, True, 2, 0.0, False, False,
                                  False)
    for a, b in zip((out, hy, cy), expected):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), **TOL_16[torch.bfloat16])
    (grad_x,) = torch.autograd.grad(out.float().sum(), x)
    assert grad_x.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # oneDNN rejects this one; we run it
        assert functional.lstm(*args, backend="fused")[0].dtype == torch.float16


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(backend, dtype):
    """With CUDA autocast's default float16 nn.LSTM (cuDNN) computes and returns float16, and
    so do we. Under bfloat16 autocast cuDNN's autocast wrapper still casts to float16
    (aten/src/ATen/cudnn/AutocastRNN.cpp hard-codes kHalf); we use the requested bfloat16."""
    ref, ours = make_pair(backend, dtype=torch.float32, device="cuda", input_size=8,
                          hidden_size=16, num_layers=2, bidirectional=True)
    inp, hx, leaves = make_input(ref, "seq", T=7, B=4, dtype=torch.float32, device="cuda")
    if dtype == torch.float16:
        compare_modules(_Autocast(ref, "cuda", dtype), _Autocast(ours, "cuda", dtype), inp, hx,
                        leaves, tol=TOL_16[dtype])
        return
    with torch.autocast("cuda", dtype=dtype):
        out, (hy, cy) = ours(inp, hx)
    assert out.dtype == hy.dtype == cy.dtype == dtype
    torch.testing.assert_close(out.float(), ref(inp, hx)[0], **TOL_16[dtype])


def _step_inside_autocast(m, inp, hx, leaves, device_type, dtype):
    """Forward AND loss.backward() inside one autocast region (the backward then runs with
    autocast on). Returns [output, hy, cy] and the gradients of the leaves and parameters."""
    for t in [*leaves, *m.parameters()]:
        t.grad = None
    gen = torch.Generator().manual_seed(3)
    with torch.autocast(device_type, dtype=dtype):
        out, (hy, cy) = m(inp, hx)
        values = [out, hy, cy]
        loss = sum((v.float() * torch.randn(v.shape, generator=gen).to(v.device)).sum()
                   for v in values)
        loss.backward()
    return values, [t.grad for t in [*leaves, *m.parameters()]]


def _compare_steps_inside_autocast(backend, device_type, dtype, **cfg):
    ref, ours = make_pair(backend, dtype=torch.float32, device=device_type, input_size=I,
                          hidden_size=H, **cfg)
    inp, hx, leaves = make_input(ref, "seq", T=6, B=3, dtype=torch.float32, device=device_type)
    expected, expected_grads = _step_inside_autocast(ref, inp, hx, leaves, device_type, dtype)
    values, grads = _step_inside_autocast(ours, inp, hx, leaves, device_type, dtype)
    for a, b in zip(values, expected, strict=True):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL_16[dtype])
    for a, b in zip(grads, expected_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL_16[dtype])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cfg", [dict(num_layers=1), dict(num_layers=2, bidirectional=True)],
                         ids=["L1", "L2-bi"])
def test_autocast_cpu_backward_inside_the_region_like_nn_lstm(backend, cfg):
    """loss.backward() inside the autocast region: the fused backward's own GEMMs must not be
    autocast (they were: "self and mat2 must have the same dtype"); outputs and every
    gradient match nn.LSTM doing the same."""
    _compare_steps_inside_autocast(backend, "cpu", torch.bfloat16, **cfg)


@pytest.mark.cuda
@requires_cuda
def test_autocast_cuda_backward_inside_the_region_like_nn_lstm(backend):
    """The CUDA twin of the CPU test, in CUDA autocast's float16 (what cuDNN uses)."""
    _compare_steps_inside_autocast(backend, "cuda", torch.float16, num_layers=2,
                                   bidirectional=True)


# --- torch.compile ---------------------------------------------------------------------------

@requires_fused
def test_compile_inductor_fullgraph_matches_eager():
    """The default backend (inductor) over the fused ops: outputs and every gradient equal
    the eager module's."""
    torch._dynamo.reset()
    _, eager = make_pair("fused", dtype=torch.float32, input_size=I, hidden_size=H,
                         num_layers=2, batch_first=True)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True)  # in place: the parameter names stay the same
    inp, hx, leaves = make_input(eager, "seq", T=6, B=4, dtype=torch.float32, hx=False)
    compare_modules(eager, compiled, inp, hx, leaves)


def _lengths(T, B):
    return [T] + [max(1, T - 2 * i - 1) for i in range(1, B)]


@requires_fused
@pytest.mark.parametrize("mode", ["dynamic", "mark_dynamic", "packed"])
def test_compile_dynamic_lengths_compile_once(mode):
    """One graph for every sequence length (and for packed input, every batch_sizes), no
    graph break (fullgraph), results equal to eager. Sizes are kept distinct from the input
    size and batch (3, 4): dynamo specialises dimensions that happen to be equal."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = lstm_fused.LSTM(I, H, 2, batch_first=True, bidirectional=True)
    counter = CompileCounter()
    compiled = torch.compile(eager, fullgraph=True, backend=counter,
                             dynamic=True if mode != "mark_dynamic" else None)
    for T in (6, 9, 13, 17):
        if mode == "packed":
            inp, hx, _ = make_input(eager, "packed_unsorted", lengths=_lengths(T, 4),
                                    dtype=torch.float32, hx=False)
        else:
            inp, hx, _ = make_input(eager, "seq", T=T, B=4, dtype=torch.float32, hx=False)
            if mode == "mark_dynamic":
                torch._dynamo.mark_dynamic(inp, 1)
        out, expected = compiled(inp), eager(inp)
        assert_same_structure(expected, out)
        for a, b in zip(torch.utils._pytree.tree_leaves(out),
                        torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert counter.frame_count == 1


# --- torch.export ----------------------------------------------------------------------------

@requires_fused
def test_export_graph_holds_just_the_op():
    """With autocast off the module enters no autocast context, so the exported graph has no
    wrap_with_autocast (or any higher-order) node: the zero initial states and the op."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(I, H).eval()
    x = torch.randn(4, 2, I)
    with pytest.warns(UserWarning, match="were assigned during export"):  # as for nn.LSTM
        program = torch.export.export(m, (x,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    ops = [t for t in targets if t is not operator.getitem]
    assert ops == [torch.ops.aten.zeros.default, torch.ops.aten.zeros.default,
                   torch.ops.lstm_fused.layer_forward.default], targets
    for a, b in zip(program.module()(x), m(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")  # as nn.LSTM
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_packed_input_fails_with_a_clear_message(backend, strict):
    """Not the data-dependent guard error that int(batch_sizes[0]) would raise (strict
    export wraps the error in Dynamo's Unsupported, a RuntimeError, with our message)."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, I), torch.tensor([4, 2]))
    with pytest.raises(RuntimeError, match="torch.export does not support PackedSequence input"):
        torch.export.export(lstm_fused.LSTM(I, H, backend=backend), (packed,), strict=strict)


# --- serialization and conversion ------------------------------------------------------------

def test_state_dict_save_load_weights_only(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                          proj_size=2)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh_ours = lstm_fused.LSTM(I, H, 2, bidirectional=True, proj_size=2, dtype=torch.float64,
                                 backend=backend)
    fresh_ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=2, dtype=torch.float64)
    fresh_ours.load_state_dict(state, strict=True)
    fresh_ref.load_state_dict(state, strict=True)
    inp, hx, leaves = make_input(ref, "seq")
    compare_modules(fresh_ref, fresh_ours, inp, hx, leaves)


def test_module_pickle_deepcopy_torch_save_keep_settings(backend):
    """Whole-module copies keep the backend and the BPTT clipping settings and compute the
    same; the copies own their parameters."""
    _, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2)
    ours.bptt_clip, ours.bptt_clip_mode = 0.05, 2
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)),
              torch.load(buffer, weights_only=False)]
    inp, hx, leaves = make_input(ours, "seq", T=6)
    for m in copies:
        assert (m.backend, m.bptt_clip, m.bptt_clip_mode) == (backend, 0.05, 2)
        assert all(p is not q for p, q in zip(m.parameters(), ours.parameters()))
        compare_modules(ours, m, inp, hx, leaves)


@pytest.fixture
def restore_safe_globals():
    """torch.serialization.add_safe_globals changes process-wide state: put it back."""
    saved = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_whole_model_loads_weights_only_with_the_readme_recipe(backend, restore_safe_globals):
    """The README's recipe for a torch.save'd whole model under torch.load's weights_only
    default: refused until lstm_fused.LSTM is an allowed global, then it loads with its
    settings; a model around it needs its own classes as well, which
    torch.serialization.get_unsafe_globals_in_checkpoint lists (no other global is needed)."""
    _, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2, proj_size=2)
    ours.set_bptt_clip(0.05, "norm")
    model = nn.Sequential(ours, nn.Linear(2, 1)).double()
    buffers = {}
    for name, obj in (("lstm", ours), ("model", model)):
        buffers[name] = io.BytesIO()
        torch.save(obj, buffers[name])
        buffers[name].seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(buffers["lstm"]) == [
        "lstm_fused.module.LSTM"]
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(buffers["model"])) == [
        "lstm_fused.module.LSTM", "torch.nn.modules.container.Sequential",
        "torch.nn.modules.linear.Linear"]
    for b in buffers.values():
        b.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="lstm_fused.module.LSTM"):
        torch.load(buffers["lstm"])  # weights_only=True is torch's default
    buffers["lstm"].seek(0)
    torch.serialization.add_safe_globals([lstm_fused.LSTM])
    loaded = torch.load(buffers["lstm"], weights_only=True)
    torch.serialization.add_safe_globals([nn.Sequential, nn.Linear])
    loaded_model = torch.load(buffers["model"], weights_only=True)
    assert type(loaded) is lstm_fused.LSTM and type(loaded_model[0]) is lstm_fused.LSTM
    assert (loaded.backend, loaded.bptt_clip, loaded.bptt_clip_mode) == (backend, 0.05, 2)
    inp, hx, leaves = make_input(ours, "seq", T=6)
    compare_modules(ours, loaded, inp, hx, leaves)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded_model.state_dict().items(),
                                 strict=True):
        assert torch.equal(p, q), name


CONVERSIONS = {
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "double": (lambda m: m.double(), torch.float64),
    "to_dtype": (lambda m: m.to(torch.float64), torch.float64),
    "to_device_dtype": (lambda m: m.to("cpu", torch.float16), torch.float16),
    "to_float": (lambda m: m.double().float(), torch.float32),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_dtype_conversion_like_nn_lstm(backend, name):
    convert, dtype = CONVERSIONS[name]
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          num_layers=2, bidirectional=True)
    ref, ours = convert(ref), convert(ours)
    assert all(w.dtype == dtype for w in ours._flat_weights)
    assert [p.dtype for p in ours.parameters()] == [p.dtype for p in ref.parameters()]
    inp, hx, leaves = make_input(ref, "seq", dtype=dtype)
    compare_modules(ref, ours, inp, hx, leaves, tol=TOL_16.get(dtype))


# --- threads ---------------------------------------------------------------------------------

def _train_steps(m, kind, steps=3, **input_kw):
    """`steps` forward+backward passes of m, returning every result and gradient."""
    results = []
    for step in range(steps):
        inp, hx, leaves = make_input(m, kind, dtype=torch.float64, seed=step, **input_kw)
        _, values, grads = run_and_grad(m, inp, hx, leaves)
        results += values + list(grads)
    return results


@requires_fused
def test_two_threads_match_serial_runs():
    models = [
        (make_pair("fused", input_size=8, hidden_size=16, num_layers=2, bidirectional=True,
                   seed=0)[1], "seq", dict(T=40, B=6)),
        (make_pair("fused", input_size=5, hidden_size=12, proj_size=4, seed=1)[1],
         "packed_unsorted", dict(lengths=[30, 12, 25, 7])),
    ]
    serial = [_train_steps(m, kind, **kw) for m, kind, kw in models]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_train_steps, m, kind, **kw) for m, kind, kw in models]
        threaded = [f.result(timeout=120) for f in futures]
    for a_list, b_list in zip(serial, threaded):
        for a, b in zip(a_list, b_list, strict=True):
            torch.testing.assert_close(b, a, **TOL[torch.float64])


@requires_fused
def test_gil_is_released_in_the_time_loops():
    """A Python thread keeps running while the fused forward and backward loops run: its
    longest pause stays far below the length of the call (holding the GIL through a C++ loop
    would stall it for the whole call)."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(64, 64)
    x = torch.randn(100_000, 1, 64, requires_grad=True)  # calls of about 0.3-1 s
    stop = threading.Event()
    ticks = []  # perf_counter() of each spin, appended by the spinner only

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            for _ in range(1000):  # Python bytecode between ticks, a few microseconds
                pass

    def longest_pause(begin, end):
        inside = [t for t in ticks if begin <= t <= end]
        points = [begin] + inside + [end]
        return max(b - a for a, b in zip(points, points[1:]))

    spinner = threading.Thread(target=spin, daemon=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spinner gets a core of its own on a 2-core machine
    spinner.start()
    try:
        while not ticks:
            time.sleep(0.001)
        t0 = time.perf_counter()
        out, _ = m(x)
        t1 = time.perf_counter()
        out.sum().backward()
        t2 = time.perf_counter()
    finally:
        stop.set()
        spinner.join(timeout=10)
        torch.set_num_threads(threads)
    for name, begin, end in (("forward", t0, t1), ("backward", t1, t2)):
        assert end - begin > 0.05, f"{name} too short to tell ({end - begin:.3f} s)"
        assert longest_pause(begin, end) < 0.5 * (end - begin), name


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_propagates_like_nn_lstm(backend, value):
    """NaN/Inf in one input element: the same NaN/Inf pattern as nn.LSTM in the outputs and in
    every gradient (which rows and steps it reaches, in both directions and later layers)."""
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2,
                          bidirectional=True)
    inp, hx, leaves = make_input(ref, "seq", T=6, B=3)
    with torch.no_grad():
        inp[2, 1, 0] = value
    compare_modules(ref, ours, inp, hx, leaves, tol=dict(TOL[torch.float64], equal_nan=True))


@pytest.mark.parametrize("batch_first", [False, True])
def test_noncontiguous_and_expanded_inputs_and_states(backend, batch_first):
    """Transposed, strided and stride-0 (expanded) input, h0 and c0 give nn.LSTM's results,
    gradients included (they flow back to the underlying tensors)."""
    T, B, LD = 5, 3, 4
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                          batch_first=batch_first)
    dt = torch.float64
    cases = {
        # leaf -> module input
        "transposed": (_leaf(*((T, B) if batch_first else (B, T)), I, dtype=dt),
                       lambda t: t.transpose(0, 1)),
        "strided": (_leaf(*((B, 2 * T) if batch_first else (2 * T, B)), I, dtype=dt),
                    lambda t: t[:, ::2] if batch_first else t[::2]),
        "expanded": (_leaf(*((1, T) if batch_first else (T, 1)), I, dtype=dt),
                     lambda t: t.expand(*((B, T) if batch_first else (T, B)), I)),
    }
    h_leaf = _leaf(LD, 1, H, dtype=dt, seed=1)      # expanded over the batch
    c_leaf = _leaf(B, LD, H, dtype=dt, seed=2)      # transposed
    hx = (h_leaf.expand(LD, B, H), c_leaf.transpose(0, 1))
    for name, (leaf, view) in cases.items():
        inp = view(leaf)
        assert not inp.is_contiguous(), name
        compare_modules(ref, ours, inp, hx, [leaf, h_leaf, c_leaf])


@pytest.mark.parametrize("hx_dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_hidden_state_is_rejected(backend, hx_dtype):
    """nn.LSTM fails inside oneDNN ('get_mkldnn_dtype: unsupported data type'); we raise the
    same exception type with a message that names the problem."""
    ref = nn.LSTM(I, H, 2)
    ours = lstm_fused.LSTM(I, H, 2, backend=backend)
    x = torch.randn(4, 2, I)
    for hx in ((torch.zeros(2, 2, H, dtype=hx_dtype), torch.zeros(2, 2, H)),
               (torch.zeros(2, 2, H), torch.zeros(2, 2, H, dtype=hx_dtype))):
        with pytest.raises(RuntimeError):
            ref(x, hx)
        with pytest.raises(RuntimeError, match="Input and hidden tensors are not the same dtype"):
            ours(x, hx)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_wrong_number_of_hidden_tensors(backend, count, enforce_sorted):
    ours = lstm_fused.LSTM(I, H, 2, backend=backend)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.randn(3, 4, I), torch.tensor([4, 2, 1]), batch_first=True,
        enforce_sorted=enforce_sorted)
    with pytest.raises(RuntimeError, match="lstm expects two hidden states"):
        ours(packed, (torch.zeros(2, 3, H),) * count)
