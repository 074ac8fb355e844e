// Host-side argument handling of batch norm, shared by the CPU and CUDA kernels: checks with torch-grade
// messages, the dtype of the statistics, and the (N, C, S) view of the input that both backends loop over.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/grads.h"

namespace torch_cs231n {

// Statistics and per-channel parameters are held in the "op math" type: float for float, half and
// bfloat16 inputs (torch's mixed batch norm), double for double.
inline at::ScalarType bn_stat_dtype(at::ScalarType input) { return at::toOpMathType(input); }

inline void check_batch_norm_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected input to have 2 or more dimensions (N, C, ...), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  check_float_dtype(input, op, "input");
}

// A per-channel tensor (weight, bias, running or saved statistics): same device as input, 1-D with C
// elements, and the input's dtype, or float for a half/bfloat16 input (mixed precision, as torch allows).
inline void check_batch_norm_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                                            const char* op) {
  check_same_device(input, "input", t, name, op);
  const int64_t C = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": expected ", name, " to have shape [", C,
              "] (the channels of input, dim 1 of ", input.sizes(), "), but got shape ", t.sizes());
  const auto in = input.scalar_type();
  const bool mixed = (in == at::kHalf || in == at::kBFloat16) && t.scalar_type() == at::kFloat;
  TORCH_CHECK(t.scalar_type() == in || mixed, op, ": expected ", name, " to have the dtype of input (", in,
              in == at::kHalf || in == at::kBFloat16 ? " or Float" : "", "), but got ", t.scalar_type());
}

inline void check_batch_norm_optional(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                                      const char* op) {
  if (t.has_value() && t->defined()) check_batch_norm_channel_tensor(*t, name, input, op);
}

// Training divides by the batch's own variance, which is 0 for a single value: torch refuses it.
inline void check_batch_norm_training_size(const at::Tensor& input, const char* op) {
  int64_t per_channel = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.size(d);
  TORCH_CHECK_VALUE(per_channel != 1, op, ": Expected more than 1 value per channel when training, got input size ",
                    input.sizes());
}

// All the arguments of each op, checked once for both backends.
inline void check_batch_norm_forward_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, double eps, const char* op) {
  check_batch_norm_input(input, op);
  check_batch_norm_optional(weight, "weight", input, op);
  check_batch_norm_optional(bias, "bias", input, op);
  TORCH_CHECK(eps > 0, op, ": expected eps to be positive in training, but got ", eps);
  check_batch_norm_training_size(input, op);
}

inline void check_batch_norm_forward_eval(const at::Tensor& input, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, double eps, const char* op) {
  check_batch_norm_input(input, op);
  check_batch_norm_channel_tensor(running_mean, "running_mean", input, op);
  check_batch_norm_channel_tensor(running_var, "running_var", input, op);
  check_batch_norm_optional(weight, "weight", input, op);
  check_batch_norm_optional(bias, "bias", input, op);
  TORCH_CHECK(eps >= 0, op, ": expected eps to be non-negative, but got ", eps);
}

// The input, and a gradient of the output that matches it (the backward ops all take both).
inline void check_batch_norm_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  check_batch_norm_input(input, op);
  check_same_device(input, "input", grad_output, "grad_output", op);
  check_same_dtype(input, "input", grad_output, "grad_output", op);
  check_same_shape(input, "input", grad_output, "grad_output", op);
}

inline void check_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& invstd, const char* op) {
  check_batch_norm_grad_output(grad_output, input, op);
  check_batch_norm_optional(weight, "weight", input, op);
  check_batch_norm_channel_tensor(mean, "mean", input, op);
  check_batch_norm_channel_tensor(invstd, "invstd", input, op);
}

// Synchronised batch norm's ops (the order of their use: ops.cpp).
inline void check_batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& mean, const char* op) {
  check_batch_norm_grad_output(grad_output, input, op);
  check_batch_norm_channel_tensor(mean, "mean", input, op);
}

inline void check_batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                            const at::Tensor& invstd, const at::Tensor& sum_dy,
                                            const at::Tensor& sum_dy_xmu, int64_t count, const char* op) {
  check_batch_norm_backward(grad_output, input, weight, mean, invstd, op);
  check_batch_norm_channel_tensor(sum_dy, "sum_dy", input, op);
  check_batch_norm_channel_tensor(sum_dy_xmu, "sum_dy_xmu", input, op);
  int64_t local = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) local *= input.size(d);
  TORCH_CHECK(count >= local, op,
              ": expected count (the values per channel of the whole batch) to be at least "
              "this input's ",
              local, ", but got ", count);
}

// batch_norm_update_stats_: the batch's mean and var [C], floating, on one device; each running statistic
// given, [C], floating, on that device; count >= 0, and above 1 when the variance is updated (its
// unbiased value divides by count - 1; torch's batch norm refuses one value per channel in training).
inline void check_batch_norm_update_stats(const std::optional<at::Tensor>& running_mean,
                                          const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                          const at::Tensor& var, int64_t count, const char* op) {
  check_dim(mean, 1, op, "mean");
  check_float_dtype(mean, op, "mean");
  check_float_dtype(var, op, "var");
  check_same_device(mean, "mean", var, "var", op);
  check_same_shape(mean, "mean", var, "var", op);
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    check_same_device(mean, "mean", **t, name, op);
    check_float_dtype(**t, op, name);
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == mean.size(0), op, ": expected ", name, " to have shape [",
                mean.size(0), "] (that of mean), but got shape ", (*t)->sizes());
  }
  TORCH_CHECK(count >= 0, op, ": expected count (values per channel) to be >= 0, but got ", count);
  const bool updates_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(!updates_var || count != 1, op,
              ": expected more than 1 value per channel to update running_var (its unbiased variance divides by "
              "count - 1), but got count 1");
}

// counts [P], means and vars [P, C]: one row per process, of one floating dtype, on one device.
inline void check_batch_norm_merge_stats(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& vars,
                                         double eps, const char* op) {
  check_dim(counts, 1, op, "counts");
  check_dim(means, 2, op, "means");
  check_float_dtype(means, op, "means");
  check_same_device(means, "means", counts, "counts", op);
  check_same_device(means, "means", vars, "vars", op);
  check_same_dtype(means, "means", counts, "counts", op);
  check_same_dtype(means, "means", vars, "vars", op);
  check_same_shape(means, "means", vars, "vars", op);
  TORCH_CHECK(means.size(0) == counts.size(0), op, ": expected means to have one row per count (", counts.size(0),
              "), but got shape ", means.sizes());
  TORCH_CHECK(eps > 0, op, ": expected eps to be positive in training, but got ", eps);
}

// The per-channel tensor as a contiguous tensor of the statistics dtype; `fill` when it is absent.
inline at::Tensor bn_channel_values(const std::optional<at::Tensor>& t, const at::Tensor& input, double fill) {
  const auto dtype = bn_stat_dtype(input.scalar_type());
  if (t.has_value() && t->defined()) return t->to(dtype).contiguous();
  return at::full({input.size(1)}, fill, input.options().dtype(dtype));
}

// The memory format of batch norm's outputs, as torch chooses it: the input's suggested format
// (channels_last in, channels_last out; anything else, contiguous).
inline at::Tensor bn_empty_output(const at::Tensor& input) {
  return at::empty(input.sizes(), input.options().memory_format(input.suggest_memory_format()));
}

// A dense tensor viewed as channel-first (N, C, S) or channel-last (N, S, C), S = product of dims 2..
// Both backends loop over one of the two; any other layout is copied into the output's layout first.
struct BatchNormLayout {
  int64_t N, C, S;
  bool channels_last;                  // C innermost: rows of C values; otherwise planes of S values per (n, c)
  int64_t M() const { return N * S; }  // values per channel
};

// `x` must be dense in the layout of bn_empty_output (contiguous or channels_last/channels_last_3d).
inline BatchNormLayout batch_norm_layout(const at::Tensor& x) {
  BatchNormLayout l;
  l.N = x.size(0);
  l.C = x.size(1);
  l.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) l.S *= x.size(d);
  // S == 1 (an (N, C) batch) is both; rows of C values vectorise better than planes of one value.
  l.channels_last = l.S == 1 || !x.is_contiguous();
  return l;
}

}  // namespace torch_cs231n
