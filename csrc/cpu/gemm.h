// Our float32 GEMM for the convolution: C = A·B, with packed panels and register-blocked micro-kernels
// (gemm_microkernel.h), BLIS-style. docs/conv2d.md ("The GEMM") draws the blocking.
//
// A and B are strided views, so a transposed operand needs no copy of its own: packing reads it in
// whatever order it lies. C is row-major with unit column stride.
#pragma once

#include <cstdint>

namespace torch_cs231n {
namespace cpu {

// Element (i, j) of a matrix view lies at data[i * rs + j * cs].
struct MatrixView {
  const float* data;
  int64_t rs, cs;
};

// What is added to A·B when C is written:
//   C[i, j] = A·B[i, j] + (accumulate ? C[i, j] : 0) + (row_bias ? row_bias[i] : 0) + (col_bias ? col_bias[j] : 0)
struct GemmEpilogue {
  bool accumulate = false;
  const float* row_bias = nullptr;
  const float* col_bias = nullptr;
};

// C (m x n, row stride ldc) from A (m x k) and B (k x n), on the calling thread, with the micro-kernel
// of cpu_isa(). Its packing buffers are the thread's own and bounded (gemm.cpp), whatever m, n and k.
void sgemm(int64_t m, int64_t n, int64_t k, MatrixView a, MatrixView b, float* c, int64_t ldc,
           const GemmEpilogue& epilogue = {});

// The same, with the columns of C (or its rows, when it has few columns) split among at::parallel_for's
// threads. Inside a parallel region it runs on the calling thread alone.
void sgemm_parallel(int64_t m, int64_t n, int64_t k, MatrixView a, MatrixView b, float* c, int64_t ldc,
                    const GemmEpilogue& epilogue = {});

}  // namespace cpu
}  // namespace torch_cs231n
