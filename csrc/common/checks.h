// Argument checks shared by the CPU and CUDA kernels. Messages follow torch's style: the op, the
// argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace torch_cs231n {

// The floating dtypes torch's layers take: float32 and float64, and float16 and bfloat16, which the kernels
// compute in float32 ("op math") and round once (on the CPU: cpu/reduced_float.h).
inline bool is_supported_float(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(is_supported_float(t), op, ": expected ", arg,
              " to have dtype float32, float64, float16 or bfloat16, but got ", t.scalar_type(), " on ", t.device());
}

// The integer dtypes torch's ReLU, max-pool and CPU convolution take (forward only: integer tensors have no
// gradients). Not bool, nor uint16, uint32 and uint64: torch refuses them.
inline bool is_supported_integer(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kByte || st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong;
}

inline void check_float_or_integer_dtype(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(is_supported_float(t) || is_supported_integer(t), op, ": expected ", arg,
              " to have an integer dtype (uint8, int8, int16, int32, int64) or dtype float32, float64, float16 or "
              "bfloat16, but got ",
              t.scalar_type(), " on ", t.device());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected all tensors to be on the same device, but ", a_name, " is on ",
              a.device(), " and ", b_name, " is on ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                             const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": expected ", b_name, " to have the dtype of ", a_name, " (",
              a.scalar_type(), "), but got ", b.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                             const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": expected ", b_name, " to have the shape of ", a_name, " ", a.sizes(),
              ", but got ", b.sizes());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", arg, " to be ", dim, "-D, but got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
}

}  // namespace torch_cs231n
