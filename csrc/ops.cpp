// Every operator schema of the torch_cs231n library, in one place. The kernels live in cpu/<op>.cpp and
// cuda/<op>.cu (TORCH_LIBRARY_IMPL); fake kernels for torch.compile and opcheck in
// torch_cs231n/_fake.py; autograd in torch_cs231n/functional.py, except ReLU's, which is in
// autograd/relu_autograd.cpp.
//
// Built ahead of time this file is the Python module torch_cs231n._C, whose import loads the library and
// runs the registrations; built by the JIT it is a plain shared library (is_python_module=False).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_features.h"

#ifndef TORCH_CS231N_VERSION
#define TORCH_CS231N_VERSION "0.1.0"
#endif

namespace torch_cs231n {

// What this binary was built with, for tests, `python -m torch_cs231n demo` and `check`.
std::string build_info() {
  std::string info = std::string("version=") + TORCH_CS231N_VERSION;
#ifdef WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

// The instruction set the CPU kernels use now (cpu/cpu_features.h): "amx", "avx512", "avx2" or "baseline".
std::string cpu_isa() { return cpu::isa_name(cpu::cpu_level()); }

// Caps the CPU kernels' instruction set ("auto" lifts the cap); returns the previous setting, so that a
// caller can restore it. A cap above what the CPU has changes nothing: cpu_isa() says what runs.
std::string set_cpu_isa(const std::string& isa) {
  int cap = -1;
  cpu::Isa parsed;
  if (isa != "auto") {
    TORCH_CHECK(cpu::parse_isa(isa.c_str(), &parsed),
                "set_cpu_isa: expected isa to be one of 'amx', 'avx512', 'avx2', ", "'baseline' or 'auto', but got '",
                isa, "'");
    cap = static_cast<int>(parsed);
  }
  const int previous = cpu::isa_cap().exchange(cap);
  return previous < 0 ? "auto" : cpu::isa_name(static_cast<cpu::Isa>(previous));
}

}  // namespace torch_cs231n

TORCH_LIBRARY(torch_cs231n, m) {
  m.def("build_info() -> str", &torch_cs231n::build_info);
  m.def("cpu_isa() -> str", &torch_cs231n::cpu_isa);
  m.def("set_cpu_isa(str isa) -> str", &torch_cs231n::set_cpu_isa);
  // The convolution's GEMM on its own, for tests: a (m, k) @ b (k, n), float32 or float64, any strides.
  m.def("gemm(Tensor a, Tensor b) -> Tensor");

  // ReLU. The backward masks by the forward's output.
  m.def("relu_forward(Tensor input) -> Tensor");
  // In place. It returns nothing: torch's functionalization (torch.compile, opcheck) takes custom ops
  // that mutate an argument only when they do not also return an alias of it.
  m.def("relu_forward_(Tensor(a!) self) -> ()");
  m.def("relu_backward(Tensor grad_output, Tensor output) -> Tensor");
  // What autograd uses: the forward also returns the mask [x > 0] packed 32 elements to an int32 word,
  // in the output's memory order, and the backward reads the mask's bits instead of the output's values
  // (a 32nd of the bytes in float32). It takes the output only for its shape and strides, which say
  // the order of the mask's bits and the layout of the grad_input returned.
  m.def("relu_forward_with_mask(Tensor input) -> (Tensor output, Tensor mask)");
  m.def("relu_backward_with_mask(Tensor grad_output, Tensor output, Tensor mask) -> Tensor");

  // Conv2d (cross-correlation, as torch's). Symmetric zero padding; padding='same' with an odd total and
  // the other padding modes are done in Python by padding the input first. The backward computes only
  // the gradients that output_mask asks for (d_input, d_weight, d_bias); the others come back as None.
  m.def(
      "conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // Max pooling. The forward returns the int64 argmax of each window, flat h*W + w within its plane,
  // as torch does; the backward sends each gradient there. It takes the input only for its shape and
  // memory format (and checks the geometry again), so autograd saves it as torch's own max-pool does.
  m.def(
      "max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  // Batch norm (per channel over N and the spatial dims). The training forward returns the batch's
  // mean and inverse std for the backward, and its biased variance; the forward kernels never write the
  // running statistics: functional.py then calls batch_norm_update_stats_, which does, in place,
  //     running_mean <- (1 - momentum) running_mean + momentum mean
  //     running_var  <- (1 - momentum) running_var  + momentum var * count / (count - 1)   (unbiased)
  // (count: the values per channel; 0, an empty batch, leaves them alone). One call instead of four
  // in-place ops from Python: at small batches the layer's time is mostly such host work.
  m.def(
      "batch_norm_forward_train(Tensor input, Tensor? weight, Tensor? bias, float eps) -> "
      "(Tensor output, Tensor save_mean, Tensor save_invstd, Tensor save_var)");
  m.def(
      "batch_norm_update_stats_(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
  m.def(
      "batch_norm_forward_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps) -> Tensor");
  // mean/invstd: the saved batch statistics (training) or the running mean and 1/sqrt(running_var + eps).
  // A gradient that output_mask does not ask for is None.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "bool training, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // Synchronised batch norm (torch_cs231n.SyncBatchNorm) splits the training passes where the processes
  // exchange per-channel values (torch_cs231n/distributed.py):
  //   forward   batch_norm_stats on each process's input (its mean and biased variance); all-gather;
  //             batch_norm_merge_stats (rows: processes) gives the global mean, variance and invstd;
  //             batch_norm_forward_eval normalises with them.
  //   backward  batch_norm_backward_reduce (sum dy, sum dy (x - mean) over this process's values);
  //             all-gather, summed in rank order; batch_norm_backward_elemt gives d_input from the
  //             global sums and count.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_merge_stats(Tensor counts, Tensor means, Tensor vars, float eps) -> "
      "(Tensor mean, Tensor var, Tensor invstd)");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean) -> "
      "(Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");
}

extern "C" {
// The module init of torch_cs231n._C. The module is empty: importing it is what registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
