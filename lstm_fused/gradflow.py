"""Gradient flow through time, read from inside the fused backward.

    with lstm_fused.record_gradient_flow(model) as flow:
        loss = criterion(model(x), y)
        loss.backward()
    flow["rnn"].dh_norm        # (layers, directions, T): ||dL/dh[t]||_2 over the batch
    print(flow.report())       # per layer/direction: decay ratio and verdict
    flow.plot("flow.png")      # heatmap: time on x, layer/direction on y, log10 norm colour

How it works: for every forward inside the with-block, each recorded lstm_fused.LSTM gets one
zero "probe" tensor (directions, T, 3) with requires_grad=True per layer; the layer's backward
(fused kernels or the reference implementation) returns
[||dL/dc[t]||, ||dL/dh[t]||, mean f[t]] as the probe's gradient (docs/ARCHITECTURE.md), so the
telemetry costs nothing when no recorder is set. Norms are taken over the rows active at step
t (all of the batch, or the sequences still running for a PackedSequence), after any BPTT
clipping; t indexes the sequence, whatever the direction. For a PackedSequence of unequal
lengths the probes are (directions, T, 5): the op also returns the norms counted back from
each sequence's own last step (reference.FLOW_CHANNELS_PER_SEQUENCE), which the decay
ratios use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .module import LSTM
from .options import CLIP_MODES
from .reference import FLOW_CHANNELS_PER_SEQUENCE, acc_dtype

__all__ = ["EXPLODING_ABOVE", "VANISHING_BELOW", "FlowVerdict", "GradientFlow", "ModuleFlow",
           "heatmap_image", "log_gradients", "plot_heatmaps", "record_gradient_flow",
           "summary_writer"]

# Verdict thresholds on the decay ratio (norm where backprop through time ends over the norm
# where it starts): over T steps, 1e-3 is a loss of three orders of magnitude, the point where
# the early steps' contribution to the weight gradient is negligible in float32 training.
VANISHING_BELOW = 1e-3
EXPLODING_ABOVE = 1e3

_FLOW_FIELDS = ("dc_norm", "dh_norm", "forget_mean")  # order of the op's last flow axis


@dataclass(frozen=True)
class FlowVerdict:
    """Decay of the gradient back through time for one layer and direction of one module.

    `dh_ratio` / `dc_ratio`: ||dL/dh|| (resp. ||dL/dc||) at the step where backprop through
    time ends (t=0 for the forward direction, the last step for the reverse one) divided by
    the norm at the step where it starts (normally the last step, resp. t=0; see
    decay_ratio), norms over the batch; nan when no gradient arrived. For the usual loss on
    the last step of a forward LSTM this is ||g[0]|| / ||g[T-1]||. `last_step_of`: "batch"
    when the last step is t=T-1 for every sequence (unpacked input, or packed of equal
    lengths), "sequence" when it is each sequence's own last step (packed input of unequal
    lengths: t=T-1 holds only the longest sequences). `verdict` is judged on dh_ratio:
    "vanishing" (< VANISHING_BELOW), "exploding" (> EXPLODING_ABOVE, or any non-finite
    norm), "healthy", or "no gradient". A loss on every step (or, for a lower layer of a
    stack, the layer above) feeds every dL/dh[t] directly, so the ratio then mixes carried
    and injected gradient: read the heatmap too.
    """

    module: str
    layer: int
    direction: int
    dh_ratio: float
    dc_ratio: float
    verdict: str
    last_step_of: str = "batch"


def decay_ratio(norms: Tensor, reverse: bool,
                norms_from_last_step: Tensor | None = None) -> float:
    """Norm at the far end of backprop through time over the norm at its start, for one
    direction's per-step norms (T,); nan when all are zero.

    Backprop runs from each sequence's last step down to t=0 for the forward direction and
    the other way for the reverse one; it "starts" at the first step in that order with a
    nonzero norm (a loss on the last output feeds the reverse direction's last step only,
    its far end). `norms_from_last_step` (T,): the same norms at k = 0, 1, ... steps before
    each sequence's own last step, for packed sequences of unequal lengths; None means every
    sequence ends at t=T-1 (then it is norms reversed).
    """
    if norms_from_last_step is None:
        norms_from_last_step = norms.flip(0)
    # t=0 is every sequence's first step, k=0 every sequence's last one
    start_order, far_end = ((norms, norms_from_last_step[0]) if reverse
                            else (norms_from_last_step, norms[0]))
    nonzero = start_order.nonzero()
    if len(nonzero) == 0:
        return math.nan
    return float(far_end) / float(start_order[nonzero[0, 0]])


def verdict(norms: Tensor, ratio: float) -> str:
    """The verdict of FlowVerdict for per-step norms (T,) and their decay ratio."""
    if not torch.isfinite(norms).all():
        return "exploding"
    if math.isnan(ratio):
        return "no gradient"
    if ratio < VANISHING_BELOW:
        return "vanishing"
    if ratio > EXPLODING_ABOVE:
        return "exploding"
    return "healthy"


class ModuleFlow:
    """Telemetry of one forward of one LSTM module.

    `data`: (layers, directions, T, 3), the op's flow per layer stacked; `dc_norm`,
    `dh_norm`, `forget_mean` are its (layers, directions, T) slices. For packed sequences
    of unequal lengths (layers, directions, T, 5): channels 3 and 4 are the sums of squares
    of dL/dc and dL/dh at k steps before each sequence's own last step, read through
    `dc_norm_from_last_step` / `dh_norm_from_last_step`.
    """

    def __init__(self, data: Tensor):
        if data.dim() != 4 or data.shape[-1] not in (len(_FLOW_FIELDS),
                                                     FLOW_CHANNELS_PER_SEQUENCE):
            raise ValueError("ModuleFlow expects (layers, directions, T, 3) or (..., T, 5), "
                             f"got {tuple(data.shape)}")
        self.data = data

    @property
    def per_sequence(self) -> bool:
        """True when the norms from each sequence's own last step were recorded."""
        return self.data.shape[-1] == FLOW_CHANNELS_PER_SEQUENCE

    @property
    def dc_norm_from_last_step(self) -> Tensor | None:
        """||dL/dc||_2 over the sequences at k = 0, 1, ... steps before each one's own last
        step, (layers, directions, T); None unless per_sequence."""
        return self.data[..., 3].sqrt() if self.per_sequence else None

    @property
    def dh_norm_from_last_step(self) -> Tensor | None:
        """||dL/dh||_2 like dc_norm_from_last_step."""
        return self.data[..., 4].sqrt() if self.per_sequence else None

    @property
    def dc_norm(self) -> Tensor:
        """||dL/dc[t]||_2 over the active rows, (layers, directions, T)."""
        return self.data[..., 0]

    @property
    def dh_norm(self) -> Tensor:
        """||dL/dh[t]||_2 over the active rows, (layers, directions, T)."""
        return self.data[..., 1]

    @property
    def forget_mean(self) -> Tensor:
        """Mean forget-gate activation f[t], (layers, directions, T)."""
        return self.data[..., 2]

    def row_labels(self, name: str) -> list[str]:
        """One label per (layer, direction), in the order of `rows`."""
        layers, directions = self.data.shape[:2]
        suffixes = [""] if directions == 1 else [" fwd", " rev"]
        prefix = f"{name} " if name else ""
        return [f"{prefix}layer{layer}{suffix}" for layer in range(layers) for suffix in suffixes]

    def rows(self, field: str) -> Tensor:
        """`field` ("dc_norm", "dh_norm" or "forget_mean") as (layers*directions, T)."""
        values = getattr(self, field)
        return values.reshape(-1, values.shape[-1])

    def summary(self, name: str = "") -> list[FlowVerdict]:
        """One FlowVerdict per layer and direction (decay ratios and verdict)."""
        out = []
        last_step_of = "sequence" if self.per_sequence else "batch"
        for layer in range(self.data.shape[0]):
            for direction in range(self.data.shape[1]):
                dh, dc = self.dh_norm[layer, direction], self.dc_norm[layer, direction]
                dh_from_last = dc_from_last = None
                if self.per_sequence:
                    dh_from_last = self.dh_norm_from_last_step[layer, direction]
                    dc_from_last = self.dc_norm_from_last_step[layer, direction]
                reverse = direction == 1
                dh_ratio = decay_ratio(dh, reverse, dh_from_last)
                out.append(FlowVerdict(name, layer, direction, dh_ratio,
                                       decay_ratio(dc, reverse, dc_from_last),
                                       verdict(dh, dh_ratio), last_step_of))
        return out


class GradientFlow(Mapping):
    """What `record_gradient_flow` recorded, keyed by module name (as in named_modules();
    "" when the model is itself an LSTM). `flow[name]` is the ModuleFlow of that module's
    LAST forward inside the with-block; `flow.forwards(name)` lists all of them in order
    (a module called on several sequences, or truncated-BPTT chunks). Read it after
    `loss.backward()`: the values are the gradients of the probes.
    """

    def __init__(self):
        self._probes: dict[str, list[list[Tensor]]] = {}  # name -> per forward, per layer

    def _make_probes(self, name: str, module: LSTM, input: Tensor, batch_sizes):
        # called by LSTM.forward with the time-major input the op will see (after autocast)
        if not torch.is_grad_enabled():
            return None
        steps = len(batch_sizes) if batch_sizes is not None else input.shape[0]
        directions = 2 if module.bidirectional else 1
        # Unequal lengths: also the norms from each sequence's own last step. Not under norm
        # clipping, which couples the sequences of a step: the op could not measure them
        # exactly, and the ratios stay those of the batch's last step (FlowVerdict).
        unequal_lengths = batch_sizes is not None and bool(batch_sizes[0] != batch_sizes[-1])
        channels = (FLOW_CHANNELS_PER_SEQUENCE
                    if unequal_lengths and module.bptt_clip_mode != CLIP_MODES["norm"]
                    else len(_FLOW_FIELDS))
        # the op returns flow in the acc dtype (float32 for 16-bit inputs)
        probes = [torch.zeros(directions, steps, channels, dtype=acc_dtype(input.dtype),
                              device=input.device, requires_grad=True)
                  for _ in range(module.num_layers)]
        self._probes.setdefault(name, []).append(probes)
        return probes

    def forwards(self, name: str) -> list[ModuleFlow]:
        """ModuleFlow of every recorded forward of module `name`, in call order."""
        return [self._module_flow(name, probes) for probes in self._probes[name]]

    @staticmethod
    def _module_flow(name: str, probes: list[Tensor]) -> ModuleFlow:
        if all(p.grad is None for p in probes):
            raise RuntimeError(
                f"no gradient reached the flow probes of LSTM {name!r}: run the forward inside "
                "record_gradient_flow, then loss.backward() (torch.autograd.grad does not fill "
                "the probes, and a create_graph=True backward records nothing)")
        # a layer the loss does not depend on gets no gradient at all: zero flow
        return ModuleFlow(torch.stack([torch.zeros_like(p) if p.grad is None else p.grad
                                       for p in probes]))

    def __getitem__(self, name: str) -> ModuleFlow:
        if name not in self._probes:
            raise KeyError(f"no forward of an LSTM named {name!r} was recorded; "
                           f"recorded: {sorted(self._probes)}")
        return self._module_flow(name, self._probes[name][-1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._probes)

    def __len__(self) -> int:
        return len(self._probes)

    def summary(self) -> list[FlowVerdict]:
        """FlowVerdict per module, layer and direction (last forward of each module)."""
        return [v for name, module_flow in self.items() for v in module_flow.summary(name)]

    def report(self) -> str:
        """summary() as a text table; column "last step" says where the ratios put the end
        of the sequences (FlowVerdict.last_step_of)."""
        last_step = {"batch": "t=T-1", "sequence": "each seq's"}
        lines = [f"{'module':<16}{'layer':>6}{'dir':>5}{'dh ratio':>12}{'dc ratio':>12}"
                 f"  {'last step':<11} verdict"]
        for v in self.summary():
            direction = "rev" if v.direction else "fwd"
            lines.append(f"{v.module or '(model)':<16}{v.layer:>6}{direction:>5}"
                         f"{v.dh_ratio:>12.3g}{v.dc_ratio:>12.3g}"
                         f"  {last_step[v.last_step_of]:<11} {v.verdict}")
        lines.append("ratio: norm over the batch where backprop through time ends / where it "
                     "starts")
        lines.append("last step: t=T-1 for every sequence, or each sequence's own (packed "
                     "input of unequal lengths)")
        return "\n".join(lines)

    def plot(self, path, relative: bool = False) -> Path:
        """Heatmaps of ||dL/dh[t]||, ||dL/dc[t]|| (log10) and mean f[t]: time on x, one row per
        module/layer/direction. relative=True divides each norm row by its maximum."""
        panels = {}
        for field, title in (("dh_norm", "||dL/dh[t]||"), ("dc_norm", "||dL/dc[t]||"),
                             ("forget_mean", "mean forget gate f[t]")):
            panels[title] = {label: row for name, module_flow in self.items()
                             for label, row in zip(module_flow.row_labels(name),
                                                   module_flow.rows(field))}
        return plot_heatmaps(panels, path, linear_panels=("mean forget gate f[t]",),
                             relative=relative)


@contextlib.contextmanager
def record_gradient_flow(model: nn.Module) -> Iterator[GradientFlow]:
    """Record the gradient flow of every lstm_fused.LSTM inside `model` (see the module doc).

    The forward must run inside the with-block; the backward may run inside or after it.
    Every forward inside the block is kept (see GradientFlow), so record a single training
    step rather than wrapping a whole training loop. A recorder already set on a module is
    replaced for the duration of the block and restored after it.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LSTM)]
    if not modules:
        raise ValueError("record_gradient_flow: the model contains no lstm_fused.LSTM "
                         "(lstm_fused.convert(model) replaces its nn.LSTM modules)")
    flow = GradientFlow()
    previous = [m.flow_recorder for _, m in modules]
    for name, m in modules:
        m.flow_recorder = partial(flow._make_probes, name)
    try:
        yield flow
    finally:
        for (_, m), recorder in zip(modules, previous):
            m.flow_recorder = recorder


# -- pictures ---------------------------------------------------------------------------------

def _log10_rows(rows: Tensor, relative: bool) -> Tensor:
    rows = rows.detach().double().cpu()
    if relative:
        rows = rows / rows.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return rows.log10()  # zeros become -inf: drawn as "no gradient"


def plot_heatmaps(panels: Mapping[str, Mapping[str, Tensor]], path, *, title: str | None = None,
                  linear_panels=(), relative: bool = False) -> Path:
    """Write a PNG with one heatmap per panel: panels = {panel title: {row label: values (T,)}}.

    Time on x, one row per label, log10 colour scale (one range for all such panels) except
    for the panels named in `linear_panels` (drawn on [0, 1]). relative=True divides each
    log-scale row by its maximum.
    Needs matplotlib.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
    except ImportError:
        raise ImportError("plotting the gradient flow needs matplotlib: "
                          "pip install matplotlib (or pip install lstm_fused[plot])") from None
    grids = {}  # panel title -> (rows, T) values as drawn
    for panel_title, rows in panels.items():
        if rows:
            values = torch.stack([torch.as_tensor(r).detach().double().cpu()
                                  for r in rows.values()])
            log = panel_title not in linear_panels
            grids[panel_title] = (list(rows), _log10_rows(values, relative) if log else values, log)
    if not grids:
        raise ValueError("nothing to plot: no rows (was any forward recorded?)")
    # one colour range for all log panels, so that their colours compare
    finite = [v[torch.isfinite(v)] for _, v, log in grids.values() if log]
    finite = torch.cat(finite) if finite else torch.zeros(0)
    log_range = (float(finite.min()), float(finite.max())) if finite.numel() else (-1.0, 0.0)
    num_rows = sum(len(labels) for labels, _, _ in grids.values())
    fig = Figure(figsize=(10, 1.2 + 0.32 * num_rows + 0.9 * len(grids)), layout="constrained")
    axes = fig.subplots(len(grids), 1, squeeze=False)[:, 0]
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # -inf/nan: no gradient there
    for ax, (panel_title, (labels, values, log)) in zip(axes, grids.items()):
        vmin, vmax = log_range if log else (0.0, 1.0)
        image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest",
                          vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("time step t")
        colour_label = ("log10 (norm / row max)" if relative else "log10 norm") if log else None
        fig.colorbar(image, ax=ax, label=colour_label, pad=0.01)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# viridis at 0, 1/4, 1/2, 3/4, 1
_VIRIDIS = torch.tensor([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                         [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])


def heatmap_image(rows: Tensor, pixels_per_row: int = 8) -> Tensor:
    """log10 of non-negative rows (R, T) as an RGB image (3, R*pixels_per_row, T) in [0, 1],
    viridis-like, for TensorBoard's add_image; needs no matplotlib. Zeros are black."""
    logged = _log10_rows(rows, relative=False)
    finite = torch.isfinite(logged)
    lo = logged[finite].min() if finite.any() else torch.tensor(0.0, dtype=logged.dtype)
    hi = logged[finite].max() if finite.any() else lo
    scaled = ((logged - lo) / (hi - lo).clamp_min(1e-12)).nan_to_num(0.0).clamp(0, 1)
    position = scaled * (len(_VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (position - low).unsqueeze(-1).float()
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac  # (R, T, 3)
    rgb = rgb * finite.unsqueeze(-1)
    return rgb.repeat_interleave(pixels_per_row, dim=0).permute(2, 0, 1).contiguous()


# -- TensorBoard ------------------------------------------------------------------------------

def summary_writer(log_dir, **kwargs):
    """torch.utils.tensorboard.SummaryWriter(log_dir), with a clear message when tensorboard
    is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging needs tensorboard: pip install tensorboard "
                          "(or pip install lstm_fused[tensorboard])") from None
    return SummaryWriter(log_dir, **kwargs)


def log_gradients(writer, model: nn.Module, step: int, flow: GradientFlow | None = None) -> None:
    """Log gradients to a TensorBoard SummaryWriter (see summary_writer) after backward.

    Every parameter with a gradient: histogram `gradients/{name}`. With `flow` (from
    record_gradient_flow), per recorded LSTM, layer and direction `{row}`:
    `gradient_flow/{module}/{row}/dh_norm` and `.../dc_norm`, raw histograms whose buckets
    are the time steps and whose heights are the norms (TensorBoard's histogram view then
    shows the norm over time, one curve per training step); scalars `.../dh_ratio`,
    `.../dc_ratio` (FlowVerdict); and images `gradient_flow/{module}/dh_norm` and `dc_norm`,
    the log10 heatmaps (heatmap_image).
    """
    for name, p in model.named_parameters():
        if p.grad is not None:
            writer.add_histogram(f"gradients/{name}", p.grad.detach(), step)
    if flow is None:
        return
    for name, module_flow in flow.items():
        prefix = f"gradient_flow/{name or 'lstm'}"
        labels = [label.replace(" ", "_") for label in module_flow.row_labels("")]
        for field in ("dh_norm", "dc_norm"):
            rows = module_flow.rows(field).detach().double().cpu()
            for label, norms in zip(labels, rows):
                _add_series_histogram(writer, f"{prefix}/{label}/{field}", norms, step)
            writer.add_image(f"{prefix}/{field}", heatmap_image(rows), step)
        for label, v in zip(labels, module_flow.summary(name)):
            writer.add_scalar(f"{prefix}/{label}/dh_ratio", v.dh_ratio, step)
            writer.add_scalar(f"{prefix}/{label}/dc_ratio", v.dc_ratio, step)


def _add_series_histogram(writer, tag: str, values: Tensor, step: int) -> None:
    # a "histogram over time": bucket t holds values[t] (bucket limits are the right edges)
    steps = torch.arange(1, len(values) + 1, dtype=torch.float64)
    values = values.nan_to_num(0.0, posinf=0.0)
    writer.add_histogram_raw(
        tag, min=0.0, max=float(len(values)), num=float(values.sum()),
        sum=float((values * (steps - 0.5)).sum()),
        sum_squares=float((values * (steps - 0.5) ** 2).sum()),
        bucket_limits=steps.tolist(), bucket_counts=values.tolist(), global_step=step)
