// CUDA step kernels (GPU plan, stage 1), host side: one fused pointwise kernel per time step
// and pass, between the per-step GEMMs that the layer driver (csrc/ops.cpp) runs through at::
// ops. The kernels, their two shapes (fast path, two-stage reduction) and the launch shapes are
// in lstm_steps_kernels.cuh (run on the CPU by tests/test_steps_emulated.py); here the vector
// width and the template flags are dispatched and the kernels launched.
//
// Every kernel runs on the current stream of the current device (the driver holds the device
// guard), never synchronises the host and never allocates, so a whole forward+backward can be
// captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "../lstm_layer.h"
#include "../lstm_steps.h"
#include "lstm_steps_kernels.cuh"
#include "persistent_plan.h"

namespace lstm_fused {
namespace cuda {
namespace {

using namespace steps_detail;

// ------------------------------------------------------------------------------------------
// Vector width, launch shape (lstm_steps_kernels.cuh), flag dispatch.
// ------------------------------------------------------------------------------------------
void check_clip_mode(int64_t mode) {
  TORCH_CHECK(mode == kClipOff || mode == kClipValue || mode == kClipNorm,
              "lstm_fused: clip_mode must be 0, 1 or 2, got ", mode);
}

template <typename T, int VEC>
void launch_forward(const ForwardStepArgs<T>& args) {
  const int64_t count = args.rows * (args.hidden / VEC);
  if (count == 0) return;
  forward_step_kernel<T, VEC>
      <<<blocks_for(count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_step(const ForwardStepArgs<T>& args) {
  forward_vectorizable(args) ? launch_forward<T, kVec<T>>(args) : launch_forward<T, 1>(args);
}

// The reduction path when telemetry or norm clipping is asked for, else the fast path; only
// the combinations that can run are instantiated.
template <typename T, int VEC, int64_t kClip, bool kSumSquares>
void launch_hidden_grad(const HiddenGradStepArgs<T>& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = args.rows * (args.size / VEC);
  if constexpr (kClip == kClipNorm || kSumSquares) {
    TORCH_INTERNAL_ASSERT(args.partials != nullptr, "lstm_fused: reduction without scratch");
    const ReduceGrid grid = reduce_grid(count, kClip == kClipNorm);
    hidden_grad_partial_kernel<T, VEC, kClip><<<grid.partial_blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    hidden_grad_finish_kernel<T, VEC, kClip, kSumSquares>
        <<<grid.finish_blocks, kThreads, 0, stream>>>(args, grid.partial_blocks);
  } else {
    if (count == 0) return;
    hidden_grad_kernel<T, VEC, kClip><<<blocks_for(count), kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void dispatch_hidden_grad(const HiddenGradStepArgs<T>& args) {
  const bool sums = args.sum_squares != nullptr;
  switch (args.clip_mode) {
    case kClipValue:
      return sums ? launch_hidden_grad<T, VEC, kClipValue, true>(args)
                  : launch_hidden_grad<T, VEC, kClipValue, false>(args);
    case kClipNorm:
      return sums ? launch_hidden_grad<T, VEC, kClipNorm, true>(args)
                  : launch_hidden_grad<T, VEC, kClipNorm, false>(args);
    default:
      return sums ? launch_hidden_grad<T, VEC, kClipOff, true>(args)
                  : launch_hidden_grad<T, VEC, kClipOff, false>(args);
  }
}

template <typename T>
void hidden_grad_step(const HiddenGradStepArgs<T>& args) {
  check_clip_mode(args.clip_mode);
  hidden_grad_vectorizable(args) ? dispatch_hidden_grad<T, kVec<T>>(args)
                                 : dispatch_hidden_grad<T, 1>(args);
}

template <typename T, int VEC, int64_t kClip, bool kSumSquares>
void launch_backward(const BackwardStepArgs<T>& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = args.rows * (args.hidden / VEC);
  if constexpr (kClip == kClipNorm || kSumSquares) {
    TORCH_INTERNAL_ASSERT(args.partials != nullptr, "lstm_fused: reduction without scratch");
    const ReduceGrid grid = reduce_grid(count, kClip == kClipNorm);
    constexpr int kPass = kClip == kClipNorm ? 1 : 0;
    backward_partial_kernel<T, VEC, kClip, kPass>
        <<<grid.partial_blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_finish_kernel<T, VEC, kClip, kSumSquares>
        <<<grid.finish_blocks, kThreads, 0, stream>>>(args, grid.partial_blocks);
  } else {
    if (count == 0) return;
    backward_step_kernel<T, VEC, kClip><<<blocks_for(count), kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void dispatch_backward(const BackwardStepArgs<T>& args) {
  const bool sums = args.sum_squares != nullptr;
  switch (args.clip_mode) {
    case kClipValue:
      return sums ? launch_backward<T, VEC, kClipValue, true>(args)
                  : launch_backward<T, VEC, kClipValue, false>(args);
    case kClipNorm:
      return sums ? launch_backward<T, VEC, kClipNorm, true>(args)
                  : launch_backward<T, VEC, kClipNorm, false>(args);
    default:
      return sums ? launch_backward<T, VEC, kClipOff, true>(args)
                  : launch_backward<T, VEC, kClipOff, false>(args);
  }
}

template <typename T>
void backward_step(const BackwardStepArgs<T>& args) {
  check_clip_mode(args.clip_mode);
  backward_vectorizable(args) ? dispatch_backward<T, kVec<T>>(args)
                              : dispatch_backward<T, 1>(args);
}

}  // namespace

const DeviceKernels& kernels() {
  // float32 also gets the persistent sequence kernels (lstm_persistent_cuda.cu): off unless
  // LSTM_FUSED_CUDA_PERSISTENT=1 or lstm_fused::set_cuda_persistent(True); they decline
  // (the driver then loops over the step kernels) when a case does not fit.
  static const DeviceKernels table{
      {&forward_step<float>, &hidden_grad_step<float>, &backward_step<float>,
       &persistent_forward_sequence, &persistent_backward_sequence,
       /*backward_sequence_flow=*/false, &persistent::enabled, kReduceBlocks},
      {&forward_step<double>, &hidden_grad_step<double>, &backward_step<double>, nullptr,
       nullptr, /*backward_sequence_flow=*/false, nullptr, kReduceBlocks}};
  return table;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) { register_layer_ops<cuda::kernels>(m); }

}  // namespace lstm_fused
