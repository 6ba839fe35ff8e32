// CUDA step kernels (GPU plan, stage 1), host side: one fused pointwise kernel per time step
// and pass, between the per-step GEMMs that the layer driver (csrc/ops.cpp) runs through at::
// ops. The kernels, their two shapes (fast path, two-stage reduction) and the launch shapes are
// in lstm_steps_kernels.cuh (run on the CPU by tests/test_steps_emulated.py), with the cell
// variants' kernels (one block per row); here the vector width and the template flags
// (clipping, telemetry, the cell variants) are dispatched and the kernels launched.
//
// Every kernel runs on the current stream of the current device (the driver holds the device
// guard), never synchronises the host and never allocates, so a whole forward+backward can be
// captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cstdint>
#include <limits>
#include <type_traits>

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

template <typename T, unsigned kVariants>
void launch_forward_variants(const ForwardStepArgs<T>& args) {
  if (args.rows == 0) return;
  const int blocks = variant_blocks(args.rows, /*reduction=*/false);
  forward_variants_kernel<T, kVariants>
      <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, unsigned kVariants, int64_t kClip, bool kSumSquares>
void launch_backward_variants(const BackwardStepArgs<T>& args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if constexpr (kClip == kClipNorm || kSumSquares) {
    TORCH_INTERNAL_ASSERT(args.partials != nullptr, "lstm_fused: reduction without scratch");
    const int blocks = variant_blocks(args.rows, /*reduction=*/true);
    if constexpr (kClip == kClipNorm) {
      backward_variants_kernel<T, kVariants, kClip, 1, true><<<blocks, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_variants_finish_kernel<T, kVariants, kSumSquares>
          <<<blocks, kThreads, 0, stream>>>(args, blocks);
    } else {
      backward_variants_kernel<T, kVariants, kClip, 0, true><<<blocks, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_finish_kernel<T, 1, kClip, true><<<1, kThreads, 0, stream>>>(args, blocks);
    }
  } else {
    if (args.rows == 0) return;
    const int blocks = variant_blocks(args.rows, /*reduction=*/false);
    backward_variants_kernel<T, kVariants, kClip, 0, false><<<blocks, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr ((kVariants & kCellLayerNorm) != 0) {
    const int64_t width = kLayerNormGradWidth * args.hidden;
    if (args.rows > 0) {
      add_rows_in_order_kernel<T><<<blocks_for(width), kThreads, 0, stream>>>(
          args.ln_grad_rows, args.rows, width, args.ln_grad_sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Runtime variant bits -> the template flag.
template <template <unsigned> class Launch, typename Args>
void dispatch_variants(unsigned variants, const Args& args) {
  switch (variants & 15u) {
    case 1: return Launch<1>::run(args);
    case 2: return Launch<2>::run(args);
    case 3: return Launch<3>::run(args);
    case 4: return Launch<4>::run(args);
    case 5: return Launch<5>::run(args);
    case 6: return Launch<6>::run(args);
    case 7: return Launch<7>::run(args);
    case 8: return Launch<8>::run(args);
    case 9: return Launch<9>::run(args);
    case 10: return Launch<10>::run(args);
    case 11: return Launch<11>::run(args);
    case 12: return Launch<12>::run(args);
    case 13: return Launch<13>::run(args);
    case 14: return Launch<14>::run(args);
    case 15: return Launch<15>::run(args);
    default: TORCH_INTERNAL_ASSERT(false, "lstm_fused: no variant kernel for the plain cell");
  }
}

template <typename T>
struct ForwardVariants {
  template <unsigned kVariants>
  struct Launch {
    static void run(const ForwardStepArgs<T>& args) { launch_forward_variants<T, kVariants>(args); }
  };
};

template <typename T, int64_t kClip, bool kSumSquares>
struct BackwardVariants {
  template <unsigned kVariants>
  struct Launch {
    static void run(const BackwardStepArgs<T>& args) {
      // kCellMaskedHidden plays no part in the backward step (masked off by the caller)
      if constexpr ((kVariants & kCellMaskedHidden) == 0) {
        launch_backward_variants<T, kVariants, kClip, kSumSquares>(args);
      }
    }
  };
};

template <typename T>
void backward_variants_step(const BackwardStepArgs<T>& args) {
  const unsigned variants = args.variant.variants & ~unsigned(kCellMaskedHidden);
  const bool sums = args.sum_squares != nullptr;
  switch (args.clip_mode) {
    case kClipValue:
      return sums ? dispatch_variants<BackwardVariants<T, kClipValue, true>::template Launch>(variants, args)
                  : dispatch_variants<BackwardVariants<T, kClipValue, false>::template Launch>(variants, args);
    case kClipNorm:
      return sums ? dispatch_variants<BackwardVariants<T, kClipNorm, true>::template Launch>(variants, args)
                  : dispatch_variants<BackwardVariants<T, kClipNorm, false>::template Launch>(variants, args);
    default:
      return sums ? dispatch_variants<BackwardVariants<T, kClipOff, true>::template Launch>(variants, args)
                  : dispatch_variants<BackwardVariants<T, kClipOff, false>::template Launch>(variants, args);
  }
}

template <typename T>
void recurrent_grad_step(const RecurrentGradStepArgs<T>& args) {
  const int64_t count = args.rows * args.size;
  if (count == 0) return;
  recurrent_grad_kernel<T>
      <<<blocks_for(count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (args.variant.variants != kCellPlain) {
    return dispatch_variants<ForwardVariants<T>::template Launch>(args.variant.variants, args);
  }
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
  TORCH_INTERNAL_ASSERT(!args.fold_hidden_grad || args.clip_mode != kClipNorm,
                        "lstm_fused: the hidden-gradient step folded in with norm clipping");
  if ((args.variant.variants & ~unsigned(kCellMaskedHidden)) != kCellPlain) {
    TORCH_INTERNAL_ASSERT(!args.fold_hidden_grad,
                          "lstm_fused: the hidden-gradient step folded into a variant kernel");
    return backward_variants_step(args);
  }
  backward_vectorizable(args) ? dispatch_backward<T, kVec<T>>(args)
                              : dispatch_backward<T, 1>(args);
}

// The driver's per-step products: cuBLAS on torch's handle for the current stream, raw
// pointers (the call at::addmm ends in, without the tensor views and the dispatcher per step);
// float32 uses TF32 exactly when torch.backends.cuda.matmul.allow_tf32 says so. cuBLAS comes
// from the copy torch already loaded (its C++ wrappers in libtorch_cuda are not exported, and
// the toolkit need not have cuBLAS to link against); without it the driver keeps at::addmm.
struct Cublas {
  // the C entry points' types (the C++ header overloads cublasGemmEx)
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                    int, int, const void*, const void*, cudaDataType, int,
                                    const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  using Dgemm = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                   int, int, const double*, const double*, int, const double*,
                                   int, const double*, double*, int);
  GemmEx gemm_ex = nullptr;
  Dgemm dgemm = nullptr;
  bool available() const { return gemm_ex != nullptr && dgemm != nullptr; }
};

const Cublas& cublas() {
  static const Cublas calls = [] {
    Cublas c;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);  // only a copy already loaded
      if (lib == nullptr) continue;
      c.gemm_ex = reinterpret_cast<decltype(c.gemm_ex)>(dlsym(lib, "cublasGemmEx"));
      c.dgemm = reinterpret_cast<decltype(c.dgemm)>(dlsym(lib, "cublasDgemm_v2"));
      if (c.available()) break;
    }
    return c;
  }();
  return calls;
}

cublasOperation_t cublas_op(char trans) { return trans == 'T' ? CUBLAS_OP_T : CUBLAS_OP_N; }

int as_int(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "lstm_fused: ", name, " = ",
              value, " does not fit cuBLAS's int");
  return static_cast<int>(value);
}

void check_cublas(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "lstm_fused: cuBLAS error ",
              static_cast<int>(status));
}

template <typename T>
void step_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

template <>
void step_gemm<float>(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  const cublasComputeType_t compute = at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  check_cublas(cublas().gemm_ex(at::cuda::getCurrentCUDABlasHandle(), cublas_op(transa),
                                cublas_op(transb), as_int(m, "m"), as_int(n, "n"),
                                as_int(k, "k"), &alpha, a, CUDA_R_32F, as_int(lda, "lda"), b,
                                CUDA_R_32F, as_int(ldb, "ldb"), &beta, c, CUDA_R_32F,
                                as_int(ldc, "ldc"), compute, CUBLAS_GEMM_DEFAULT));
}

template <>
void step_gemm<double>(char transa, char transb, int64_t m, int64_t n, int64_t k, double alpha,
                       const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                       double* c, int64_t ldc) {
  check_cublas(cublas().dgemm(at::cuda::getCurrentCUDABlasHandle(), cublas_op(transa),
                              cublas_op(transb), as_int(m, "m"), as_int(n, "n"), as_int(k, "k"),
                              &alpha, a, as_int(lda, "lda"), b, as_int(ldb, "ldb"), &beta, c,
                              as_int(ldc, "ldc")));
}

// The 16-bit mode's products: 16-bit A and B, float32 C, float32 accumulation
// (CUBLAS_COMPUTE_32F; tensor cores on sm_80 and later).
void step_gemm_16bit(Bits16 format, char transa, char transb, int64_t m, int64_t n, int64_t k,
                     float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                     int64_t ldb, float beta, float* c, int64_t ldc) {
  const cudaDataType operands = format == Bits16::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  check_cublas(cublas().gemm_ex(at::cuda::getCurrentCUDABlasHandle(), cublas_op(transa),
                                cublas_op(transb), as_int(m, "m"), as_int(n, "n"),
                                as_int(k, "k"), &alpha, a, operands, as_int(lda, "lda"), b,
                                operands, as_int(ldb, "ldb"), &beta, c, CUDA_R_32F,
                                as_int(ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <typename T>
void copy_rows(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows, int64_t cols) {
  if (rows == 0 || cols == 0) return;
  C10_CUDA_CHECK(cudaMemcpy2DAsync(dst, ldd * sizeof(T), src, lds * sizeof(T), cols * sizeof(T),
                                   rows, cudaMemcpyDeviceToDevice,
                                   at::cuda::getCurrentCUDAStream()));
}

// direct: the raw-pointer GEMM and row copies (else the driver's at::addmm / copy_ path).
template <typename T>
StepKernels<T> step_kernels(bool direct) {
  StepKernels<T> k;
  k.forward = &forward_step<T>;
  k.hidden_grad = &hidden_grad_step<T>;
  k.backward = &backward_step<T>;
  k.recurrent_grad = &recurrent_grad_step<T>;
  k.reduce_partials = kReduceBlocks;
  if (direct && cublas().available()) {
    k.gemm = &step_gemm<T>;
    k.copy_rows = &copy_rows<T>;
    if constexpr (std::is_same_v<T, float>) {
      // the 16-bit GEMM mode for bfloat16 and float16 layers (gemm_operands_16bit)
      k.gemm_16bit = &step_gemm_16bit;
    }
  }
  return k;
}

DeviceKernels make_table(bool direct) {
  DeviceKernels t{step_kernels<float>(direct), step_kernels<double>(direct)};
  // float32 also gets the persistent sequence kernels (lstm_persistent_cuda.cu): off unless
  // LSTM_FUSED_CUDA_PERSISTENT=1 or lstm_fused::set_cuda_persistent(True); they decline
  // (the driver then loops over the step kernels) when a case does not fit.
  t.f32.forward_sequence = &persistent_forward_sequence;
  t.f32.backward_sequence = &persistent_backward_sequence;
  t.f32.sequence_enabled = &persistent::enabled;
  t.f32.forward_sequence_hidden_16bit_steps = true;  // the 16-bit kernels' staging buffer
  return t;
}

}  // namespace

// The table for the switch's current state (persistent::direct_gemm_enabled).
const DeviceKernels& kernels() {
  static const DeviceKernels plain = make_table(false);
  static const DeviceKernels direct = make_table(true);
  return persistent::direct_gemm_enabled() ? direct : plain;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) { register_layer_ops<cuda::kernels>(m); }

}  // namespace lstm_fused
