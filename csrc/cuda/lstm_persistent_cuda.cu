// CUDA kernels, stage 2: persistent recurrent kernels, host side. One cooperative launch runs
// all T steps of one direction (forward), or its whole reverse-time loop (backward): float32
// layers on fp32 FMA, or on the tensor cores in TF32 while torch.backends.cuda.matmul.
// allow_tf32 is set (as the per-step path's cuBLAS calls), and bfloat16 / float16 layers in
// the 16-bit GEMM mode on the tensor cores (both from compute capability 8.0). The kernels and
// their design are in lstm_persistent_kernels.cuh; the partition arithmetic (units per block, shared-memory layout, chunking) and the step walker over packed
// batch sizes in persistent_plan.h, tested on the CPU.
//
// Contract (lstm_steps.h, Forward/BackwardSequenceArgs): the plain case only (no projection,
// clipping or telemetry; the driver checks that). Runs on the current stream, never syncs the
// host, allocates nothing, launches once. Declines (returns false, launches nothing) when the
// switch is off, T or B is 0, there are more than kMaxSegments distinct batch sizes, the device
// cannot launch cooperatively, the plan does not fit in shared memory or its speed policy says
// no (persistent::launch_plan), the grid cannot be co-resident, or the launch itself fails for
// lack of resources. float64 is not offered (StepKernels<double> keeps null entries).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

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

// The plan for this device, or ok = false: persistent::launch_plan (geometry and speed policy),
// then what only the device can say (cooperative launch, tensor cores for 16-bit operands, the
// shared-memory opt-in, occupancy). Clears any error a failed query left behind, so that a
// decline leaves no trace for the next launch check.
template <auto kernel, Operand kOp>
persistent::Plan plan_launch(bool backward, int64_t hidden, int64_t batch) {
  persistent::Plan none;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return none;
  if (kOp != Operand::kFloat32 && prop->major < 8) return none;  // mma.sync: sm_80
  persistent::Plan plan = persistent::launch_plan(
      backward, hidden, batch, prop->multiProcessorCount,
      static_cast<int64_t>(prop->sharedMemPerBlockOptin), /*blocks per SM=*/1, product_of(kOp));
  if (!plan.ok) return none;
  // Allow the largest size the device offers, once per device and kernel (the same value
  // from every thread, so threads that launch with different sizes do not race; and no
  // attribute call while a CUDA graph is being captured, after a first eager call).
  static std::array<std::atomic<bool>, kMaxDevices> ready{};  // one per kernel (instantiation)
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

// Errors of a launch that asked for more than the device gives (blocks, shared memory,
// registers, cooperative support): nothing ran, and the per-step path can take the case.
bool is_launch_resource_error(cudaError_t err) {
  switch (err) {
    case cudaErrorCooperativeLaunchTooLarge:
    case cudaErrorLaunchOutOfResources:
    case cudaErrorInvalidConfiguration:
    case cudaErrorInvalidValue:
    case cudaErrorNotSupported:
      return true;
    default:
      return false;
  }
}

template <typename Params>
bool launch(void (*kernel)(Params), Params& params, const persistent::Plan& plan, bool backward) {
  void* args[] = {&params};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(plan.blocks)),
      dim3(kThreads), args, static_cast<size_t>(plan.smem_bytes),
      at::cuda::getCurrentCUDAStream());
  if (is_launch_resource_error(err)) {  // the plan checked these; decline if one happens
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  persistent::count_launch(backward);
  return true;
}

bool usable(const SequenceShape& shape) {
  return shape.steps > 0 && shape.batch > 0 && shape.hidden > 0;
}

}  // namespace

// Plans, fills the kernel parameters and launches one direction's persistent kernel; false
// (nothing launched) where it declines.
// With the switch on, every decline is counted (lstm_fused::cuda_persistent_stats).
template <auto kernel, Operand kOp, typename Params, typename Args, typename Fill>
bool run_sequence(const Args& a, bool backward, Fill fill) {
  if (!persistent::enabled()) return false;
  Params p;
  bool launched = false;
  if (usable(a) && persistent::make_segments(a, p.segments)) {
    const persistent::Plan plan = plan_launch<kernel, kOp>(backward, a.hidden, a.batch);
    if (plan.ok) {
      fill(a, plan, p);
      launched = launch(kernel, p, plan, backward);
    }
  }
  if (!launched) persistent::count_decline(backward);
  return launched;
}

template <Operand kOp>
bool forward_as(const ForwardSequenceArgs<float>& a) {
  return run_sequence<persistent_forward_kernel<kOp>, kOp, ForwardParams>(
      a, /*backward=*/false, fill_forward_params);
}

template <Operand kOp>
bool backward_as(const BackwardSequenceArgs<float>& a) {
  return run_sequence<persistent_backward_kernel<kOp>, kOp, BackwardParams>(
      a, /*backward=*/true, fill_backward_params);
}

// A float32 layer's product: TF32 exactly when torch.backends.cuda.matmul.allow_tf32 (or
// torch.set_float32_matmul_precision below "highest") lets cuBLAS use it, so that the
// persistent path and the per-step path (StepKernels::gemm) round alike.
bool float32_on_tf32() { return at::globalContext().allowTF32CuBLAS(); }

bool persistent_forward_sequence(const ForwardSequenceArgs<float>& a) {
  // the projection inside the kernel and the 16-bit output are the CPU's only (the driver
  // then projects with one GEMM and calls again; not counted as a decline)
  if (a.input != nullptr || a.input_16bit != nullptr || a.output_16bit != nullptr) return false;
  TORCH_INTERNAL_ASSERT(a.w_hh_16bit == nullptr || a.hidden_16bit_steps != nullptr,
                        "lstm_fused: the 16-bit persistent forward without its staging buffer");
  if (a.w_hh_16bit == nullptr) {
    return float32_on_tf32() ? forward_as<Operand::kTf32>(a) : forward_as<Operand::kFloat32>(a);
  }
  return a.format_16bit == Bits16::kBFloat16 ? forward_as<Operand::kBFloat16>(a)
                                              : forward_as<Operand::kFloat16>(a);
}

bool persistent_backward_sequence(const BackwardSequenceArgs<float>& a) {
  if (a.w_hh_16bit == nullptr) {
    return float32_on_tf32() ? backward_as<Operand::kTf32>(a) : backward_as<Operand::kFloat32>(a);
  }
  return a.format_16bit == Bits16::kBFloat16 ? backward_as<Operand::kBFloat16>(a)
                                              : backward_as<Operand::kFloat16>(a);
}

template <Operand kOp>
bool would_launch_as(bool backward, int64_t hidden, int64_t batch) {
  return (backward ? plan_launch<persistent_backward_kernel<kOp>, kOp>(true, hidden, batch)
                   : plan_launch<persistent_forward_kernel<kOp>, kOp>(false, hidden, batch))
      .ok;
}

bool persistent_would_launch(bool backward, int64_t hidden, int64_t batch, bool operands_16bit) {
  // (bfloat16 and float16 share the plan and the device checks; one kernel's occupancy)
  if (operands_16bit) return would_launch_as<Operand::kBFloat16>(backward, hidden, batch);
  return float32_on_tf32() ? would_launch_as<Operand::kTf32>(backward, hidden, batch)
                           : would_launch_as<Operand::kFloat32>(backward, hidden, batch);
}

}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def(
      "cuda_persistent_would_launch(int hidden, int batch, bool backward, "
      "bool operands_16bit=False) -> bool",
      [](int64_t hidden, int64_t batch, bool backward, bool operands_16bit) {
        return cuda::persistent_would_launch(backward, hidden, batch, operands_16bit);
      });
}

}  // namespace lstm_fused
