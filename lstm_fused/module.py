"""`lstm_fused.LSTM`: a drop-in replacement for torch.nn.LSTM over the backends registry.

It subclasses nn.RNNBase (mode "LSTM"), not nn.LSTM: Dynamo refuses any nn.LSTM instance,
so a subclass could never compile with fullgraph=True. RNNBase provides the constructor
validation, parameter names and init, `_flat_weights`, `_apply`, `extra_repr` and pickling;
the LSTM-specific argument checks are nn.LSTM's own methods, so messages are identical.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import torch
import torch.nn as nn
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence

from . import functional

__all__ = ["LSTM", "convert", "revert"]

# c10's names for dtypes, as nn.LSTM's C++ checks print them
_C10_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


# bptt_clip_mode names -> the ops' int codes (0 is off)
_BPTT_CLIP_MODES = {"value": 1, "norm": 2}


def _is_probability(value) -> bool:
    """A number (not a bool) in [0, 1)."""
    return (isinstance(value, numbers.Number) and not isinstance(value, bool)
            and 0 <= value < 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _in_onnx_export() -> bool:
    """True while torch.onnx.export captures the model, with either exporter: the legacy one
    (dynamo=False) traces with torch.jit, the dynamo one runs torch.export, and both set
    torch.onnx.is_in_onnx_export(). The cheap checks come first, so that an eager forward
    pays two flag reads and never imports torch.onnx (a lazily imported module); under
    torch.compile Dynamo folds both to False."""
    return ((torch.jit.is_tracing() or torch.compiler.is_exporting())
            and _onnx_export_flag())


def _onnx_export_flag() -> bool:
    return torch.onnx.is_in_onnx_export()


# The dynamo exporter captures with torch.export(strict=False) and, when that fails, retries
# with strict=True, where Dynamo traces the forward and folds torch.onnx.is_in_onnx_export()
# to False. Marked as torch.compiler.assume_constant_result marks a function (which would
# import torch._dynamo, 1.3 s, at import time), Dynamo calls it instead and takes the real
# flag, so the strict retry too exports ONNX LSTM nodes or raises our error.
_onnx_export_flag._dynamo_marked_constant = True


class LSTM(nn.RNNBase):
    r"""Multi-layer LSTM with fused kernels; same arguments, parameters, inputs and outputs
    as :class:`torch.nn.LSTM`.

    Extra keyword-only argument ``backend``: a key of
    :data:`lstm_fused.functional.BACKENDS` ("fused" — the compiled ops, default — or
    "reference", plain PyTorch).

    Extra keyword-only arguments that depart from nn.LSTM (off by default):

    - ``bptt_clip`` (float or None) and ``bptt_clip_mode`` ("value" or "norm"): clip the
      gradient inside backpropagation through time, at every step, before it flows on to the
      earlier steps: ``"value"`` clamps dL/dh[t] and dL/dc[t] element-wise to
      [-bptt_clip, bptt_clip] (Graves 2013), ``"norm"`` rescales each so that its L2 norm over
      the batch is at most bptt_clip. This CHANGES the gradients (the forward is unchanged);
      see :meth:`set_bptt_clip`.
    - ``forget_bias`` (float or None): None keeps nn.LSTM's initialisation exactly; a float
      sets the forget-gate slice [H:2H] of every ``bias_ih`` to forget_bias and of every
      ``bias_hh`` to 0, so the forget gate's total bias is forget_bias (1.0 is Jozefowicz et
      al. 2015, Keras' unit_forget_bias). Applied again by reset_parameters().

    Cell variants, fused into the kernels (off by default; off is exactly nn.LSTM: same
    parameters, state_dict keys and numbers; formulas in docs/ARCHITECTURE.md):

    - ``layer_norm`` (bool): layer normalisation (Ba et al. 2016, in haste's LayerNormLSTM
      form) of the input and recurrent gate pre-activations, each over its 4H entries with
      its own gain, and of the cell state before the output tanh (gain and bias). Adds the
      parameters ``layer_norm_ih_l{k}{sfx}`` (4H, init 1), ``layer_norm_hh_l{k}{sfx}`` (4H,
      init 1), ``layer_norm_cell_weight_l{k}{sfx}`` (H, init 1) and
      ``layer_norm_cell_bias_l{k}{sfx}`` (H, init 0).
    - ``recurrent_dropout`` (p in [0, 1)): variational dropout of h[t-1] before the product
      with W_hh (Gal & Ghahramani 2016), one mask per layer and direction for all steps; in
      training mode only.
    - ``zoneout`` (z or (z_c, z_h), each in [0, 1)): zoneout of the cell and hidden states
      (Krueger et al. 2017): in training each unit keeps its previous value with probability
      z at every step; in eval mode the states mix with the expectation z.
    - ``residual`` (bool, num_layers > 1): from the second layer on, each layer's output adds
      its input (Wu et al. 2016); h_n and c_n are unchanged.

    The random masks of a training forward are drawn by lstm_fused.functional.draw_masks,
    in the order it documents, before the dropout between layers.

    Attributes used by the gradient-flow tooling (defaults leave the computation unchanged):
    ``bptt_clip`` (float, 0 = off) and ``bptt_clip_mode`` (0 off, 1 element-wise, 2 norm):
    clipping of dL/dh[t] and dL/dc[t] inside BPTT; ``flow_recorder``: None, or a callable
    ``recorder(module, input, batch_sizes) -> list | None`` returning one flow probe (or
    None) per layer for this forward (see functional.lstm and lstm_fused.gradflow).
    """

    def __init__(self, *args, backend: str = "fused", bptt_clip: float | None = None,
                 bptt_clip_mode: str = "value", forget_bias: float | None = None,
                 layer_norm: bool = False, recurrent_dropout: float = 0.0, zoneout=0.0,
                 residual: bool = False, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        if backend not in functional.BACKENDS:
            raise ValueError(
                f"backend must be one of {sorted(functional.BACKENDS)}, got {backend!r}")
        self._set_variants(layer_norm, recurrent_dropout, zoneout, residual)
        self.backend = backend
        self.flow_recorder = None
        self.set_bptt_clip(bptt_clip, bptt_clip_mode)
        if forget_bias is not None and not self.bias:
            raise ValueError("forget_bias needs bias=True")
        self.forget_bias = forget_bias
        self._init_forget_bias()
        if backend == "fused":
            # Load the op library now (not inside a compiled forward); a failure is reported
            # by the first forward, so that constructing the module never needs the build.
            functional.backend_unavailable_reason("fused")

    def _set_variants(self, layer_norm, recurrent_dropout, zoneout, residual) -> None:
        # checked as nn.RNNBase checks its own arguments, in its words
        for name, value in (("layer_norm", layer_norm), ("residual", residual)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        if not _is_probability(recurrent_dropout):
            raise ValueError(
                "recurrent_dropout should be a number in range [0, 1) representing the "
                "probability of an element of h[t-1] being zeroed")
        pair = zoneout if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
        if len(pair) != 2 or not all(_is_probability(z) for z in pair):
            raise ValueError(
                "zoneout should be a number in range [0, 1), or a pair of them (z_c, z_h), "
                "representing the probability of a unit keeping its previous state")
        if residual and self.num_layers == 1:
            raise ValueError(
                "residual option adds each layer's input to its output from the second layer "
                "on, so residual=True expects num_layers greater than 1, but got num_layers="
                f"{self.num_layers}")
        self.layer_norm = layer_norm
        self.recurrent_dropout = float(recurrent_dropout)
        self.zoneout = (float(pair[0]), float(pair[1]))
        self.residual = residual
        if not layer_norm:
            return
        # after each direction's usual parameters, as the ops take them
        factory = dict(device=self.weight_ih_l0.device, dtype=self.weight_ih_l0.dtype)
        H = self.hidden_size
        names, groups = [], []
        for group in self._all_weights:
            suffix = group[0][len("weight_ih"):]  # "_l{k}" or "_l{k}_reverse"
            extra = [f"layer_norm_ih{suffix}", f"layer_norm_hh{suffix}",
                     f"layer_norm_cell_weight{suffix}", f"layer_norm_cell_bias{suffix}"]
            for name, size in zip(extra, (4 * H, 4 * H, H, H)):
                setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
            groups.append(list(group) + extra)
            names += groups[-1]
        self._flat_weights_names = names
        self._all_weights = groups
        self._init_flat_weights()
        self._init_layer_norm()

    def _init_layer_norm(self) -> None:
        if not getattr(self, "layer_norm", False):
            return
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("layer_norm_"):
                    p.fill_(0.0 if name.startswith("layer_norm_cell_bias") else 1.0)

    @property
    def has_variants(self) -> bool:
        """Whether a cell variant (layer_norm, recurrent_dropout, zoneout, residual) is on."""
        return (self.layer_norm or self.recurrent_dropout > 0 or any(self.zoneout)
                or self.residual)

    # nn.LSTM's own argument checks and hidden-state handling (identical messages)
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __setstate__(self, d):
        super().__setstate__(d)
        self.__dict__.setdefault("backend", "fused")
        self.__dict__.setdefault("flow_recorder", None)
        self.__dict__.setdefault("bptt_clip", 0.0)
        self.__dict__.setdefault("bptt_clip_mode", 0)
        self.__dict__.setdefault("forget_bias", None)
        self.__dict__.setdefault("layer_norm", False)
        self.__dict__.setdefault("recurrent_dropout", 0.0)
        self.__dict__.setdefault("zoneout", (0.0, 0.0))
        self.__dict__.setdefault("residual", False)

    def flatten_parameters(self) -> None:
        """No-op: the kernels read the parameters where they are (kept for API parity)."""

    def set_bptt_clip(self, clip: float | None, mode: str = "value") -> None:
        """Clip dL/dh[t] and dL/dc[t] at every step of BPTT: mode "value" clamps element-wise
        to [-clip, clip], "norm" rescales to L2 norm <= clip; clip None turns it off."""
        if mode not in _BPTT_CLIP_MODES:
            raise ValueError(
                f"bptt_clip_mode must be one of {list(_BPTT_CLIP_MODES)}, got {mode!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"bptt_clip must be None (off) or > 0, got {clip!r}")
        self.bptt_clip = 0.0 if clip is None else float(clip)
        self.bptt_clip_mode = 0 if clip is None else _BPTT_CLIP_MODES[mode]

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation, then the forget_bias (when set) and the layer-norm
        parameters' (gains 1, cell bias 0)."""
        super().reset_parameters()
        self._init_forget_bias()
        self._init_layer_norm()

    def _init_forget_bias(self) -> None:
        # RNNBase.__init__ calls reset_parameters before forget_bias is set
        forget_bias = getattr(self, "forget_bias", None)
        if forget_bias is None:
            return
        gate = slice(self.hidden_size, 2 * self.hidden_size)  # gate order i, f, g, o
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("bias_ih"):
                    p[gate].fill_(forget_bias)
                elif name.startswith("bias_hh"):
                    p[gate].zero_()

    def extra_repr(self) -> str:
        # nn.LSTM's repr, plus the options that depart from it when they are set
        extras = []
        if self.bptt_clip_mode:
            mode = next(k for k, v in _BPTT_CLIP_MODES.items() if v == self.bptt_clip_mode)
            extras.append(f"bptt_clip={self.bptt_clip}, bptt_clip_mode={mode!r}")
        if self.forget_bias is not None:
            extras.append(f"forget_bias={self.forget_bias}")
        if self.layer_norm:
            extras.append("layer_norm=True")
        if self.recurrent_dropout:
            extras.append(f"recurrent_dropout={self.recurrent_dropout}")
        if any(self.zoneout):
            z_c, z_h = self.zoneout
            extras.append(f"zoneout={z_c if z_c == z_h else self.zoneout}")
        if self.residual:
            extras.append("residual=True")
        return ", ".join([super().extra_repr(), *extras])

    def _check_packed_args(self, input: Tensor, hx, batch_sizes: Tensor) -> None:
        # nn.LSTM runs no Python checks for PackedSequence input and fails later inside
        # the kernels with RuntimeErrors; we check up front with nn.LSTM's unpacked wording
        # but keep RuntimeError as the exception type.
        if hx is not None and len(hx) != 2:  # before check_forward_args indexes hx[1]
            raise RuntimeError("lstm expects two hidden states")
        try:
            if hx is None:
                self.check_input(input, batch_sizes)
            else:
                self.check_forward_args(input, hx, batch_sizes)
        except ValueError as e:
            raise RuntimeError(str(e)) from None

    def _check_attributes(self, input: Tensor, hx) -> None:
        # what nn.LSTM's C++ entry (aten/src/ATen/native/RNN.cpp) checks, in its order; the
        # hidden dtype check is ours (nn.LSTM fails later with kernel-specific messages),
        # skipped under autocast, which casts input and hidden state alike
        if len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        for name, tensors in (("hidden", hx), ("parameter", self._flat_weights)):
            for t in tensors:
                if t.device != input.device:
                    raise RuntimeError(
                        f"Input and {name} tensors are not at the same device, found input "
                        f"tensor at {input.device} and {name} tensor at {t.device}")
        if torch.is_autocast_enabled(input.device.type):
            return
        for t in hx:
            if t.dtype != input.dtype:
                raise RuntimeError(
                    "Input and hidden tensors are not the same dtype, found input tensor "
                    f"with {_dtype_name(input.dtype)} and hidden tensor with "
                    f"{_dtype_name(t.dtype)}")

    def _zero_state(self, input: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) of zeros, as nn.LSTM uses when no hx is given."""
        layers = self.num_layers * (2 if self.bidirectional else 1)
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        options = dict(dtype=input.dtype, device=input.device)
        return (torch.zeros(layers, batch, real_hidden_size, **options),
                torch.zeros(layers, batch, self.hidden_size, **options))

    def forward(self, input, hx=None):  # noqa: C901 - mirrors nn.LSTM.forward
        self._update_flat_weights()

        # ONNX export runs the aten op nn.LSTM runs (see below); nothing else changes
        onnx_export = _in_onnx_export()
        if onnx_export and self.proj_size > 0:
            raise RuntimeError(
                "lstm_fused.LSTM: ONNX export of proj_size > 0 is not supported: ONNX's LSTM "
                "operator has no projection (nn.LSTM cannot be exported with it either)")
        if onnx_export and self.has_variants:
            raise RuntimeError(
                "lstm_fused.LSTM: ONNX export of layer_norm, recurrent_dropout, zoneout or "
                "residual is not supported: ONNX's LSTM operator has none of them")
        orig_input = input
        batch_sizes = None
        is_packed = isinstance(orig_input, PackedSequence)
        if is_packed:
            if torch.compiler.is_exporting():
                # checked here, before int(batch_sizes[0]) fails as a data-dependent guard
                onnx_hint = ("; torch.onnx.export(..., dynamo=False) exports it, as for "
                             "nn.LSTM" if onnx_export else "")
                raise RuntimeError(
                    "lstm_fused.LSTM: torch.export does not support PackedSequence input (the "
                    "graph's shapes would depend on the values of batch_sizes); export with a "
                    f"padded (T, B, *) tensor input instead{onnx_hint}")
            input, batch_sizes, sorted_indices, unsorted_indices = input
            # traced as nn.LSTM traces it under ONNX export (not a constant batch size)
            max_batch_size = batch_sizes[0] if onnx_export else int(batch_sizes[0])
            self._check_packed_args(input, hx, batch_sizes)
            if hx is None:
                hx = self._zero_state(input, max_batch_size)
            else:
                self._check_attributes(input, hx)
                # Each batch of the hidden state should match the input sequence that
                # the user believes he/she is passing in.
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = self._zero_state(input, max_batch_size)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
        self._check_attributes(input, hx)
        seq_len = batch_sizes.size(0) if is_packed else input.size(1 if self.batch_first else 0)
        if seq_len == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        h0, c0 = hx[0], hx[1]
        weights = self._flat_weights
        device_type = input.device.type
        autocasting = torch.is_autocast_enabled(device_type)
        if autocasting:
            # nn.LSTM is on autocast's lower-precision list (CPU and CUDA): cast like it does
            ac_dtype = torch.get_autocast_dtype(device_type)

            def cast(t):
                return t.to(ac_dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

            input, h0, c0 = cast(input), cast(h0), cast(c0)
            weights = [cast(w) for w in weights]
        # time-major for functional.lstm; under ONNX export batch_first goes to the aten op
        # as nn.LSTM passes it: the same graph as nn.LSTM's (with a transpose of ours after
        # the op, the dynamo exporter baked the example's sequence length into the graph)
        transpose = self.batch_first and not is_packed and not onnx_export
        if transpose:
            input = input.transpose(0, 1)
        flow_probes = None
        if self.flow_recorder is not None and not onnx_export:
            flow_probes = self.flow_recorder(self, input, batch_sizes)
        # Autocast is switched off (the inputs are cast above) only where it is on: an
        # unconditional torch.autocast(enabled=False) puts a wrap_with_autocast node around
        # the op in every torch.export graph.
        no_autocast = (torch.autocast(device_type, enabled=False) if autocasting
                       else contextlib.nullcontext())
        with no_autocast:
            if onnx_export:
                output, hy, cy = _onnx_lstm(self, input, h0, c0, weights, batch_sizes)
            else:
                output, hy, cy = functional.lstm(
                    input, h0, c0, weights, self.bias, self.proj_size, self.num_layers,
                    self.dropout, self.training, self.bidirectional, batch_sizes,
                    backend=self.backend, flow_probes=flow_probes, bptt_clip=self.bptt_clip,
                    bptt_clip_mode=self.bptt_clip_mode, layer_norm=self.layer_norm,
                    recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                    residual=self.residual)
        hidden = (hy, cy)
        if is_packed:
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        if transpose:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    # -- conversion -------------------------------------------------------------------------

    def _config(self) -> dict:
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                    dropout=self.dropout, bidirectional=self.bidirectional,
                    proj_size=self.proj_size)

    @classmethod
    def from_torch(cls, m: nn.LSTM, *, backend: str = "fused",
                   share_parameters: bool = False) -> LSTM:
        """A new LSTM with `m`'s configuration, weights (each with its device, dtype and
        requires_grad) and training mode. Draws no random numbers.

        Weights are copied, or with share_parameters=True the new module holds `m`'s own
        Parameter objects (so optimizers keep working).
        """
        if not isinstance(m, nn.LSTM):
            raise TypeError(f"from_torch expects an nn.LSTM, got {type(m).__name__}")
        with warnings.catch_warnings():
            # the dropout/num_layers warning was already shown for m
            warnings.simplefilter("ignore", UserWarning)
            new = cls(**LSTM._config(m), device="meta", backend=backend)
        _move_parameters(m, new, share_parameters)
        new.train(m.training)
        return new

    def to_torch(self, *, share_parameters: bool = False) -> nn.LSTM:
        """An nn.LSTM with this module's configuration, weights (each with its device, dtype
        and requires_grad) and training mode. Draws no random numbers.

        Raises ValueError when the module uses an option nn.LSTM cannot express (bptt_clip,
        the cell variants);
        see revert() for what is kept and what is not.
        """
        _check_expressible_by_nn_lstm(self)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            new = nn.LSTM(**self._config(), device="meta")
        _move_parameters(self, new, share_parameters)
        new.train(self.training)
        return new


def _onnx_lstm(m: LSTM, input: Tensor, h0: Tensor, c0: Tensor, weights,
               batch_sizes: Tensor | None):
    """The forward under torch.onnx.export: the aten op nn.LSTM.forward calls, on the same
    flat weights (input as given, batch_first or not, or packed data), which both exporters
    translate to ONNX LSTM nodes (one per layer). ONNX has no translation for the fused op;
    the result is the same computation: bptt_clip acts on gradients only, forget_bias is in
    the weights, and backend only picks the kernels."""
    args = (m.bias, m.num_layers, m.dropout, m.training, m.bidirectional)
    if batch_sizes is None:
        output, hy, cy = _VF.lstm(input, (h0, c0), weights, *args, m.batch_first)
    else:
        output, hy, cy = _VF.lstm(input, batch_sizes, (h0, c0), weights, *args)
    return output, hy, cy


def _check_expressible_by_nn_lstm(m: LSTM, name: str = "") -> None:
    where = f" {name!r}" if name else ""
    if m.has_variants:
        raise ValueError(
            f"lstm_fused.LSTM{where} uses layer_norm, recurrent_dropout, zoneout or residual, "
            "which nn.LSTM cannot express")
    if m.bptt_clip_mode:
        raise ValueError(
            f"lstm_fused.LSTM{where} clips the gradient inside BPTT (bptt_clip={m.bptt_clip}), "
            "which nn.LSTM cannot express; call set_bptt_clip(None) on it first to drop it")
    if m.flow_recorder is not None:
        raise RuntimeError(
            f"lstm_fused.LSTM{where} is being recorded by record_gradient_flow; convert it "
            "back after the with-block")


def _move_parameters(src: nn.RNNBase, dst: nn.RNNBase, share: bool) -> None:
    """Give dst (built on the meta device, so that no init drew random numbers) src's
    Parameter objects, or copies of them."""
    src_params = dict(src.named_parameters())
    if set(src_params) != set(dict(dst.named_parameters())):
        raise RuntimeError("parameter names differ between the LSTM modules")
    for name, p in src_params.items():
        q = p if share else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        setattr(dst, name, q)  # RNNBase.__setattr__ keeps _flat_weights in sync
    dst._init_flat_weights()


def _replace_modules(model: nn.Module, module_type: type, replace) -> nn.Module:
    """Replace (in place) every module of exactly `module_type` inside `model` by
    replace(module); a module reachable under several names is replaced once, by one new
    module. Returns the model, or the new module when `model` itself is one."""
    if type(model) is module_type:
        return replace(model)
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a module seen under another name
        for name, child in list(parent._modules.items()):
            if type(child) is module_type:
                if id(child) not in done:
                    done[id(child)] = replace(child)
                setattr(parent, name, done[id(child)])
    return model


def convert(model: nn.Module, *, backend: str = "fused") -> nn.Module:
    """Replace every torch.nn.LSTM inside `model` (in place) by an lstm_fused.LSTM holding
    the same Parameter objects (optimizers stay valid) and training mode; returns the model,
    or the new module when `model` itself is an nn.LSTM. Draws no random numbers.

    Only modules whose type is exactly nn.LSTM are replaced: a subclass may override forward.
    Forward hooks registered on a replaced module are not carried over.
    """
    return _replace_modules(
        model, nn.LSTM,
        lambda m: LSTM.from_torch(m, backend=backend, share_parameters=True))


def revert(model: nn.Module) -> nn.Module:
    """The inverse of convert: replace every lstm_fused.LSTM inside `model` (in place) by a
    torch.nn.LSTM holding the same Parameter objects and training mode; returns the model,
    or the new module when `model` itself is an lstm_fused.LSTM. Draws no random numbers.

    For tools that know only nn.LSTM (torch.ao.quantization.quantize_dynamic skips
    lstm_fused.LSTM, exporters that match nn.LSTM). The reverted module computes what the
    lstm_fused one did: `backend` only chose the kernels, and `forget_bias` is already in
    the weights (a later reset_parameters() uses nn.LSTM's init). A module with `bptt_clip`
    set raises ValueError (nn.LSTM cannot clip inside BPTT), one being recorded by
    record_gradient_flow RuntimeError; in both cases before anything is replaced. Only
    modules whose type is exactly lstm_fused.LSTM are replaced; forward hooks are not
    carried over.
    """
    for name, m in model.named_modules():
        if type(m) is LSTM:
            _check_expressible_by_nn_lstm(m, name)
    return _replace_modules(model, LSTM, lambda m: m.to_torch(share_parameters=True))
