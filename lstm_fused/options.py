"""The options of one LSTM layer: what every backend of functional.BACKENDS takes, and what
the ops take as their one `float[] options` argument (csrc/layer_options.h decodes it).

A new layer option is one more field here and one more slot there, never one more op argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LayerOptions", "CLIP_MODES"]

# bptt_clip_mode codes (csrc/lstm_steps.h ClipMode)
CLIP_MODES = {"off": 0, "value": 1, "norm": 2}


@dataclass(frozen=True)
class LayerOptions:
    """One layer's structure and BPTT options.

    has_biases, has_proj, bidirectional: the layout of the layer's parameters (as nn.LSTM's
    bias, proj_size > 0, bidirectional). bptt_clip (>= 0, 0 = off) and bptt_clip_mode (0 off,
    1 element-wise clamp, 2 norm rescaling per step): gradient clipping inside BPTT.
    """

    has_biases: bool = True
    has_proj: bool = False
    bidirectional: bool = False
    bptt_clip: float = 0.0
    bptt_clip_mode: int = 0

    def __post_init__(self):
        # comparisons, not math.isfinite: under torch.compile(dynamic=True) the clip value
        # may be a symbolic float
        clip = self.bptt_clip
        if not (clip == clip and 0 <= clip < math.inf):
            raise ValueError(f"bptt_clip must be a finite value >= 0 (0 = off), got "
                             f"{self.bptt_clip!r}")
        if self.bptt_clip_mode not in CLIP_MODES.values():
            raise ValueError(f"bptt_clip_mode must be 0 (off), 1 (value) or 2 (norm), got "
                             f"{self.bptt_clip_mode!r}")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def clip_mode(self) -> int:
        """The clip mode that runs: off unless a clip value is set."""
        return self.bptt_clip_mode if self.bptt_clip > 0 else 0

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
