// The GEMMs under the CUDA convolution: cuBLAS called directly, so that each call states its own precision.
//
// torch's convolutions follow torch.backends.cudnn.allow_tf32 (on by default): float32 convolutions may
// round their GEMM inputs to TF32 (10-bit mantissa) on tensor cores. at::bmm would follow the *matmul*
// flag instead (off by default), so this file asks cuBLAS for CUBLAS_COMPUTE_32F_FAST_TF32 when the
// convolution flag allows it and for CUBLAS_COMPUTE_32F otherwise. Half and bfloat16 accumulate in float,
// double in double.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cublas_v2.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

namespace torch_cs231n {
namespace cuda {

// torch.backends.cudnn.allow_tf32 (the flag for convolutions), read the way the running torch names it:
// torch 2.10+ takes an enum for the op (at::Float32Op::CONV), 2.9 a string ("conv"). The member's
// parameter type tells which, without naming an enum that older headers lack.
template <typename Arg>
struct ConvOpName;
template <typename Op>
struct ConvOpName<std::optional<Op>> {
  static std::optional<Op> get() { return Op::CONV; }
};
template <>
struct ConvOpName<const std::string&> {
  static std::string get() { return "conv"; }
};
template <typename Arg>
ConvOpName<Arg> conv_op_name_of(bool (at::Context::*)(Arg) const);

inline bool conv_allows_tf32() {
  using Name = decltype(conv_op_name_of(&at::Context::allowTF32CuDNN));
  return at::globalContext().allowTF32CuDNN(Name::get());
}

// cuBLAS's names for an element type: its data type, the compute type of its GEMM, and the type of alpha
// and beta that goes with that compute type.
template <typename T>
struct BlasType;
template <>
struct BlasType<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F;
  using scale_t = float;
  static cublasComputeType_t compute(bool tf32) { return tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F; }
};
template <>
struct BlasType<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F;
  using scale_t = double;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_64F; }
};
template <>
struct BlasType<c10::Half> {
  static constexpr cudaDataType_t data = CUDA_R_16F;
  using scale_t = float;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_32F; }
};
template <>
struct BlasType<c10::BFloat16> {
  static constexpr cudaDataType_t data = CUDA_R_16BF;
  using scale_t = float;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_32F; }
};

// One operand of a row-major batched GEMM: matrix b starts at ptr + b * batch_stride, its rows lie ld
// elements apart, and `trans` reads it transposed.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld, batch_stride;
  bool trans;
};

inline int blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "conv2d (CUDA): the GEMM's ", what, " (", v,
              ") exceeds cuBLAS's 32-bit limit");
  return static_cast<int>(v);
}

// Row-major C[b] (m x n, rows ldc apart) = op(A[b]) (m x k) · op(B[b]) (k x n) + beta * C[b], for b in
// [0, batch). cuBLAS is column-major: a row-major C is a column-major Cᵀ = op(B)ᵀ · op(A)ᵀ, so the call
// passes B first. C's type CT may be float for half or bfloat16 A and B (d_W summed over chunks).
template <typename T, typename CT = T>
void gemm_batched(int64_t m, int64_t n, int64_t k, Operand<T> a, Operand<T> b, float beta, CT* c, int64_t ldc,
                  int64_t c_stride, int64_t batch, bool tf32) {
  if (m == 0 || n == 0 || batch == 0) return;
  using scale_t = typename BlasType<T>::scale_t;
  const scale_t one = 1, beta_s = static_cast<scale_t>(beta);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // torch sets the handle's math mode from the matmul flag each time it hands the handle out; the
  // compute type below decides here, so no mode may add TF32 behind it.
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, b.trans ? CUBLAS_OP_T : CUBLAS_OP_N, a.trans ? CUBLAS_OP_T : CUBLAS_OP_N, blas_int(n, "n"),
      blas_int(m, "m"), blas_int(k, "k"), &one, b.ptr, BlasType<T>::data, blas_int(b.ld, "ldb"), b.batch_stride, a.ptr,
      BlasType<T>::data, blas_int(a.ld, "lda"), a.batch_stride, &beta_s, c, BlasType<CT>::data, blas_int(ldc, "ldc"),
      c_stride, blas_int(batch, "batch"), BlasType<T>::compute(tf32), CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda
}  // namespace torch_cs231n
