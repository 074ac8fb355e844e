// The result of every backward op that computes several gradients (conv2d_backward, batch_norm_backward):
// each gradient where output_mask asks for it, None where it does not, as torch's own backward ops do.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace torch_cs231n {

using MaskedGrads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

inline MaskedGrads masked_grads(const at::Tensor& grad_input, const at::Tensor& grad_weight,
                                const at::Tensor& grad_bias, std::array<bool, 3> output_mask) {
  auto pick = [](bool want, const at::Tensor& t) { return want ? std::optional<at::Tensor>(t) : std::nullopt; };
  return {pick(output_mask[0], grad_input), pick(output_mask[1], grad_weight), pick(output_mask[2], grad_bias)};
}

}  // namespace torch_cs231n
