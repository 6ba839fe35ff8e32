// The BLAS entry points of the running libtorch that the CPU paths call with raw pointers
// (StepWeight, mixed_gemm.h), and CBLAS's enum values: declared in one place.
#pragma once

#include <cstddef>
#include <cstdint>

// BLAS from the running libtorch (MKL or OpenBLAS builds export the Fortran symbols). Weak:
// where a torch build does not export them the pointers are null and at:: ops are used.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (x86 builds of torch link MKL statically and export these).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
// MKL_BF16 and MKL_F16 are the raw 16 bits (unsigned short). Weak: absent from torch builds
// without MKL, where the pointers are null and the 16-bit GEMM mode is off.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                            float alpha, const uint16_t* a, int lda, const uint16_t* b,
                            int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace lstm_fused {

// CBLAS enum values (cblas.h / mkl_cblas.h).
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151,
              kCblasBMatrix = 162;

}  // namespace lstm_fused
