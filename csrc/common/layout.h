// Host-side helpers for memory layouts, shared by the CPU and CUDA kernels.
//
// Elementwise kernels walk memory in order. That is right for any tensor whose elements fill one block
// of memory without gaps or overlaps (contiguous, channels_last, any permutation of them): output and
// inputs then only need the same strides. at::empty_like gives such an output the input's strides, and
// a contiguous tensor in the input's suggested memory format otherwise, which is what torch's own
// elementwise ops return and what the fake kernels in torch_cs231n/_fake.py promise.
#pragma once

#include <ATen/ATen.h>

namespace torch_cs231n {

// `t` laid out exactly like `ref` (a dense tensor): `t` itself when it already is, else a copy.
inline at::Tensor dense_like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides() && t.is_non_overlapping_and_dense()) {
    return t;
  }
  return at::empty_like(ref).copy_(t);
}

// A dense version of `t`: itself if dense, else contiguous in its suggested memory format.
inline at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

}  // namespace torch_cs231n
