// The switch of csrc/cpu/flush_denormals.h and its ops (every build):
//
//   lstm_fused::set_flush_denormals(bool enabled) -> bool     previous state
//   lstm_fused::flush_denormals_enabled() -> bool
//   lstm_fused::cpu_mxcsr_per_thread() -> int[]               debug: MXCSR of the calling
//                                                             thread, then of each thread of
//                                                             an OpenMP region (tests check
//                                                             the kernels restore them)
#include "flush_denormals.h"

#include "../env_switch.h"

#include <torch/library.h>

#include <atomic>
#include <vector>

#include <omp.h>

namespace lstm_fused {
namespace cpu {
namespace {

std::atomic<bool>& state() {
  // the environment is read once, on first use; on unless it says off
  static std::atomic<bool> on{env_flag("LSTM_FUSED_FLUSH_DENORMALS", true)};
  return on;
}

int64_t mxcsr() {
#ifdef LSTM_FUSED_HAS_MXCSR
  return static_cast<int64_t>(_mm_getcsr());
#else
  return -1;
#endif
}

std::vector<int64_t> mxcsr_per_thread() {
  std::vector<int64_t> values{mxcsr()};
  const int threads = at::get_num_threads();
  std::vector<int64_t> team(threads, -1);
#pragma omp parallel num_threads(threads)
  { team[omp_get_thread_num()] = mxcsr(); }
  values.insert(values.end(), team.begin(), team.end());
  return values;
}

}  // namespace

bool flush_denormals_enabled() { return state().load(std::memory_order_relaxed); }

bool set_flush_denormals(bool on) { return state().exchange(on); }

}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("set_flush_denormals(bool enabled) -> bool",
        [](bool enabled) { return cpu::set_flush_denormals(enabled); });
  m.def("flush_denormals_enabled() -> bool", []() { return cpu::flush_denormals_enabled(); });
  m.def("cpu_mxcsr_per_thread() -> int[]", []() { return cpu::mxcsr_per_thread(); });
}

}  // namespace lstm_fused
