// The options of one LSTM layer, as the ops take them: one `float[] options` argument (the
// schema in ops.cpp), decoded here in one place. The slots, in order, are those of
// lstm_fused/options.py (LayerOptions.to_list); tests/test_ops.py checks that both agree.
//
//   0 has_biases      0 or 1: params hold b_ih, b_hh per direction
//   1 has_proj        0 or 1: params hold W_hr per direction (proj_size > 0)
//   2 bidirectional   0 or 1: two directions
//   3 bptt_clip       >= 0 (0 = off): the clip value of BPTT gradient clipping
//   4 bptt_clip_mode  0 off, 1 element-wise clamp, 2 norm rescaling (lstm_steps.h ClipMode)
//   5 layer_norm      0 or 1: layer-normalised gates and cell; params hold, after each
//                     direction's usual ones, ln_ih (4H), ln_hh (4H), ln_cell_weight (H),
//                     ln_cell_bias (H)
//   6 recurrent_dropout  0 or 1: masks hold a recurrent-dropout mask (D, B, P)
//   7 zoneout_cell    in [0, 1): zoneout probability of c
//   8 zoneout_hidden  in [0, 1): zoneout probability of h
//   9 training        0 or 1: with zoneout, masks hold 0/1 masks (D, N, H) for c (when
//                     zoneout_cell > 0) and (D, N, P) for h (when zoneout_hidden > 0);
//                     without, the states mix with the expectation zoneout_*
//  10 inference       0 or 1: the caller needs no backward: layer_forward keeps no per-step
//                     state and returns gates, cells and products empty, (0,) each
//
// A new option appends a slot (and a field); the list has exactly kSlots entries.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "lstm_steps.h"

namespace lstm_fused {

struct LayerOptions {
  enum Slot : size_t {
    kHasBiases = 0,
    kHasProj,
    kBidirectional,
    kBpttClip,
    kBpttClipMode,
    kLayerNorm,
    kRecurrentDropout,
    kZoneoutCell,
    kZoneoutHidden,
    kTraining,
    kInference,
    kSlots,
  };

  bool has_biases = true;
  bool has_proj = false;
  bool bidirectional = false;
  double bptt_clip = 0.0;
  int64_t bptt_clip_mode = kClipOff;
  bool layer_norm = false;
  bool recurrent_dropout = false;
  double zoneout_cell = 0.0;
  double zoneout_hidden = 0.0;
  bool training = false;
  bool inference = false;

  int64_t directions() const { return bidirectional ? 2 : 1; }
  // The clip mode the kernels run: off unless a clip value is set.
  int64_t clip_mode() const { return bptt_clip > 0 ? bptt_clip_mode : kClipOff; }
  // Which zoneout masks `masks` holds (after the recurrent-dropout mask, c's before h's).
  bool zoneout_cell_mask() const { return training && zoneout_cell > 0; }
  bool zoneout_hidden_mask() const { return training && zoneout_hidden > 0; }
  int64_t mask_count() const {
    return (recurrent_dropout ? 1 : 0) + (zoneout_cell_mask() ? 1 : 0) +
           (zoneout_hidden_mask() ? 1 : 0);
  }
  // Any cell variant on (the sequence kernels take none).
  bool has_variants() const {
    return layer_norm || recurrent_dropout || zoneout_cell > 0 || zoneout_hidden > 0;
  }

  static LayerOptions from_list(c10::ArrayRef<double> values) {
    TORCH_CHECK(values.size() == kSlots, "lstm_fused: options must have ", kSlots,
                " entries (has_biases, has_proj, bidirectional, bptt_clip, bptt_clip_mode, "
                "layer_norm, recurrent_dropout, zoneout_cell, zoneout_hidden, training, inference; "
                "lstm_fused.options.LayerOptions.to_list()), got ",
                values.size());
    LayerOptions o;
    o.has_biases = flag(values, kHasBiases, "has_biases");
    o.has_proj = flag(values, kHasProj, "has_proj");
    o.bidirectional = flag(values, kBidirectional, "bidirectional");
    o.bptt_clip = values[kBpttClip];
    TORCH_CHECK(std::isfinite(o.bptt_clip) && o.bptt_clip >= 0,
                "lstm_fused: bptt_clip must be a finite value >= 0 (0 = off), got ",
                o.bptt_clip);
    const double mode = values[kBpttClipMode];
    TORCH_CHECK(mode == double(kClipOff) || mode == double(kClipValue) ||
                    mode == double(kClipNorm),
                "lstm_fused: bptt_clip_mode must be 0 (off), 1 (value) or 2 (norm), got ", mode);
    o.bptt_clip_mode = static_cast<int64_t>(mode);
    o.layer_norm = flag(values, kLayerNorm, "layer_norm");
    o.recurrent_dropout = flag(values, kRecurrentDropout, "recurrent_dropout");
    o.zoneout_cell = probability(values, kZoneoutCell, "zoneout_cell");
    o.zoneout_hidden = probability(values, kZoneoutHidden, "zoneout_hidden");
    o.training = flag(values, kTraining, "training");
    o.inference = flag(values, kInference, "inference");
    return o;
  }

 private:
  static bool flag(c10::ArrayRef<double> values, size_t slot, const char* name) {
    TORCH_CHECK(values[slot] == 0 || values[slot] == 1, "lstm_fused: options.", name,
                " must be 0 or 1, got ", values[slot]);
    return values[slot] == 1;
  }
  static double probability(c10::ArrayRef<double> values, size_t slot, const char* name) {
    TORCH_CHECK(values[slot] >= 0 && values[slot] < 1, "lstm_fused: options.", name,
                " must be in [0, 1), got ", values[slot]);  // NaN fails too
    return values[slot];
  }
};

}  // namespace lstm_fused
