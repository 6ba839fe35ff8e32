// The options of one LSTM layer, as the ops take them: one `float[] options` argument (the
// schema in ops.cpp), decoded here in one place. The slots, in order, are those of
// lstm_fused/options.py (LayerOptions.to_list); tests/test_ops.py checks that both agree.
//
//   0 has_biases      0 or 1: params hold b_ih, b_hh per direction
//   1 has_proj        0 or 1: params hold W_hr per direction (proj_size > 0)
//   2 bidirectional   0 or 1: two directions
//   3 bptt_clip       >= 0 (0 = off): the clip value of BPTT gradient clipping
//   4 bptt_clip_mode  0 off, 1 element-wise clamp, 2 norm rescaling (lstm_steps.h ClipMode)
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
    kSlots,
  };

  bool has_biases = true;
  bool has_proj = false;
  bool bidirectional = false;
  double bptt_clip = 0.0;
  int64_t bptt_clip_mode = kClipOff;

  int64_t directions() const { return bidirectional ? 2 : 1; }
  // The clip mode the kernels run: off unless a clip value is set.
  int64_t clip_mode() const { return bptt_clip > 0 ? bptt_clip_mode : kClipOff; }

  static LayerOptions from_list(c10::ArrayRef<double> values) {
    TORCH_CHECK(values.size() == kSlots, "lstm_fused: options must have ", kSlots,
                " entries (has_biases, has_proj, bidirectional, bptt_clip, bptt_clip_mode; "
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
    return o;
  }

 private:
  static bool flag(c10::ArrayRef<double> values, size_t slot, const char* name) {
    TORCH_CHECK(values[slot] == 0 || values[slot] == 1, "lstm_fused: options.", name,
                " must be 0 or 1, got ", values[slot]);
    return values[slot] == 1;
  }
};

}  // namespace lstm_fused
