// float16 and bfloat16 on the CPU. Every op computes them as torch does: in float32 (at::opmath_type),
// rounded to the input's dtype once, at the end. Where a kernel has no loop of its own for the narrow type,
// the op converts its operands to float32, runs the float32 kernel, and rounds the result: the same
// numbers, at the price of a float32 copy of each operand (docs/architecture.md, "Dtypes").
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace torch_cs231n {
namespace cpu {

inline bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// A float32 copy with the same sizes and strides (memory format and all), so that the float32 kernel picks
// the same layout for its results as for the original.
inline at::Tensor to_float(const at::Tensor& t) {
  return t.defined() && is_reduced_float(t) ? t.to(at::kFloat) : t;
}

inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return to_float(*t);
}

// A result of the float32 kernel rounded to `dtype` (strides kept); an undefined or absent one stays so.
inline at::Tensor round_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() ? t.to(dtype) : t;
}

inline std::optional<at::Tensor> round_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return t;
  return round_to(*t, dtype);
}

}  // namespace cpu
}  // namespace torch_cs231n
