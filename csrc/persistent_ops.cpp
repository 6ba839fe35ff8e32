// The switch of the persistent CUDA kernels and their debug ops. Compiled into every build
// (also CPU-only), so the partition arithmetic (cuda/persistent_plan.h) is tested on the CPU.
//
//   lstm_fused::set_cuda_persistent(bool enabled) -> bool    previous state
//   lstm_fused::cuda_persistent_enabled() -> bool
//   lstm_fused::set_cuda_direct_gemm(bool enabled) -> bool   the per-step path's raw-pointer
//                                                             cuBLAS calls (off by default;
//                                                             LSTM_FUSED_CUDA_DIRECT_GEMM=1)
//   lstm_fused::cuda_persistent_stats() -> int[]             [forward launches, backward launches,
//                                                             forward declines, backward declines]
//   lstm_fused::persistent_plan(int hidden, int batch, int sm_count, int smem_per_block,
//                               int max_blocks_per_sm, bool backward=False,
//                               bool policy=False, int product=0) -> int[]
//                               (product: persistent::Product, 0 FMA, 1 TF32, 2 16-bit)
//   lstm_fused::cuda_persistent_would_launch(int hidden, int batch, bool backward,
//                                            bool operands_16bit=False) -> bool
//                                                             (CUDA builds; current device)
//   lstm_fused::persistent_steps(int[] batch_sizes, bool reverse, bool backward) -> int[]
//
// persistent_plan returns persistent::plan_fields (names in tests/test_persistent_plan.py) of
// persistent::plan (the geometry), or with policy=True of persistent::launch_plan;
// persistent_steps returns, per step in the pass's processing order, [t, rows, offset,
// continuing, prev_offset] as the kernels' step walker computes them.
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cuda/persistent_plan.h"
#include "env_switch.h"

namespace lstm_fused {
namespace persistent {
namespace {

std::atomic<bool>& state() {
  // the environment is read once, on first use; off unless it says on
  static std::atomic<bool> on{env_flag("LSTM_FUSED_CUDA_PERSISTENT", false)};
  return on;
}

std::atomic<bool>& direct_gemm_state() {
  // the CUDA per-step path's raw-pointer cuBLAS calls (StepKernels::gemm): opt-in until a GPU
  // run has passed with them
  static std::atomic<bool> on{env_flag("LSTM_FUSED_CUDA_DIRECT_GEMM", false)};
  return on;
}

std::atomic<int64_t> forward_launches{0};
std::atomic<int64_t> backward_launches{0};
std::atomic<int64_t> forward_declines{0};
std::atomic<int64_t> backward_declines{0};

std::vector<int64_t> plan_op(int64_t hidden, int64_t batch, int64_t sm_count,
                             int64_t smem_per_block, int64_t max_blocks_per_sm, bool backward,
                             bool policy, int64_t product_code) {
  TORCH_CHECK(product_code >= 0 && product_code <= 2,
              "persistent_plan: product must be 0 (FMA), 1 (TF32) or 2 (16-bit), got ",
              product_code);
  const Product product = static_cast<Product>(product_code);
  return plan_fields(policy ? launch_plan(backward, hidden, batch, sm_count, smem_per_block,
                                          max_blocks_per_sm, product)
                            : plan(backward, hidden, batch, sm_count, smem_per_block,
                                   max_blocks_per_sm, product));
}

std::vector<int64_t> steps_op(std::vector<int64_t> batch_sizes, bool reverse, bool backward) {
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (int64_t t = 0; t < steps; ++t) {
    TORCH_CHECK(batch_sizes[t] >= 0 && (t == 0 || batch_sizes[t] <= batch_sizes[t - 1]),
                "persistent_steps: batch_sizes must be non-increasing and non-negative");
    offsets.push_back(total);
    total += batch_sizes[t];
  }
  SequenceShape shape{steps, steps > 0 ? batch_sizes[0] : 0, 1, batch_sizes.data(),
                      offsets.data(), reverse};
  StepSegments segments;
  TORCH_CHECK(make_segments(shape, segments), "persistent_steps: more than ", kMaxSegments,
              " distinct batch sizes (the kernels decline such a sequence)");
  std::vector<int64_t> out;
  int hint = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = step_at(i, steps, reverse, backward);
    const StepInfo info = step_info(segments, t, reverse, hint);
    out.insert(out.end(), {t, info.rows, info.offset, info.continuing, info.prev_offset});
  }
  return out;
}

}  // namespace

bool enabled() { return state().load(std::memory_order_relaxed); }

bool set_enabled(bool on) { return state().exchange(on); }

bool direct_gemm_enabled() { return direct_gemm_state().load(std::memory_order_relaxed); }

void count_launch(bool backward) {
  (backward ? backward_launches : forward_launches).fetch_add(1, std::memory_order_relaxed);
}

void count_decline(bool backward) {
  (backward ? backward_declines : forward_declines).fetch_add(1, std::memory_order_relaxed);
}

}  // namespace persistent

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("set_cuda_persistent(bool enabled) -> bool",
        [](bool enabled) { return persistent::set_enabled(enabled); });
  m.def("cuda_persistent_enabled() -> bool", []() { return persistent::enabled(); });
  m.def("set_cuda_direct_gemm(bool enabled) -> bool",
        [](bool enabled) { return persistent::direct_gemm_state().exchange(enabled); });
  m.def("cuda_persistent_stats() -> int[]", []() {
    return std::vector<int64_t>{persistent::forward_launches.load(),
                                persistent::backward_launches.load(),
                                persistent::forward_declines.load(),
                                persistent::backward_declines.load()};
  });
  m.def(
      "persistent_plan(int hidden, int batch, int sm_count, int smem_per_block, "
      "int max_blocks_per_sm, bool backward=False, bool policy=False, int product=0) "
      "-> int[]",
      &persistent::plan_op);
  m.def("persistent_steps(int[] batch_sizes, bool reverse, bool backward) -> int[]",
        &persistent::steps_op);
}

}  // namespace lstm_fused
