// CUDA kernels, stage 2: persistent recurrent kernels, host side. One cooperative launch runs
// all T steps of one direction (forward), or its whole reverse-time loop (backward), float32
// only. The kernels and their design are in lstm_persistent_kernels.cuh; the partition
// arithmetic (units per block, shared-memory layout, chunking) and the step walker over packed
// batch sizes in persistent_plan.h, tested on the CPU.
//
// Contract (lstm_steps.h, Forward/BackwardSequenceArgs): the plain case only (no projection,
// clipping or telemetry; the driver checks that). Runs on the current stream, never syncs the
// host, allocates nothing, launches once. Declines (returns false, launches nothing) when the
// switch is off, T or B is 0, there are more than kMaxSegments distinct batch sizes, the device
// cannot launch cooperatively, the plan does not fit in shared memory, or the grid cannot be
// co-resident. float64 is not offered (StepKernels<double> keeps null entries).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "../lstm_steps.h"
#include "lstm_persistent_kernels.cuh"
#include "persistent_plan.h"

namespace lstm_fused {
namespace cuda {

using namespace persistent_detail;

namespace {

constexpr int kMaxDevices = 64;

// The plan for this device, or ok = false. Clears any error a failed query left behind, so
// that a decline leaves no trace for the next launch check.
template <typename Kernel>
persistent::Plan plan_launch(Kernel kernel, bool backward, int64_t hidden, int64_t batch) {
  persistent::Plan none;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return none;
  persistent::Plan plan =
      persistent::plan(backward, hidden, batch, prop->multiProcessorCount,
                       static_cast<int64_t>(prop->sharedMemPerBlockOptin), /*blocks per SM=*/1);
  if (!plan.ok) return none;
  // Allow the largest size the device offers, once per device and kernel (the same value
  // from every thread, so threads that launch with different sizes do not race; and no
  // attribute call while a CUDA graph is being captured, after a first eager call).
  static std::array<std::atomic<bool>, kMaxDevices> ready{};  // one per instantiation (kernel)
  const int device = at::cuda::current_device();
  std::atomic<bool>* flag = device < kMaxDevices ? &ready[device] : nullptr;
  if (flag == nullptr || !flag->load(std::memory_order_acquire)) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(prop->sharedMemPerBlockOptin)) != cudaSuccess) {
      (void)cudaGetLastError();
      return none;
    }
    if (flag != nullptr) flag->store(true, std::memory_order_release);
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                    static_cast<size_t>(plan.smem_bytes)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return none;
  }
  // Every block must be resident at once, or the grid barrier would wait forever.
  if (static_cast<int64_t>(per_sm) * prop->multiProcessorCount < plan.blocks) return none;
  return plan;
}

template <typename Params>
bool launch(void (*kernel)(Params), Params& params, const persistent::Plan& plan, bool backward) {
  void* args[] = {&params};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(plan.blocks)),
      dim3(kThreads), args, static_cast<size_t>(plan.smem_bytes),
      at::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {  // checked above; decline if it happens
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  persistent::count_launch(backward);
  return true;
}

bool usable(const SequenceShape& shape) {
  return persistent::enabled() && shape.steps > 0 && shape.batch > 0 && shape.hidden > 0;
}

}  // namespace

// Plans, fills the kernel parameters and launches one direction's persistent kernel; false
// (nothing launched) where it declines.
template <typename Params, typename Args, typename Kernel, typename Fill>
bool run_sequence(const Args& a, Kernel kernel, bool backward, Fill fill) {
  if (!usable(a)) return false;
  Params p;
  if (!persistent::make_segments(a, p.segments)) return false;
  const persistent::Plan plan = plan_launch(kernel, backward, a.hidden, a.batch);
  if (!plan.ok) return false;
  fill(a, plan, p);
  return launch(kernel, p, plan, backward);
}

bool persistent_forward_sequence(const ForwardSequenceArgs<float>& a) {
  return run_sequence<ForwardParams>(a, persistent_forward_kernel, /*backward=*/false,
                                     fill_forward_params);
}

bool persistent_backward_sequence(const BackwardSequenceArgs<float>& a) {
  return run_sequence<BackwardParams>(a, persistent_backward_kernel, /*backward=*/true,
                                      fill_backward_params);
}

}  // namespace cuda
}  // namespace lstm_fused
