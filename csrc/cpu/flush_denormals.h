// Subnormal floats inside the CPU kernels: flushed to zero (FTZ) and read as zero (DAZ).
//
// A vanishing gradient runs into subnormals, and x86 cores compute on them 10-100x slower than
// on normal floats (our T1000 B32 H64 training ran 1.4x faster with them flushed). Each thread
// that runs kernel code sets FTZ|DAZ in its MXCSR on entry and restores the caller's MXCSR on
// exit (RAII), so nothing outside the ops changes: the calling thread in the op entry
// (LayerOps), every thread of the CPU kernels' parallel regions, and every chunk of
// parallel_for. On by default; off with LSTM_FUSED_FLUSH_DENORMALS=0 (read once) or
// lstm_fused.set_flush_denormals(False) (lstm_fused::set_flush_denormals). No-op off x86.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <xmmintrin.h>
#define LSTM_FUSED_HAS_MXCSR 1
#endif

namespace lstm_fused {
namespace cpu {

bool flush_denormals_enabled();      // csrc/cpu/flush_denormals.cpp
bool set_flush_denormals(bool on);   // returns the previous state

class FlushDenormals {
 public:
#ifdef LSTM_FUSED_HAS_MXCSR
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bits 15 (FTZ) and 6 (DAZ)
  FlushDenormals() : active_(flush_denormals_enabled()) {
    if (active_) {
      saved_ = _mm_getcsr();
      if ((saved_ & kFtzDaz) != kFtzDaz) _mm_setcsr(saved_ | kFtzDaz);
    }
  }
  ~FlushDenormals() {
    if (active_ && (saved_ & kFtzDaz) != kFtzDaz) _mm_setcsr(saved_);
  }

 private:
  bool active_;
  unsigned saved_ = 0;
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// at::parallel_for with subnormals flushed in every chunk (each chunk may run on another
// thread of the pool, whose MXCSR is its own).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const FlushDenormals flush;
    body(chunk_begin, chunk_end);
  });
}

}  // namespace cpu
}  // namespace lstm_fused
