"""The options of one LSTM layer: what every backend of functional.BACKENDS takes, and what
the ops take as their one `float[] options` argument (csrc/layer_options.h decodes it).

A new layer option is one more field here and one more slot there, never one more op argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LayerOptions", "CLIP_MODES", "LAYER_NORM_EPS"]

# bptt_clip_mode codes (csrc/lstm_steps.h ClipMode)
CLIP_MODES = {"off": 0, "value": 1, "norm": 2}

# eps of every layer normalisation of layer_norm=True (csrc/lstm_cell.h kLayerNormEps)
LAYER_NORM_EPS = 1e-5


def _probability(value, name):
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) values may be symbolic
    if not (value == value and 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class LayerOptions:
    """One layer's structure, cell variants and BPTT options.

    has_biases, has_proj, bidirectional: the layout of the layer's parameters (as nn.LSTM's
    bias, proj_size > 0, bidirectional). bptt_clip (>= 0, 0 = off) and bptt_clip_mode (0 off,
    1 element-wise clamp, 2 norm rescaling per step): gradient clipping inside BPTT.

    Cell variants (all off by default; off is nn.LSTM's cell):
    layer_norm: the gate pre-activations and the cell state are layer-normalised; the params
    hold four more tensors per direction after its usual ones (ln_ih (4H), ln_hh (4H),
    ln_cell_weight (H), ln_cell_bias (H)).
    recurrent_dropout: `masks` holds a recurrent-dropout mask (D, B, P), applied to h[t-1]
    before the product with W_hh at every step.
    zoneout_cell, zoneout_hidden (in [0, 1)): zoneout probabilities of c and h. With
    `training`, `masks` holds a 0/1 mask (D, N, H) for c (when zoneout_cell > 0) and (D, N, P)
    for h (when zoneout_hidden > 0), 1 keeping the previous state; without, the cell mixes
    the previous and the new state with the expectation zoneout_* (eval mode).

    inference: the caller needs no backward of this call. layer_forward then keeps no
    per-step state (the activated gates and c[t] are what the backward reads: (N, 5H) values
    per direction in the compute dtype) and returns gates, cells and products empty, (0,) each.
    functional.lstm sets it on every call; the op's autograd kernel clears it again when it
    records the call for a backward, so it only takes effect where no gradient is needed.
    """

    has_biases: bool = True
    has_proj: bool = False
    bidirectional: bool = False
    bptt_clip: float = 0.0
    bptt_clip_mode: int = 0
    layer_norm: bool = False
    recurrent_dropout: bool = False
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0
    training: bool = False
    inference: bool = False

    def __post_init__(self):
        clip = self.bptt_clip
        if not (clip == clip and 0 <= clip < math.inf):
            raise ValueError(f"bptt_clip must be a finite value >= 0 (0 = off), got "
                             f"{self.bptt_clip!r}")
        if self.bptt_clip_mode not in CLIP_MODES.values():
            raise ValueError(f"bptt_clip_mode must be 0 (off), 1 (value) or 2 (norm), got "
                             f"{self.bptt_clip_mode!r}")
        _probability(self.zoneout_cell, "zoneout_cell")
        _probability(self.zoneout_hidden, "zoneout_hidden")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def clip_mode(self) -> int:
        """The clip mode that runs: off unless a clip value is set."""
        return self.bptt_clip_mode if self.bptt_clip > 0 else 0

    @property
    def zoneout_masks(self) -> bool:
        """Whether the zoneout states are mixed by masks (training) rather than by their
        expectation."""
        return self.training and (self.zoneout_cell > 0 or self.zoneout_hidden > 0)

    def mask_names(self) -> list[str]:
        """The names of the tensors `masks` holds, in order."""
        names = ["recurrent_dropout_mask"] if self.recurrent_dropout else []
        if self.training and self.zoneout_cell > 0:
            names.append("zoneout_cell_mask")
        if self.training and self.zoneout_hidden > 0:
            names.append("zoneout_hidden_mask")
        return names

    def mask_shapes(self, batch: int, rows: int, hidden: int, out_size: int) -> list[tuple]:
        """The shapes of the tensors `masks` holds, as mask_names orders them: B = batch,
        N = rows, H = hidden, P = out_size."""
        D = self.directions
        shapes = {"recurrent_dropout_mask": (D, batch, out_size),
                  "zoneout_cell_mask": (D, rows, hidden),
                  "zoneout_hidden_mask": (D, rows, out_size)}
        return [shapes[name] for name in self.mask_names()]

    def param_names(self) -> list[str]:
        """The names of one direction's params, in order."""
        return (["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.has_biases else [])
                + (["weight_hr"] if self.has_proj else [])
                + (["layer_norm_ih", "layer_norm_hh", "layer_norm_cell_weight",
                    "layer_norm_cell_bias"] if self.layer_norm else []))

    def to_list(self) -> list[float]:
        """The ops' `options` argument: the fields in order, as floats."""
        return [float(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values) -> "LayerOptions":
        """The inverse of to_list (the fake kernels decode the argument with it)."""
        fields = dataclasses.fields(cls)
        if len(values) != len(fields):
            raise ValueError(f"lstm_fused: options must have {len(fields)} entries "
                             f"({', '.join(f.name for f in fields)}), got {len(values)}")
        kwargs = {}
        for f, v in zip(fields, values):
            if f.type in ("bool", bool):
                if v not in (0, 1):
                    raise ValueError(f"lstm_fused: options.{f.name} must be 0 or 1, got {v}")
                v = bool(v)
            elif f.type in ("int", int):
                if v != int(v):
                    raise ValueError(f"lstm_fused: options.{f.name} must be an integer, got {v}")
                v = int(v)
            kwargs[f.name] = v
        return cls(**kwargs)
