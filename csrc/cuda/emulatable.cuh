// What a kernel header needs so that tests/cuda_emulation/ can also compile it for the CPU: a launch that is
// `kernel<<<grid, threads, shared_bytes, stream>>>(args...)` under nvcc and an emulated launch there
// (TORCH_CS231N_CUDA_EMULATION, defined by tests/cuda_emulation/cuda_emulation.h). Such a header includes no
// torch header and uses only what the emulation provides: threadIdx and friends, __syncthreads, __shared__
// arrays and dynamic shared memory, and the warp MMA of cuda/conv2d_implicit_gemm.cuh. `kernel` must be one name (a
// pointer to the kernel, taken beforehand when the kernel is a template with several arguments).
#pragma once

#if defined(TORCH_CS231N_CUDA_EMULATION)
#define TORCH_CS231N_LAUNCH(kernel, grid, threads, stream, ...) \
  ::cuda_emulation::launch(grid, dim3(threads), 0, kernel, __VA_ARGS__)
#define TORCH_CS231N_LAUNCH_SHARED(kernel, grid, threads, shared_bytes, stream, ...) \
  ::cuda_emulation::launch(grid, dim3(threads), shared_bytes, kernel, __VA_ARGS__)
#else
#define TORCH_CS231N_LAUNCH(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#define TORCH_CS231N_LAUNCH_SHARED(kernel, grid, threads, shared_bytes, stream, ...) \
  kernel<<<grid, threads, shared_bytes, stream>>>(__VA_ARGS__)
#endif

// The block's dynamic shared memory (the launch's shared_bytes), as an array of T.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#if defined(TORCH_CS231N_CUDA_EMULATION)
  return reinterpret_cast<T*>(::cuda_emulation::scheduler().dynamic_shared.data());
#else
  extern __shared__ float4 dynamic_shared_words[];  // float4: 16-byte aligned
  return reinterpret_cast<T*>(dynamic_shared_words);
#endif
}
