// Batch norm's derivatives, registered under the Autograd dispatch key, in C++ for ReLU's reason
// (relu_autograd.cpp): at the small batches of the CS231n suite, and in eval mode at batch 1 (fine-tuning
// or saliency through a frozen ResNet or MobileNetV2), the layer is host-bound, and a Python
// autograd.Function's bookkeeping cost more than its kernels (a Python forward, and a Python backward
// called from the engine: 0.35 ms a layer at (1, 384, 14, 14) in eval, whose kernel takes 0.02).
//
//   y, mean, invstd, var = batch_norm_forward_train(x, gamma, beta, eps)     (mean, invstd, var: constants)
//   dx, dgamma, dbeta     = batch_norm_backward(dy, x, gamma, mean, invstd, training=True, mask)
//   y                     = batch_norm_forward_eval(x, running_mean, running_var, gamma, beta, eps)
//   dx, dgamma, dbeta     = batch_norm_backward(dy, x, gamma, running_mean, (running_var + eps)^(-1/2),
//                                               training=False, mask)       (the running statistics: constants)
//
// batch_norm_backward is differentiable by itself (functional.py registers the derivative of its formula),
// so with create_graph=True the call below records it, and double backward stays exact. Under torch.func
// transforms and forward-mode AD, functional.py uses its Python Function instead, which carries the jvp
// and the batching rule.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd/tracking.h"

namespace torch_cs231n {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

Stats call_forward_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::batch_norm_forward_train", "")
                             .typed<Stats(const at::Tensor&, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, double)>();
  return op.call(input, weight, bias, eps);
}

at::Tensor call_forward_eval(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_cs231n::batch_norm_forward_eval", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double)>();
  return op.call(input, running_mean, running_var, weight, bias, eps);
}

Grads call_backward(const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                    const at::Tensor& mean, const at::Tensor& invstd, bool training, std::array<bool, 3> mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::batch_norm_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          const at::Tensor&, const at::Tensor&, bool, std::array<bool, 3>)>();
  if (!at::GradMode::is_enabled()) {  // no create_graph: the kernel, past the op's own (Python) autograd
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(grad_output, input, weight, mean, invstd, training, mask);
  }
  return op.call(grad_output, input, weight, mean, invstd, training, mask);
}

// The kernels give dgamma and dbeta in the statistics' dtype (float for half input); autograd wants each
// parameter's own dtype.
at::Tensor in_dtype(const std::optional<at::Tensor>& grad, int64_t dtype) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  const auto want = static_cast<at::ScalarType>(dtype);
  return grad->scalar_type() == want ? *grad : grad->to(want);
}

// With create_graph=True the saved statistics must be functions of x for the next derivative: their values
// stay the kernel's, their derivative is that of mean(x) and (var(x) + eps)^(-1/2), by value + (f - f.detach()).
std::tuple<at::Tensor, at::Tensor> differentiable_stats(const at::Tensor& input, const at::Tensor& mean,
                                                        const at::Tensor& invstd, double eps) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  const at::Tensor x = input.to(mean.scalar_type());
  const at::Tensor m = x.mean(dims);
  const at::Tensor is = (x.var(dims, /*unbiased=*/false) + eps).rsqrt();
  return {mean + (m - m.detach()), invstd + (is - is.detach())};
}

// What both backwards need of the affine parameters: their dtypes (in_dtype), whether beta was given, eps.
void save_parameters(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps) {
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["weight_dtype"] = static_cast<int64_t>(has_weight ? weight->scalar_type() : input.scalar_type());
  ctx->saved_data["bias_dtype"] = static_cast<int64_t>(has_bias ? bias->scalar_type() : input.scalar_type());
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["eps"] = eps;
}

// The gradients asked for, (dx, dgamma, dbeta). needs_input_grad counts the tensor inputs only: gamma's
// edge is `gamma_edge` and a gamma of None takes no place.
std::array<bool, 3> grad_mask(AutogradContext* ctx, bool has_weight, size_t gamma_edge) {
  const size_t beta_edge = has_weight ? gamma_edge + 1 : gamma_edge;
  return {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(gamma_edge),
          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(beta_edge)};
}

class BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    Stats out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = call_forward_train(input, weight, bias, eps);
    }
    auto& [output, mean, invstd, var] = out;
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd});
    save_parameters(ctx, input, weight, bias, eps);
    ctx->mark_non_differentiable({mean, invstd, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the statistics
    return {output, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    const std::optional<at::Tensor> weight_opt = weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
    const std::array<bool, 3> mask = grad_mask(ctx, weight.defined(), /*gamma_edge=*/1);  // x, gamma, beta
    at::Tensor mean = saved[2], invstd = saved[3];
    if (at::GradMode::is_enabled()) {  // create_graph: this backward is differentiated in its turn
      std::tie(mean, invstd) = differentiable_stats(saved[0], mean, invstd, ctx->saved_data["eps"].toDouble());
    }
    auto [dx, dw, db] = call_backward(grads[0], saved[0], weight_opt, mean, invstd, /*training=*/true, mask);
    return {dx.value_or(at::Tensor()), in_dtype(dw, ctx->saved_data["weight_dtype"].toInt()),
            in_dtype(db, ctx->saved_data["bias_dtype"].toInt()), at::Tensor()};
  }
};

Stats batch_norm_forward_train_autograd(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  if (!needs_graph({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward_train(input, weight, bias, eps);
  }
  const variable_list out = BatchNormTrain::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

// Eval: the running statistics are constants (None as their gradients, as the Python Function gives).
class BatchNormEval : public torch::autograd::Function<BatchNormEval> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& running_mean,
                            const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      output = call_forward_eval(input, running_mean, running_var, weight, bias, eps);
    }
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), running_mean, running_var});
    save_parameters(ctx, input, weight, bias, eps);
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(6);
    if (!grads[0].defined()) return none;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    const std::optional<at::Tensor> weight_opt = weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
    // x, running_mean, running_var, gamma, beta
    const std::array<bool, 3> mask = grad_mask(ctx, weight.defined(), /*gamma_edge=*/3);
    // 1/sqrt(running_var + eps) as the forward kernel computes it (common/batch_norm.h)
    const at::Tensor invstd = (saved[3] + ctx->saved_data["eps"].toDouble()).rsqrt();
    auto [dx, dw, db] = call_backward(grads[0], saved[0], weight_opt, saved[2], invstd, /*training=*/false, mask);
    none[0] = dx.value_or(at::Tensor());
    none[3] = in_dtype(dw, ctx->saved_data["weight_dtype"].toInt());
    none[4] = in_dtype(db, ctx->saved_data["bias_dtype"].toInt());
    return none;
  }
};

at::Tensor batch_norm_forward_eval_autograd(const at::Tensor& input, const at::Tensor& running_mean,
                                            const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias, double eps) {
  if (!needs_graph({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward_eval(input, running_mean, running_var, weight, bias, eps);
  }
  return BatchNormEval::apply(input, running_mean, running_var, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, Autograd, m) {
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_autograd);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_autograd);
}

}  // namespace torch_cs231n
