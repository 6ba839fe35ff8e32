"""lstm_fused.LSTM against torch.nn.LSTM: outputs, gradients, errors, conversion, dtypes.

Every test that takes the `backend` fixture runs once per backend of
lstm_fused.functional.BACKENDS that can run here (see conftest.py)."""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from lstm_fused import functional
from conftest import (BACKEND_PARAMS, TOL, assert_same_structure, compare_modules, make_input,
                      make_pair, requires_cuda, run_and_grad)


I, H, K = 3, 4, 2  # input size, hidden size, projection size (< H)

ARCHS = [dict(num_layers=L, bidirectional=bd, proj_size=p, bias=b)
         for L, bd, p, b in itertools.product([1, 2], [False, True], [0, K], [True, False])]


def _arch_id(a):
    return (f"L{a['num_layers']}{'-bi' if a['bidirectional'] else ''}"
            f"{'-proj' if a['proj_size'] else ''}{'' if a['bias'] else '-nobias'}")


# kind -> (make_input kind, batch_first, make_input kwargs)
KINDS = {
    "seq": ("seq", False, {}),
    "seq_bf": ("seq", True, {}),
    "unbatched": ("unbatched", False, {}),
    "unbatched_bf": ("unbatched", True, {}),
    "packed_sorted": ("packed_sorted", False, dict(lengths=[6, 4, 4, 1])),
    "packed_unsorted": ("packed_unsorted", True, dict(lengths=[2, 6, 1, 4])),
    "packed_equal": ("packed_unsorted", False, dict(lengths=[5, 5, 5])),
}


# --- parity grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ARCHS, ids=_arch_id)
def test_parity_float64(backend, arch, kind, hx):
    ikind, batch_first, kw = KINDS[kind]
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, batch_first=batch_first,
                          **arch)
    inp, h, leaves = make_input(ref, ikind, T=5, B=3, hx=hx, **kw)
    compare_modules(ref, ours, inp, h, leaves)


@pytest.mark.parametrize("kind,hx", [("seq_bf", True), ("packed_unsorted", False),
                                     ("unbatched", True)])
@pytest.mark.parametrize("arch", ARCHS, ids=_arch_id)
def test_parity_float32(backend, arch, kind, hx):
    ikind, batch_first, kw = KINDS[kind]
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          batch_first=batch_first, **arch)
    inp, h, leaves = make_input(ref, ikind, T=7, B=4, hx=hx, dtype=torch.float32, **kw)
    compare_modules(ref, ours, inp, h, leaves)


def test_parity_larger_float32(backend):
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=8, hidden_size=24,
                          num_layers=2, bidirectional=True)
    inp, h, leaves = make_input(ref, "seq", T=12, B=6, dtype=torch.float32)
    compare_modules(ref, ours, inp, h, leaves)


def test_hx_as_list(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2)
    inp, (h0, c0), leaves = make_input(ref, "seq")
    compare_modules(ref, ours, inp, [h0, c0], leaves)


def test_eval_mode_backward(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2, dropout=0.5,
                          bidirectional=True)
    ref.eval()
    ours.eval()
    inp, h, leaves = make_input(ref, "packed_unsorted", lengths=[3, 5, 2])
    compare_modules(ref, ours, inp, h, leaves)


def test_no_grad_forward(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, proj_size=K)
    inp, h, _ = make_input(ref, "seq")
    with torch.no_grad():
        o1, (h1, c1) = ref(inp, h)
        o2, (h2, c2) = ours(inp, h)
    assert not o2.requires_grad
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_functional_call_swapped_weights(backend):
    """torch.func.functional_call replaces the parameters; the forward must use the new ones."""
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2)
    inp, h, _ = make_input(ref, "seq")
    new = {n: p.detach() * 0.5 for n, p in ref.named_parameters()}
    o1, _ = functional_call(ref, new, (inp, h))
    o2, _ = functional_call(ours, new, (inp, h))
    torch.testing.assert_close(o2, o1, **TOL[torch.float64])
    o3, _ = ours(inp, h)
    assert not torch.allclose(o3, o2)


# --- higher-order gradients -----------------------------------------------------------------

def _params_and_fn(m, kind, **kw):
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in m.named_parameters())
    inp, (h0, c0), _ = make_input(m, kind, **kw)
    if isinstance(inp, PackedSequence):
        x = torch.randn(len(kw["lengths"]), max(kw["lengths"]), m.input_size,
                        dtype=torch.float64, requires_grad=True)

        def make(x):
            return pack_padded_sequence(x, torch.tensor(kw["lengths"]), batch_first=True,
                                        enforce_sorted=False)
    else:
        x = inp.detach().clone().requires_grad_()

        def make(x):
            return x

    def fn(x, h0, c0, *ps):
        out, (h, c) = functional_call(m, dict(zip(names, ps)), (make(x), (h0, c0)))
        return (out.data if isinstance(out, PackedSequence) else out), h, c

    return fn, (x, h0, c0, *params)


@pytest.mark.parametrize("arch,kind,kw", [
    (dict(num_layers=2, bidirectional=True, proj_size=K), "seq", dict(T=3, B=2)),
    (dict(num_layers=1, bidirectional=True, bias=False), "packed_unsorted",
     dict(lengths=[2, 3, 1])),
], ids=["L2-bi-proj-seq", "L1-bi-nobias-packed"])
def test_gradcheck(backend, arch, kind, kw):
    _, ours = make_pair(backend, input_size=2, hidden_size=3, **arch)
    fn, args = _params_and_fn(ours, kind, **kw)
    assert torch.autograd.gradcheck(fn, args)


def test_gradgradcheck(backend):
    _, ours = make_pair(backend, input_size=2, hidden_size=3, proj_size=2)
    fn, args = _params_and_fn(ours, "seq", T=2, B=2)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("kind", ["seq", "packed_unsorted"])
def test_double_backward_matches_nn_lstm(backend, kind):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2,
                          bidirectional=True, proj_size=K)
    kw = dict(lengths=[3, 5, 2]) if kind.startswith("packed") else {}
    inp, h, leaves = make_input(ref, kind, **kw)
    results = []
    for m in (ref, ours):
        _, _, grads = run_and_grad(m, inp, h, leaves, create_graph=True)
        gg = sum((g * g).sum() for g in grads)
        wrt = list(leaves) + list(m.parameters())
        results.append(torch.autograd.grad(gg, wrt, retain_graph=True))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


# --- dropout ---------------------------------------------------------------------------------

def test_dropout_zero_matches_in_training(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2, dropout=0.0)
    assert ours.training
    inp, h, leaves = make_input(ref, "seq")
    compare_modules(ref, ours, inp, h, leaves)


def test_dropout_training_random_eval_deterministic(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=3, dropout=0.5,
                          bidirectional=True)
    inp, h, _ = make_input(ref, "seq", T=6, B=4)
    torch.manual_seed(10)
    o1, (h1, _) = ours(inp, h)
    o2, (h2, _) = ours(inp, h)
    assert not torch.allclose(o1, o2)  # fresh masks each call
    torch.manual_seed(10)
    o3, _ = ours(inp, h)
    assert torch.equal(o1, o3)  # the masks come from torch's RNG
    ours.eval()
    ref.eval()
    e1, (eh, ec) = ours(inp, h)
    e2, _ = ours(inp, h)
    assert torch.equal(e1, e2)
    r, (rh, rc) = ref(inp, h)
    torch.testing.assert_close(e1, r, **TOL[torch.float64])
    torch.testing.assert_close(eh, rh, **TOL[torch.float64])
    # dropout acts between layers only: layer 0's final state is the same as in eval
    torch.testing.assert_close(h1[:2], eh[:2], **TOL[torch.float64])
    assert not torch.allclose(h1[2:], eh[2:])


def test_dropout_p1_zeroes_the_next_layer_input(backend):
    torch.manual_seed(0)
    ours = lstm_fused.LSTM(I, H, num_layers=2, dropout=1.0, dtype=torch.float64,
                           backend=backend)
    inp, (h0, c0), _ = make_input(ours, "seq")
    out, (hy, cy) = ours(inp, (h0, c0))
    # layer 1 alone, fed zeros
    top = nn.LSTM(H, H, dtype=torch.float64)
    top.load_state_dict({k.replace("l1", "l0"): v for k, v in ours.state_dict().items()
                         if k.endswith("l1")})
    exp, (eh, ec) = top(torch.zeros(5, 3, H, dtype=torch.float64), (h0[1:], c0[1:]))
    torch.testing.assert_close(out, exp, **TOL[torch.float64])
    torch.testing.assert_close(hy[1:], eh, **TOL[torch.float64])


def test_dropout_one_layer_warns_like_nn_lstm_and_does_nothing(backend):
    with pytest.warns(UserWarning) as w_ref:
        nn.LSTM(I, H, dropout=0.3)
    with pytest.warns(UserWarning) as w_ours:
        ours = lstm_fused.LSTM(I, H, dropout=0.3, dtype=torch.float64, backend=backend)
    assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref]
    inp, h, _ = make_input(ours, "seq")
    o_train, _ = ours(inp, h)
    ours.eval()
    o_eval, _ = ours(inp, h)
    assert torch.equal(o_train, o_eval)


@pytest.mark.parametrize("kind", ["seq", "packed_unsorted"])
def test_dropout_masks_between_layers(spy_backend, kind):
    """A spy backend sees each layer's input: layer 0 gets the input unchanged; layer l > 0
    gets layer l-1's output with about a share p of entries zeroed and the rest scaled by
    1/(1-p) (packed: on the data)."""
    seen = spy_backend
    p = 0.3
    torch.manual_seed(0)
    ours = lstm_fused.LSTM(I, 32, num_layers=3, dropout=p, dtype=torch.float64,
                           backend="spy")
    kw = dict(lengths=[20, 7, 13, 20]) if kind.startswith("packed") else dict(T=20, B=4)
    inp, h, _ = make_input(ours, kind, **kw)
    ours(inp, h)
    data = inp.data if isinstance(inp, PackedSequence) else inp
    assert len(seen) == 3 and torch.equal(seen[0][0], data)
    zero_share = []
    for (x_next, _), (_, out_prev) in zip(seen[1:], seen[:-1]):
        assert x_next.shape == out_prev.shape
        kept = x_next != 0
        torch.testing.assert_close(x_next[kept], out_prev[kept] / (1 - p), atol=1e-12,
                                   rtol=1e-12)
        zero_share.append(1 - kept.double().mean().item())
    # 2 x 1920 (unpacked) Bernoulli(0.3) draws: the share is within 0.3 +- 0.05 w.h.p.
    assert all(abs(z - p) < 0.05 for z in zero_share), zero_share
    assert not torch.equal(seen[1][0] != 0, seen[2][0] != 0)
    seen.clear()
    ours.eval()
    ours(inp, h)
    assert torch.equal(seen[1][0], seen[0][1]) and torch.equal(seen[2][0], seen[1][1])


# --- shapes, dtypes, batch size 0 ---------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_size_zero(backend, batch_first):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2,
                          bidirectional=True, batch_first=batch_first)
    shape = (0, 4, I) if batch_first else (4, 0, I)
    for hx in (None, (torch.zeros(4, 0, H, dtype=torch.float64),) * 2):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        r = ref(x, hx)
        o = ours(x, hx)
        assert_same_structure(r, o)
        o[0].sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
                         ids=["bf16", "fp16"])
def test_16bit_close_to_float32(backend, dtype, tol):
    torch.manual_seed(0)
    m16 = lstm_fused.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=6, dtype=dtype,
                          backend=backend)
    m32 = copy.deepcopy(m16).float()
    x = torch.randn(10, 4, 8).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    o16, (h16, c16) = m16(x)
    o32, (h32, c32) = m32(x32)
    assert o16.dtype == h16.dtype == c16.dtype == dtype
    for a, b in ((o16, o32), (h16, h32), (c16, c32)):
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)
    # same output types/shapes as nn.LSTM in this dtype, values close to its
    ref = m16.to_torch()
    r = ref(x)
    assert_same_structure(r, (o16, (h16, c16)))
    torch.testing.assert_close(o16.float(), r[0].float(), atol=2 * tol, rtol=2 * tol)
    # gradients: relative error of the whole gradient
    (o16.float().square().sum() + c16.float().sum()).backward()
    (o32.square().sum() + c32.sum()).backward()
    for (n, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
        assert p16.grad.dtype == dtype
        err = (p16.grad.float() - p32.grad).norm() / p32.grad.norm()
        assert err < 5 * tol, (n, err.item())
    assert ((x.grad.float() - x32.grad).norm() / x32.grad.norm()) < 5 * tol


def test_autocast_cpu_like_nn_lstm(backend):
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          num_layers=2)
    x = torch.randn(5, 3, I, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, (rh, rc) = ref(x)
        o, (oh, oc) = ours(x)
    assert_same_structure((r, (rh, rc)), (o, (oh, oc)))
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), r.float(), atol=3e-2, rtol=3e-2)
    o.float().sum().backward()
    assert x.grad is not None and next(ours.parameters()).grad.dtype == torch.float32


def test_determinism_cpu(backend):
    _, ours = make_pair(backend, dtype=torch.float32, input_size=8, hidden_size=16,
                        num_layers=2, bidirectional=True)
    inp, h, leaves = make_input(ours, "packed_unsorted", lengths=[9, 3, 7, 7, 1],
                                dtype=torch.float32)
    g1 = run_and_grad(ours, inp, h, leaves)[2]
    g2 = run_and_grad(ours, inp, h, leaves)[2]
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# --- errors ----------------------------------------------------------------------------------

def _raises_like(ref_call, ours_call):
    with pytest.raises(Exception) as e_ref:
        ref_call()
    with pytest.raises(Exception) as e_ours:
        ours_call()
    assert type(e_ours.value) is type(e_ref.value)
    assert str(e_ours.value) == str(e_ref.value)
    return e_ours.value


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


FORWARD_ERRORS = {
    "4d_input": lambda: (_t(4, 2, 3, 1),),
    "1d_input": lambda: (_t(4),),
    "input_size": lambda: (_t(4, 2, 4),),
    "input_size_unbatched": lambda: (_t(4, 5),),
    "input_dtype": lambda: (_t(4, 2, 3, dtype=torch.float64),),
    "input_int": lambda: (torch.ones(4, 2, 3, dtype=torch.long),),
    "h_batch": lambda: (_t(4, 2, 3), (_t(2, 3, 5), _t(2, 2, 5))),
    "c_hidden": lambda: (_t(4, 2, 3), (_t(2, 2, 5), _t(2, 2, 4))),
    "h_layers": lambda: (_t(4, 2, 3), (_t(1, 2, 5), _t(2, 2, 5))),
    "hx_2d_batched": lambda: (_t(4, 2, 3), (_t(2, 5), _t(2, 2, 5))),
    "hx_3d_unbatched": lambda: (_t(4, 3), (_t(2, 1, 5), _t(2, 5))),
    "hx_single_tensor": lambda: (_t(4, 2, 3), _t(2, 2, 5)),
    "hx_three": lambda: (_t(4, 2, 3), (_t(2, 2, 5), _t(2, 2, 5), _t(2, 2, 5))),
    "hx_one": lambda: (_t(4, 2, 3), (_t(2, 2, 5),)),
    "zero_steps": lambda: (_t(0, 2, 3),),
    "zero_steps_hx": lambda: (_t(0, 2, 3), (_t(2, 2, 5), _t(2, 2, 5))),
    "zero_steps_unbatched": lambda: (_t(0, 3),),
    "hx_on_meta": lambda: (_t(4, 2, 3), (_t(2, 2, 5, device="meta"), _t(2, 2, 5))),
    "cx_on_meta": lambda: (_t(4, 2, 3), (_t(2, 2, 5), _t(2, 2, 5, device="meta"))),
    "input_on_meta": lambda: (_t(4, 2, 3, device="meta"),),
}


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_error_parity(backend, case):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 2)
    ours = lstm_fused.LSTM(3, 5, 2, backend=backend)
    args = FORWARD_ERRORS[case]()
    _raises_like(lambda: ref(*args), lambda: ours(*args))


def test_forward_error_parity_batch_first_and_proj(backend):
    ref = nn.LSTM(3, 5, proj_size=2, batch_first=True)
    ours = lstm_fused.LSTM(3, 5, proj_size=2, batch_first=True, backend=backend)
    for args in [(_t(2, 0, 3),), (_t(2, 4, 3), (_t(1, 2, 5), _t(1, 2, 5))),
                 (_t(2, 4, 3), (_t(1, 2, 2), _t(1, 2, 2))), (_t(2, 4, 3), (_t(1, 4, 2),) * 2)]:
        _raises_like(lambda: ref(*args), lambda: ours(*args))


def test_parameters_on_other_device_parity(backend):
    ref = nn.LSTM(3, 5, 2, device="meta")
    ours = lstm_fused.LSTM(3, 5, 2, device="meta", backend=backend)
    for args in [(_t(4, 2, 3),), (_t(4, 2, 3), (_t(2, 2, 5), _t(2, 2, 5)))]:
        e = _raises_like(lambda: ref(*args), lambda: ours(*args))
        assert "Input and parameter tensors are not at the same device" in str(e)


def test_hidden_dtype_mismatch(backend):
    """nn.LSTM fails here inside its kernels with a backend-dependent RuntimeError
    (CPU oneDNN: 'get_mkldnn_dtype: unsupported data type'); we raise a RuntimeError that
    names the problem, with the wording of ATen's own check."""
    ref = nn.LSTM(3, 5, 2)
    ours = lstm_fused.LSTM(3, 5, 2, backend=backend)
    for hx in [(_t(2, 2, 5, dtype=torch.float64), _t(2, 2, 5)),
               (_t(2, 2, 5), _t(2, 2, 5, dtype=torch.float16))]:
        with pytest.raises(RuntimeError):
            ref(_t(4, 2, 3), hx)
        bad = hx[0].dtype if hx[0].dtype != torch.float32 else hx[1].dtype
        name = {torch.float64: "Double", torch.float16: "Half"}[bad]
        with pytest.raises(RuntimeError, match=(
                "Input and hidden tensors are not the same dtype, found input tensor with "
                f"Float and hidden tensor with {name}")):
            ours(_t(4, 2, 3), hx)


def _packed(lengths, size=3, dtype=torch.float32):
    x = torch.randn(len(lengths), max(lengths), size, dtype=dtype)
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                enforce_sorted=False)


@pytest.mark.parametrize("case,msg", [
    ("input_size", "input.size(-1) must be equal to input_size. Expected 3, got 4"),
    ("input_dtype", "RNN input dtype (torch.float64) does not match weight dtype "
                    "(torch.float32)"),
    ("h_batch", "Expected hidden[0] size (2, 2, 5), got [2, 3, 5]"),
    ("c_hidden", "Expected hidden[1] size (2, 2, 5), got [2, 2, 4]"),
    ("hx_2d", "Expected hidden[0] size (2, 2, 5), got [2, 5]"),
    ("hx_dtype", "Input and hidden tensors are not the same dtype"),
    ("hx_on_meta", "Input and hidden tensors are not at the same device, found input tensor "
                   "at cpu and hidden tensor at meta"),
])
def test_packed_errors(backend, case, msg):
    """nn.LSTM runs no Python checks for PackedSequence and fails inside its kernels with
    RuntimeErrors of varying wording; we raise RuntimeError (same type) with clear messages."""
    ref = nn.LSTM(3, 5, 2)
    ours = lstm_fused.LSTM(3, 5, 2, backend=backend)
    args = {
        "input_size": lambda: (_packed([3, 2], size=4),),
        "input_dtype": lambda: (_packed([3, 2], dtype=torch.float64),),
        "h_batch": lambda: (_packed([3, 2]), (_t(2, 3, 5), _t(2, 2, 5))),
        "c_hidden": lambda: (_packed([3, 2]), (_t(2, 2, 5), _t(2, 2, 4))),
        "hx_2d": lambda: (_packed([3, 2]), (_t(2, 5), _t(2, 2, 5))),
        "hx_dtype": lambda: (_packed([3, 2]), (_t(2, 2, 5, dtype=torch.float64), _t(2, 2, 5))),
        "hx_on_meta": lambda: (_packed([3, 2]), (_t(2, 2, 5, device="meta"), _t(2, 2, 5))),
    }[case]()
    ref_error = None
    try:
        ref(*args)
    except Exception as e:
        ref_error = e
    with pytest.raises(RuntimeError) as e_ours:
        ours(*args)
    assert msg in str(e_ours.value)
    if case == "h_batch":
        # nn.LSTM accepts this one silently: index_select with the 2 sorted indices
        # picks 2 of the 3 rows of hx
        assert ref_error is None
    elif isinstance(ref_error, RuntimeError):
        assert type(e_ours.value) is type(ref_error)
    else:
        assert isinstance(ref_error, (IndexError, ValueError)), ref_error


CTOR_ERRORS = [
    dict(input_size=3, hidden_size=5, dropout=1.5),
    dict(input_size=3, hidden_size=5, dropout=True),
    dict(input_size=3, hidden_size=5, dropout="0.1"),
    dict(input_size=3, hidden_size=5, bias=1),
    dict(input_size=3, hidden_size=5, batch_first=None),
    dict(input_size=3.0, hidden_size=5),
    dict(input_size=0, hidden_size=5),
    dict(input_size=3, hidden_size=5.0),
    dict(input_size=3, hidden_size=0),
    dict(input_size=3, hidden_size=5, num_layers=0),
    dict(input_size=3, hidden_size=5, proj_size=-1),
    dict(input_size=3, hidden_size=5, proj_size=5),
]


@pytest.mark.parametrize("kw", CTOR_ERRORS, ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in
                                                                        kw.items())[14:])
def test_constructor_error_parity(kw):
    _raises_like(lambda: nn.LSTM(**kw), lambda: lstm_fused.LSTM(**kw, backend="reference"))


def test_constructor_positional_and_unknown_backend():
    a = nn.LSTM(3, 5, 2, False, True, 0.0, True, 2)
    b = lstm_fused.LSTM(3, 5, 2, False, True, 0.0, True, 2, backend="reference")
    assert repr(a) == repr(b)
    with pytest.raises(ValueError, match="backend must be one of"):
        lstm_fused.LSTM(3, 5, backend="nope")
    _raises_like(lambda: nn.LSTM(3, 5, foo=1),
                 lambda: lstm_fused.LSTM(3, 5, foo=1, backend="reference"))


# --- module API parity ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(num_layers=3, bias=False), dict(batch_first=True, dropout=0.25, num_layers=2),
    dict(bidirectional=True, proj_size=2),
])
def test_repr_and_attributes_match(kw):
    a = nn.LSTM(3, 5, **kw)
    b = lstm_fused.LSTM(3, 5, **kw, backend="reference")
    assert repr(b) == repr(a)
    assert type(b).__name__ == "LSTM" and b.mode == "LSTM"
    for attr in nn.LSTM.__constants__:
        assert getattr(b, attr) == getattr(a, attr), attr
    assert [n for n, _ in b.named_parameters()] == [n for n, _ in a.named_parameters()]
    assert [p.shape for p in b.parameters()] == [p.shape for p in a.parameters()]
    assert b._flat_weights_names == a._flat_weights_names
    assert b.all_weights and len(b.all_weights) == len(a.all_weights)
    assert not isinstance(b, nn.LSTM) and isinstance(b, nn.RNNBase)


def test_init_distribution_matches():
    torch.manual_seed(5)
    a = nn.LSTM(3, 7, 2, proj_size=3)
    torch.manual_seed(5)
    b = lstm_fused.LSTM(3, 7, 2, proj_size=3, backend="reference")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trips():
    torch.manual_seed(0)
    a = nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2)
    b = lstm_fused.LSTM(3, 5, 2, bidirectional=True, proj_size=2, backend="reference")
    b.load_state_dict(a.state_dict(), strict=True)
    assert list(b.state_dict()) == list(a.state_dict())
    c = nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2)
    c.load_state_dict(b.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(c.state_dict()[k], v)
        assert torch.equal(b.state_dict()[k], v)


def test_flatten_parameters_is_harmless(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H)
    ptrs = [p.data_ptr() for p in ours.parameters()]
    ours.flatten_parameters()
    assert [p.data_ptr() for p in ours.parameters()] == ptrs
    inp, h, leaves = make_input(ref, "seq")
    compare_modules(ref, ours, inp, h, leaves)


def test_pickle_deepcopy_and_to(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2)
    inp, h, _ = make_input(ref, "seq")
    exp, _ = ours(inp, h)
    for m in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert m.backend == backend and m.bptt_clip == 0.0 and m.flow_recorder is None
        assert torch.equal(m(inp, h)[0], exp)
    m = copy.deepcopy(ours).float()
    assert all(w.dtype == torch.float32 for w in m._flat_weights)
    o, _ = m(inp.float(), tuple(t.float() for t in h))
    torch.testing.assert_close(o, exp.float(), atol=1e-5, rtol=1e-5)


# --- conversion ----------------------------------------------------------------------------

def test_from_torch_and_to_torch(backend):
    torch.manual_seed(0)
    a = nn.LSTM(3, 5, 2, batch_first=True, bidirectional=True, proj_size=2, dropout=0.1,
                dtype=torch.float64).eval()
    a.weight_hh_l1.requires_grad_(False)
    b = lstm_fused.LSTM.from_torch(a, backend=backend)
    assert isinstance(b, lstm_fused.LSTM) and b.backend == backend
    assert not b.training and repr(b) == repr(a)
    assert not b.weight_hh_l1.requires_grad and b.weight_ih_l0.requires_grad
    for (n, p), (m_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m_ and torch.equal(p, q) and p is not q and q.dtype == torch.float64
    inp, h, _ = make_input(a, "seq")
    torch.testing.assert_close(b(inp, h)[0], a(inp, h)[0], **TOL[torch.float64])
    c = b.to_torch()
    assert type(c) is nn.LSTM and not c.training and repr(c) == repr(a)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q) and p is not q and p.requires_grad == q.requires_grad
    torch.testing.assert_close(c(inp, h)[0], a(inp, h)[0], **TOL[torch.float64])
    # copies: changing one does not change the other
    with torch.no_grad():
        b.weight_ih_l0.add_(1)
    assert not torch.equal(a.weight_ih_l0, b.weight_ih_l0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(3, 4, batch_first=True)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, 2, batch_first=True))
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.GRU(4, 4)])
        self.shared = self.enc  # the same module twice

    def forward(self, x):
        y, _ = self.enc(x)
        y = self.body[0](y)
        y, _ = self.body[1](y)
        return self.heads[0](y)


def _net_input_output_params():
    """A _Net, an input, its output and its Parameters before any conversion."""
    torch.manual_seed(0)
    net = _Net().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    return net, x, net(x), list(net.parameters())


def test_convert_model(backend):
    net, x, exp, params_before = _net_input_output_params()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = lstm_fused.convert(net, backend=backend)
    assert out is net
    assert type(net.enc) is lstm_fused.LSTM and type(net.body[1]) is lstm_fused.LSTM
    assert net.shared is net.enc
    assert type(net.heads[1]) is nn.GRU
    assert not any(isinstance(m, nn.LSTM) for m in net.modules())
    assert not net.enc.training and net.enc.batch_first and net.enc.backend == backend
    # same Parameter objects: the optimizer still updates the converted model
    assert list(net.parameters()) == params_before
    torch.testing.assert_close(net(x), exp, **TOL[torch.float64])
    net.train()
    net(x).sum().backward()
    before = net.enc.weight_ih_l0.detach().clone()
    opt.step()
    assert not torch.equal(before, net.enc.weight_ih_l0)


def test_convert_lstm_itself(backend):
    a = nn.LSTM(3, 4, dtype=torch.float64)
    b = lstm_fused.convert(a, backend=backend)
    assert type(b) is lstm_fused.LSTM and b.weight_ih_l0 is a.weight_ih_l0
    assert b.training
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(b(x)[0], a(x)[0], **TOL[torch.float64])


def test_convert_leaves_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass

    net = nn.Sequential(MyLSTM(3, 4))
    lstm_fused.convert(net, backend="reference")
    assert type(net[0]) is MyLSTM


def _rng_states():
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


def _assert_rng_untouched(before):
    after = _rng_states()
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_conversions_draw_no_random_numbers(backend):
    """from_torch, to_torch, convert and revert leave every RNG (CPU and CUDA generators)
    as they found it, and the weights are the source module's, each with its dtype."""
    torch.manual_seed(0)
    a = nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2, dtype=torch.float64)
    a.bias_hh_l1.data = a.bias_hh_l1.data.float()  # a parameter with a dtype of its own
    net = nn.Sequential(nn.LSTM(3, 4))
    before = _rng_states()
    b = lstm_fused.LSTM.from_torch(a, backend=backend)
    c = b.to_torch()
    d = lstm_fused.LSTM.from_torch(a, backend=backend, share_parameters=True)
    e = d.to_torch(share_parameters=True)
    lstm_fused.revert(lstm_fused.convert(net, backend=backend))
    _assert_rng_untouched(before)
    for m in (b, c, d, e):
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in a.named_parameters()]
        for p, q in zip(a.parameters(), m.parameters()):
            assert torch.equal(p, q) and (p.dtype, p.device) == (q.dtype, q.device)
    assert all(p is q for p, q in zip(a.parameters(), e.parameters()))
    assert not any(p is q for p, q in zip(a.parameters(), c.parameters()))
    assert type(net[0]) is nn.LSTM


def test_converted_program_draws_the_same_dropout_masks(backend):
    """A training step after convert draws the same random numbers as before it: the
    dropout mask after the LSTM is the unconverted program's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LSTM(3, 16), nn.Dropout(0.5)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def masked_output():
        h, _ = net[0](x)
        return net[1](h), h

    torch.manual_seed(7)
    expected, expected_h = masked_output()
    torch.manual_seed(7)
    lstm_fused.convert(net, backend=backend)
    out, h = masked_output()
    assert torch.equal(out == 0, expected == 0)
    torch.testing.assert_close(h, expected_h, **TOL[torch.float64])


def test_revert_is_the_inverse_of_convert(backend):
    net, x, exp, params_before = _net_input_output_params()
    lstm_fused.convert(net, backend=backend)
    assert lstm_fused.revert(net) is net
    assert type(net.enc) is nn.LSTM and type(net.body[1]) is nn.LSTM
    assert net.shared is net.enc and type(net.heads[1]) is nn.GRU
    assert not any(isinstance(m, lstm_fused.LSTM) for m in net.modules())
    assert not net.enc.training and net.enc.batch_first
    assert all(p is q for p, q in zip(net.parameters(), params_before, strict=True))
    torch.testing.assert_close(net(x), exp, **TOL[torch.float64])
    # the model itself
    a = lstm_fused.LSTM(3, 4, dtype=torch.float64, backend=backend)
    b = lstm_fused.revert(a)
    assert type(b) is nn.LSTM and b.weight_ih_l0 is a.weight_ih_l0
    torch.testing.assert_close(b(x)[0], a(x)[0], **TOL[torch.float64])


def test_revert_keeps_forget_bias_weights_and_leaves_subclasses_alone():
    class MyLSTM(lstm_fused.LSTM):
        pass

    net = nn.Sequential(lstm_fused.LSTM(3, 4, forget_bias=1.0, backend="reference"),
                        MyLSTM(4, 4, backend="reference"))
    forget_gate = net[0].bias_ih_l0.detach()[4:8].clone()
    lstm_fused.revert(net)
    assert type(net[0]) is nn.LSTM and type(net[1]) is MyLSTM
    assert torch.equal(net[0].bias_ih_l0.detach()[4:8], forget_gate)


def test_revert_refuses_what_nn_lstm_cannot_express(backend):
    """bptt_clip changes the gradients and nn.LSTM has no such option: revert (and to_torch)
    raise before replacing anything. A module being recorded cannot be reverted either."""
    net = nn.Sequential(lstm_fused.LSTM(3, 4, backend=backend),
                        lstm_fused.LSTM(4, 4, backend=backend, bptt_clip=0.5))
    with pytest.raises(ValueError, match=r"'1' clips the gradient inside BPTT.*set_bptt_clip"):
        lstm_fused.revert(net)
    assert type(net[0]) is lstm_fused.LSTM  # nothing replaced
    with pytest.raises(ValueError, match="nn.LSTM cannot express"):
        net[1].to_torch()
    net[1].set_bptt_clip(None)
    with lstm_fused.record_gradient_flow(net):
        with pytest.raises(RuntimeError, match="being recorded by record_gradient_flow"):
            lstm_fused.revert(net)
    lstm_fused.revert(net)
    assert [type(m) for m in net] == [nn.LSTM, nn.LSTM]


def test_quantize_dynamic_needs_revert(backend):
    """torch.ao.quantization.quantize_dynamic matches nn.LSTM only: it leaves
    lstm_fused.LSTM as it is, and quantizes the reverted model's LSTM."""
    quantization = pytest.importorskip("torch.ao.quantization")
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("no CPU quantized engine in this torch build")
    torch.manual_seed(0)
    net = nn.Sequential(nn.LSTM(3, 8))
    x = torch.randn(5, 2, 3)
    expected, _ = net(x)
    lstm_fused.convert(net, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        skipped = quantization.quantize_dynamic(net, {nn.LSTM}, dtype=torch.qint8)
        assert type(skipped[0]) is lstm_fused.LSTM
        quantized = quantization.quantize_dynamic(lstm_fused.revert(net), {nn.LSTM},
                                                  dtype=torch.qint8)
    assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM
    out, _ = quantized[0](x)
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)  # int8 weights


# --- functional API -------------------------------------------------------------------------

def test_functional_lstm_matches_module(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2,
                          bidirectional=True, proj_size=K)
    inp, (h0, c0), _ = make_input(ref, "seq")
    o, hy, cy = functional.lstm(inp, h0, c0, ours._flat_weights, True, K, 2, 0.0, False, True,
                                backend=backend)
    r, (rh, rc) = ref(inp, (h0, c0))
    for a, b in ((o, r), (hy, rh), (cy, rc)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    with pytest.raises(ValueError, match="unknown LSTM backend"):
        functional.lstm(inp, h0, c0, ours._flat_weights, True, K, 2, 0.0, False, True,
                        backend="nope")
    with pytest.raises(ValueError, match="flow_probes must have one entry per layer"):
        functional.lstm(inp, h0, c0, ours._flat_weights, True, K, 2, 0.0, False, True,
                        backend=backend, flow_probes=[None])
    with pytest.raises(ValueError, match="expected 20 weights"):
        functional.lstm(inp, h0, c0, ours._flat_weights[:-1], True, K, 2, 0.0, False, True,
                        backend=backend)
    per_sequence_probes = [torch.zeros(2, 5, 5, dtype=torch.float64, requires_grad=True)] * 2
    with pytest.raises(ValueError, match="cannot be used with norm clipping"):
        functional.lstm(inp, h0, c0, ours._flat_weights, True, K, 2, 0.0, False, True,
                        backend=backend, flow_probes=per_sequence_probes, bptt_clip=0.1,
                        bptt_clip_mode=2)


def test_available_backends():
    names = functional.available_backends()
    assert "reference" in names
    assert set(names) <= set(functional.BACKENDS)
    for p in BACKEND_PARAMS:
        name = p.values[0]
        assert (name in names) == (not p.marks)


# --- clipping / flow hooks through the module ----------------------------------------------

def test_bptt_clip_attributes_reach_the_backend(backend):
    ref, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2)
    inp, h, leaves = make_input(ref, "seq", T=6)
    base = run_and_grad(ours, inp, h, leaves)[2]
    ours.bptt_clip, ours.bptt_clip_mode = 0.01, 1
    clipped = run_and_grad(ours, inp, h, leaves)[2]
    assert not torch.allclose(base[0], clipped[0])
    # and it is what the reference computes
    oracle = lstm_fused.LSTM.from_torch(ref, backend="reference")
    oracle.bptt_clip, oracle.bptt_clip_mode = 0.01, 1
    for a, b in zip(clipped, run_and_grad(oracle, inp, h, leaves)[2]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


NON_REFERENCE = [p for p in BACKEND_PARAMS if p.values[0] != "reference"]


# probe channels: 3 = the flow per step t, 5 = also per step before each sequence's last one
# (not with norm clipping, which functional.lstm refuses for it)
CLIP_AND_PROBE = [(0, 0.0, 3), (1, 0.02, 3), (2, 0.05, 3), (0, 0.0, 5), (1, 0.02, 5)]


@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("mode,clip,channels", CLIP_AND_PROBE)
@pytest.mark.parametrize("kind", ["seq", "packed_unsorted"])
def test_clip_and_flow_match_reference(backend, mode, clip, channels, kind):
    """Gradients under BPTT clipping, and the flow telemetry, equal the reference's."""
    _, ours = make_pair(backend, input_size=I, hidden_size=H, num_layers=2,
                        bidirectional=True, proj_size=K)
    oracle = copy.deepcopy(ours)
    oracle.backend = "reference"
    kw = dict(lengths=[3, 5, 2]) if kind.startswith("packed") else dict(T=5)
    inp, h, leaves = make_input(ours, kind, **kw)
    T = 5
    results = []
    for m in (ours, oracle):
        probes = [torch.zeros(2, T, channels, dtype=torch.float64, requires_grad=True)
                  for _ in range(2)]
        m.flow_recorder = lambda mod, x, bs, probes=probes: probes
        m.bptt_clip, m.bptt_clip_mode = clip, mode
        _, vals, grads = run_and_grad(m, inp, h, leaves + probes)
        results.append((vals, grads))
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# --- torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["seq_bf", "unbatched"])
def test_compile_fullgraph(backend, kind):
    torch._dynamo.reset()
    ikind, batch_first, kw = KINDS[kind]
    # small: Dynamo unrolls the reference's time loop
    ref, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                          num_layers=2 if kind == "seq_bf" else 1,
                          bidirectional=kind == "seq_bf", batch_first=batch_first)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    inp, h, leaves = make_input(ref, ikind, T=3, B=2, dtype=torch.float32, **kw)
    out_ref, vals_ref, grads_ref = run_and_grad(ref, inp, h, leaves)
    out_c, vals_c, grads_c = run_and_grad(compiled, inp, h, leaves)
    assert_same_structure(out_ref, out_c)
    for a, b in zip(vals_ref + list(grads_ref), vals_c + list(grads_c)):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_compile_fullgraph_with_clip_and_flow(backend):
    """The gradient-flow hooks (bptt_clip attributes, flow_recorder) compile fullgraph and
    give what eager gives."""
    torch._dynamo.reset()
    _, ours = make_pair(backend, dtype=torch.float32, input_size=I, hidden_size=H,
                        num_layers=2)
    ours.bptt_clip, ours.bptt_clip_mode = 0.05, 2
    inp, h, leaves = make_input(ours, "seq", T=3, B=2, dtype=torch.float32)
    results = []
    for m in (ours, torch.compile(ours, fullgraph=True, backend="aot_eager")):
        probes = [torch.zeros(1, 3, 3, requires_grad=True) for _ in range(2)]
        ours.flow_recorder = lambda mod, x, bs, probes=probes: probes
        results.append(run_and_grad(m, inp, h, leaves + probes)[2])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    assert results[1][-1].abs().sum() > 0


# --- CUDA -----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("kind", ["seq_bf", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("arch", [ARCHS[0], ARCHS[7], ARCHS[13]], ids=_arch_id)
def test_cuda_parity_float64(backend, arch, kind):
    ikind, batch_first, kw = KINDS[kind]
    ref, ours = make_pair(backend, device="cuda", input_size=I, hidden_size=H,
                          batch_first=batch_first, **arch)
    inp, h, leaves = make_input(ref, ikind, device="cuda", **kw)
    compare_modules(ref, ours, inp, h, leaves)


@requires_cuda
def test_cuda_parity_float32_no_tf32(backend):
    ref, ours = make_pair(backend, device="cuda", dtype=torch.float32, input_size=16,
                          hidden_size=32, num_layers=2, bidirectional=True, proj_size=8)
    inp, h, leaves = make_input(ref, "packed_unsorted", lengths=[9, 3, 7, 7, 1],
                                dtype=torch.float32, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compare_modules(ref, ours, inp, h, leaves)


@requires_cuda
def test_cuda_determinism(backend):
    _, ours = make_pair(backend, device="cuda", dtype=torch.float32, input_size=64,
                        hidden_size=128, num_layers=2, bidirectional=True)
    inp, h, leaves = make_input(ours, "seq", T=30, B=64, dtype=torch.float32, device="cuda")
    g1 = run_and_grad(ours, inp, h, leaves)[2]
    g2 = run_and_grad(ours, inp, h, leaves)[2]
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_device_mismatch_parity(backend):
    ref = nn.LSTM(3, 5, 2, device="cuda")
    ours = lstm_fused.LSTM(3, 5, 2, device="cuda", backend=backend)
    cases = [
        (_t(4, 2, 3),),  # input on CPU, parameters on CUDA
        (_t(4, 2, 3, device="cuda"), (_t(2, 2, 5), _t(2, 2, 5, device="cuda"))),
        (_t(4, 2, 3), (_t(2, 2, 5), _t(2, 2, 5))),
    ]
    for args in cases:
        _raises_like(lambda: ref(*args), lambda: ours(*args))
    e = _raises_like(lambda: ref(*cases[0]), lambda: ours(*cases[0]))
    assert "Input and parameter tensors are not at the same device" in str(e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_16bit_output_is_the_float32_output_rounded(dtype, grad):
    """A 16-bit layer on fp32 GEMMs (float16; bfloat16 with the 16-bit mode off) computes in
    fp32, and its sequence kernel writes h[t] in 16 bits directly (ForwardSequenceArgs::
    output_16bit): the fp32 layer's values on the same weights, rounded, bit for bit; h_n and
    c_n too. Packed rows of unequal lengths in both directions: rows of one step read their
    h0 in the step where other slices finish their h_n (H 160 at B 6: two slices on two
    threads)."""
    previous = lstm_fused.set_16bit_gemm(False)
    try:
        torch.manual_seed(0)
        m16 = lstm_fused.LSTM(24, 160, bidirectional=True, dtype=dtype)
        m32 = copy.deepcopy(m16).float()
        lengths = [30, 30, 17, 9, 1, 1]
        x = torch.randn(30, 6, 24).to(dtype)
        h0, c0 = torch.randn(2, 2, 6, 160).to(dtype)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        packed32 = pack_padded_sequence(x.float(), lengths, enforce_sorted=False)
        with torch.set_grad_enabled(grad):
            o16, (h16, c16) = m16(packed, (h0, c0))
            o32, (h32, c32) = m32(packed32, (h0.float(), c0.float()))
        assert o16.data.dtype == h16.dtype == dtype
        for a, b in ((o16.data, o32.data), (h16, h32), (c16, c32)):
            assert torch.equal(a, b.to(dtype))
    finally:
        lstm_fused.set_16bit_gemm(previous)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit_close_to_float32(backend, dtype):
    torch.manual_seed(0)
    m16 = lstm_fused.LSTM(32, 64, num_layers=2, bidirectional=True, dtype=dtype,
                          device="cuda", backend=backend)
    m32 = copy.deepcopy(m16).float()
    x = torch.randn(20, 8, 32, device="cuda").to(dtype)
    o16, _ = m16(x)
    o32, _ = m32(x.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(o16.float(), o32, atol=tol, rtol=tol)
