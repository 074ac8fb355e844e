// Launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace torch_cs231n {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than one per item.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t per_sm = 2048 / threads;
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm * 4;
  const int64_t needed = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, fill)));
}

}  // namespace cuda
}  // namespace torch_cs231n
