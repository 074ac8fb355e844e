// ReLU's per-element math, called by the CPU loop (cpu/relu.cpp) and the CUDA kernel (cuda/relu.cu).
//
//   forward   y = max(x, 0)                 NaN passes through, as in torch: relu(nan) = nan
//   backward  dx = dy * [y > 0]             the gradient at 0 is 0 (torch's threshold_backward)
//
// Both are written as `v <= 0 ? 0 : v`: a NaN compares false, so it is kept, and the single compare
// keeps the CPU loop vectorisable.
#pragma once

#include <c10/macros/Macros.h>

namespace torch_cs231n {

template <typename T>
C10_HOST_DEVICE inline T relu_value(T x) {
  return x <= T(0) ? T(0) : x;
}

// dy masked by the forward's output y (not its input): y > 0 exactly where x > 0.
template <typename T>
C10_HOST_DEVICE inline T relu_grad(T dy, T y) {
  return y <= T(0) ? T(0) : dy;
}

}  // namespace torch_cs231n
