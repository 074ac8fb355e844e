// ReLU on the CPU: a parallel loop over memory, calling the per-element math of common/relu.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/layout.h"
#include "common/relu.h"
#include "common/relu_args.h"
#include "cpu/elementwise.h"

namespace torch_cs231n {
namespace {

// Elements per task: large enough that the OpenMP hand-off costs little against a memory-bound loop.
constexpr int64_t kGrain = 1 << 15;

// What the loops below compute with: the values themselves (common/relu.h), or, for float16 and bfloat16,
// their bits as uint16_t (relu_bits_*: no conversion to float).
template <typename scalar_t>
struct Relu {
  using type = scalar_t;
  static type value(type x) { return relu_value(x); }
  static bool keeps(type x) { return relu_keeps(x); }
  static type grad(type dy, type y) { return relu_grad(dy, y); }
};

template <uint16_t kExponentMask>
struct ReluBits {
  using type = uint16_t;
  static type value(type x) { return relu_bits_value<kExponentMask>(x); }
  static bool keeps(type x) { return relu_bits_keep<kExponentMask>(x); }
  static type grad(type dy, type y) { return relu_bits_keep<kExponentMask>(y) ? dy : type(0); }
};
template <>
struct Relu<c10::Half> : ReluBits<0x7c00> {};
template <>
struct Relu<c10::BFloat16> : ReluBits<0x7f80> {};

// A tensor's data as Relu<scalar_t>::type.
template <typename scalar_t>
const typename Relu<scalar_t>::type* data(const at::Tensor& t) {
  return reinterpret_cast<const typename Relu<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
typename Relu<scalar_t>::type* mutable_data(at::Tensor& t) {
  return reinterpret_cast<typename Relu<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t, typename T = typename Relu<scalar_t>::type>
void relu_loop(const T* x, T* y, int64_t n) {
  cpu::parallel_map(y, n, kGrain, [x](int64_t i) { return Relu<scalar_t>::value(x[i]); });
}

// The forward takes integer tensors too, as torch's does (uint8 passes unchanged: it has no negatives).
at::Tensor relu_forward_cpu(const at::Tensor& input) {
  check_float_or_integer_dtype(input, "relu_forward", "input");
  at::Tensor output = at::empty_like(input);
  if (output.numel() == 0) return output;
  const at::Tensor x = dense_like(input, output);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_forward_cpu", [&] {
    relu_loop<scalar_t>(data<scalar_t>(x), mutable_data<scalar_t>(output), x.numel());
  });
  return output;
}

void relu_forward_inplace_cpu(at::Tensor& self) {
  check_float_or_integer_dtype(self, "relu_forward_", "self");
  // Writing through a tensor whose elements share memory (an expanded view) is undefined: refuse it.
  at::assert_no_internal_overlap(self);
  if (self.numel() == 0) return;
  if (self.is_non_overlapping_and_dense()) {
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "relu_forward_inplace_cpu", [&] {
      auto* p = mutable_data<scalar_t>(self);
      relu_loop<scalar_t>(p, p, self.numel());
    });
  } else {
    self.copy_(relu_forward_cpu(self));  // a view with gaps: compute densely, write back through the view
  }
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& output) {
  constexpr const char* op = "relu_backward";
  check_relu_backward(grad_output, output, op);
  at::Tensor grad_input = at::empty_like(output);
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor y = dense_like(output, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_backward_cpu", [&] {
    const auto* yp = data<scalar_t>(y);
    const auto* dyp = data<scalar_t>(dy);
    cpu::parallel_map(mutable_data<scalar_t>(grad_input), y.numel(), kGrain,
                      [dyp, yp](int64_t i) { return Relu<scalar_t>::grad(dyp[i], yp[i]); });
  });
  return grad_input;
}

// ---- with the bit mask (what autograd uses) ----

// parallel_map_words hands out words of cpu::kWord elements: one mask word each.
static_assert(cpu::kWord == kReluMaskBits, "a map word must be a mask word");
// Mask words per task: kGrain elements.
constexpr int64_t kGrainWords = kGrain / kReluMaskBits;

// y = relu(x) for the len elements of mask word w, written to dst, and the word's bits. The fixed
// 32-element loop of a full word compiles to vector compares, shifts and an OR reduction.
template <typename scalar_t, typename T = typename Relu<scalar_t>::type>
inline __attribute__((always_inline)) void relu_word(const T* x, T* dst, int32_t* mask, int64_t w, int len) {
  const T* src = x + w * kReluMaskBits;
  uint32_t bits = 0;
  if (len == kReluMaskBits) {
    for (int j = 0; j < kReluMaskBits; ++j) {
      dst[j] = Relu<scalar_t>::value(src[j]);
      bits |= static_cast<uint32_t>(Relu<scalar_t>::keeps(src[j])) << j;
    }
  } else {
    for (int j = 0; j < len; ++j) {
      dst[j] = Relu<scalar_t>::value(src[j]);
      bits |= static_cast<uint32_t>(Relu<scalar_t>::keeps(src[j])) << j;
    }
  }
  mask[w] = static_cast<int32_t>(bits);
}

std::tuple<at::Tensor, at::Tensor> relu_forward_with_mask_cpu(const at::Tensor& input) {
  check_float_dtype(input, "relu_forward_with_mask", "input");
  at::Tensor output = at::empty_like(input);
  at::Tensor mask = relu_empty_mask(output);
  if (output.numel() == 0) return {output, mask};
  const at::Tensor x = dense_like(input, output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_forward_with_mask_cpu", [&] {
    using T = typename Relu<scalar_t>::type;
    const T* xp = data<scalar_t>(x);
    int32_t* mp = mask.mutable_data_ptr<int32_t>();
    cpu::parallel_map_words(mutable_data<scalar_t>(output), x.numel(), kGrainWords,
                            [xp, mp](int64_t w, T* dst, int len) { relu_word<scalar_t>(xp, dst, mp, w, len); });
  });
  return {output, mask};
}

// dx = dy masked by the bits of word w, for its len elements.
template <typename scalar_t>
inline __attribute__((always_inline)) void relu_grad_word(const scalar_t* dy, const int32_t* mask, scalar_t* dst,
                                                          int64_t w, int len) {
  const scalar_t* src = dy + w * kReluMaskBits;
  const uint32_t word = static_cast<uint32_t>(mask[w]);
  if (len == kReluMaskBits) {
    for (int j = 0; j < kReluMaskBits; ++j) dst[j] = relu_grad_from_mask(src[j], word, j);
  } else {
    for (int j = 0; j < len; ++j) dst[j] = relu_grad_from_mask(src[j], word, j);
  }
}

at::Tensor relu_backward_with_mask_cpu(const at::Tensor& grad_output, const at::Tensor& output,
                                       const at::Tensor& mask) {
  auto [grad_input, dy] = check_relu_backward_with_mask(grad_output, output, mask);
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "relu_backward_with_mask_cpu", [&] {
    using T = typename Relu<scalar_t>::type;  // a mask selects dy or 0: float16/bfloat16 go by their bits
    const T* dyp = data<scalar_t>(dy);
    const int32_t* mp = mask.const_data_ptr<int32_t>();
    cpu::parallel_map_words(mutable_data<scalar_t>(grad_input), dy.numel(), kGrainWords,
                            [dyp, mp](int64_t w, T* dst, int len) { relu_grad_word(dyp, mp, dst, w, len); });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("relu_forward", &relu_forward_cpu);
  m.impl("relu_forward_", &relu_forward_inplace_cpu);
  m.impl("relu_backward", &relu_backward_cpu);
  m.impl("relu_forward_with_mask", &relu_forward_with_mask_cpu);
  m.impl("relu_backward_with_mask", &relu_backward_with_mask_cpu);
}

}  // namespace torch_cs231n
