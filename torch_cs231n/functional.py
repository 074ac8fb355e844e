"""The functional API, with the signatures of ``torch.nn.functional``.

Each layer is a ``torch.autograd.Function`` whose forward and backward call our ops
(``torch.ops.torch_cs231n.*``). They are written for torch.func as well as for autograd: the forward
takes no ctx and ``setup_context`` saves what the backward needs; ``jvp`` gives forward-mode derivatives;
``generate_vmap_rule`` batches them through the ops' batching rules (_vmap.py). Each backward is itself
such a Function, so double backward is exact.

ReLU is the exception in plain eager mode: its derivative is registered in C++
(csrc/autograd/relu_autograd.cpp), because its kernels are cheap enough for a Python Function's overhead
to show (25-75 µs a call); under a torch.func transform or forward-mode AD, which cannot see into a C++
Function, it takes the Python Functions below.
"""
from __future__ import annotations

import contextlib

import torch

from . import _extension

_extension.load()
from . import _fake, _vmap  # noqa: E402,F401  (fake kernels and batching rules need the ops registered first)

ops = torch.ops.torch_cs231n

__all__ = ["relu", "conv2d", "max_pool2d", "batch_norm"]


def _transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running, or forward-mode AD
    (torch.autograd.forward_ad) has a dual level open: the cases for the Python Functions with jvp."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


# Forward mode: torch.func.jvp needs a Function's jvp, and torch.compile cannot trace a Function that has
# one ("Unsupported custom jvp"). So each Function keeps its forward-mode derivative as _jvp, and
# _with_jvp makes a subclass where it is the jvp; _fn(F) is that subclass while a torch.func transform
# or forward-mode AD runs, F itself otherwise (eager autograd and torch.compile).
_JVP_VARIANTS: dict = {}


class _Static:
    """Non-tensor arguments of a Function (a geometry, a mask) held as one opaque value. torch.func's
    generated vmap rule for a jvp flattens list and tuple arguments into leaves and then miscounts them
    (a hessian through max-pool failed that way); an object it does not look into is one leaf."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = tuple(value)


def _with_jvp(cls):
    _JVP_VARIANTS[cls] = type(cls.__name__ + "WithJvp", (cls,), {"jvp": staticmethod(cls._jvp)})
    return cls


def _fn(cls):
    return _JVP_VARIANTS.get(cls, cls) if _transforms_active() else cls


# --------------------------------------------------------------------------------------------------- ReLU
@_with_jvp
class _ReLU(torch.autograd.Function):
    """y = max(x, 0); dx = dy * [y > 0] (read from y). The torch.func path; eager autograd takes the C++
    derivative of relu_forward instead."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        with torch._C._AutoDispatchBelowAutograd():  # the kernel itself, not its C++ autograd wrapper
            return ops.relu_forward(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return _fn(_ReLUBackward).apply(grad_output, output)

    @staticmethod
    def _jvp(ctx, tangent):
        (output,) = ctx.saved_tensors
        return _fn(_ReLUBackward).apply(tangent, output)  # the same masking: dy = [y > 0] dx


@_with_jvp
class _ReLUBackward(torch.autograd.Function):
    """dx = dy * [y > 0]: linear in dy, and the mask's derivative is zero almost everywhere."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, output):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.relu_backward(grad_output, output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad_grad_input):
        (output,) = ctx.saved_tensors
        return _fn(_ReLUBackward).apply(grad_grad_input, output), None

    @staticmethod
    def _jvp(ctx, tangent, _output_tangent):
        (output,) = ctx.saved_tensors
        return _fn(_ReLUBackward).apply(tangent, output)


class _ReLUInplace(torch.autograd.Function):
    """x <- max(x, 0) in place; dx = dy * [x > 0], read from the overwritten x."""

    @staticmethod
    def forward(ctx, input):
        ops.relu_forward_(input)
        ctx.mark_dirty(input)
        ctx.save_for_backward(input)
        return input

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        # Differentiable in its turn (C++ autograd), so double backward is exact with create_graph=True.
        return ops.relu_backward(grad_output, output)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Like ``torch.nn.functional.relu``: max(input, 0) elementwise; NaN stays NaN.

    The output has the input's memory format (channels_last stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    if _transforms_active() or torch.jit.is_tracing():
        # Under a transform, or torch.jit.trace, the in-place form writes the result back through copy_,
        # which they follow (a Function that marks its input dirty can be neither batched nor traced).
        output = _fn(_ReLU).apply(input)
        return input.copy_(output) if inplace else output
    if not inplace:
        return ops.relu_forward(input)
    if torch.is_grad_enabled() and input.requires_grad:
        return _ReLUInplace.apply(input)
    ops.relu_forward_(input)
    return input


# ------------------------------------------------------------------------------------------------- Conv2d
def _conv_pair(value, name):
    """An int or a pair of ints, as F.conv2d takes them, as a list of 2 ints."""
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    if len(value) == 1:
        return [int(value[0])] * 2
    if len(value) != 2:
        raise RuntimeError(
            f"conv2d: expected {name} to be a single integer or a pair of integers, but got {name}={value}")
    return [int(v) for v in value]


@_with_jvp
class _Conv2d(torch.autograd.Function):
    """y = conv2d(x, W) + b through our ops; backward through _Conv2dBackward, itself differentiable.
    jvp: the convolution is bilinear, so dy = conv(dx, W) + conv(x, dW) + db. The torch.func path (and
    second derivatives' convolutions); eager autograd takes the C++ derivative of conv2d_forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        with torch._C._AutoDispatchBelowAutograd():  # the kernel itself, not its C++ autograd wrapper
            return ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *args = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.args = tuple(args)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        # Only the gradients autograd asks for are computed: a first layer does not pay for d_input.
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if not any(mask):
            return (None,) * 7
        grads = _conv2d_backward(grad_output, input, weight, ctx.args, mask)
        dx, dw, db = (g if m else None for g, m in zip(grads, mask))
        return dx, dw, db, None, None, None, None

    @staticmethod
    def _jvp(ctx, t_input, t_weight, t_bias, *_):
        input, weight = ctx.saved_tensors
        terms = []
        if t_input is not None:
            terms.append(_fn(_Conv2d).apply(t_input, weight, None, *ctx.args))
        if t_weight is not None:
            terms.append(_fn(_Conv2d).apply(input, t_weight, None, *ctx.args))
        if t_bias is not None:
            terms.append(t_bias.view(1, -1, 1, 1))
        return _sum_terms(terms)


def _conv2d_backward(grad_output, input, weight, args, mask):
    """(d_x, d_W, d_b) through _Conv2dBackward, its arguments and mask as _Static values."""
    return _fn(_Conv2dBackward).apply(grad_output, input, weight, _Static(args), _Static(mask))


def _sum_terms(terms):
    """The sum of a list of tensors (broadcasting), or None for an empty list."""
    total = None
    for t in terms:
        total = t if total is None else total + t
    return total


@_with_jvp
class _Conv2dBackward(torch.autograd.Function):
    """(d_x, d_W, d_b) = conv2d_backward(dY, x, W), differentiable so that double backward is right.

    d_x = Dx(dY, W) and d_W = Dw(x, dY) are bilinear, and the adjoint identities
        <g, Dx(dY, W)> = <dY, conv(g, W)>   and   <g, Dw(x, dY)> = <dY, conv(x, g)>
    give every second derivative in terms of the same two ops:
        d/d(dY) = conv(g_dx, W) + conv(x, g_dW) + g_db,   d/dW = Dw(g_dx, dY),   d/dx = Dx(dY, g_dW).
    Bilinearity gives the jvp too: each output's tangent is the op on one tangent and the other primal.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, weight, args, mask):
        return ops.conv2d_backward(grad_output, input, weight, *args.value, list(mask.value))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, args, mask = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_output, input, weight)
        ctx.save_for_forward(grad_output, input, weight)
        ctx.args, ctx.mask = args.value, mask.value
        mask = mask.value
        ctx.mark_non_differentiable(*(g for g, m in zip(output, mask) if not m and g is not None))

    @staticmethod
    def backward(ctx, g_dx, g_dw, g_db):
        dy, x, w = ctx.saved_tensors
        g_dx, g_dw, g_db = (g if m else None for g, m in zip((g_dx, g_dw, g_db), ctx.mask))
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        gdy = gx = gw = None
        if need_dy:
            terms = []
            if g_dx is not None:
                terms.append(_fn(_Conv2d).apply(g_dx, w, None, *ctx.args))
            if g_dw is not None:
                terms.append(_fn(_Conv2d).apply(x, g_dw, None, *ctx.args))
            if g_db is not None:
                terms.append(g_db.view(1, -1, 1, 1).expand_as(dy))
            gdy = _sum_terms(terms)
        if need_w and g_dx is not None:
            gw = _conv2d_backward(dy, g_dx, w, ctx.args, (False, True, False))[1]
        if need_x and g_dw is not None:
            gx = _conv2d_backward(dy, x, g_dw, ctx.args, (True, False, False))[0]
        return gdy, gx, gw, None, None

    @staticmethod
    def _jvp(ctx, t_dy, t_x, t_w, _args, _mask):
        dy, x, w = ctx.saved_tensors
        mask_dx, mask_dw, mask_db = ctx.mask
        tangents = [None, None, None]
        if mask_dx:  # d_x = Dx(dY, W)
            terms = []
            if t_dy is not None:
                terms.append(_conv2d_backward(t_dy, x, w, ctx.args, (True, False, False))[0])
            if t_w is not None:
                terms.append(_conv2d_backward(dy, x, t_w, ctx.args, (True, False, False))[0])
            tangents[0] = _sum_terms(terms)
        if mask_dw:  # d_W = Dw(x, dY)
            terms = []
            if t_dy is not None:
                terms.append(_conv2d_backward(t_dy, x, w, ctx.args, (False, True, False))[1])
            if t_x is not None:
                terms.append(_conv2d_backward(dy, t_x, w, ctx.args, (False, True, False))[1])
            tangents[1] = _sum_terms(terms)
        if mask_db and t_dy is not None:  # d_b = Σ dY
            tangents[2] = t_dy.sum((0, 2, 3))
        return tuple(tangents)


def _autocast_inputs(*tensors):
    """Under ``torch.autocast``, the convolution's floating inputs in the autocast dtype, as torch casts its
    conv2d's (float64 stays float64), for the torch.func transforms' autograd Function, which must save and
    differentiate the cast tensors. The eager path leaves the cast to the op's Autocast kernel
    (csrc/autocast/autocast.cpp), which runs before its autograd and, as torch's conv2d, keeps the cast of
    a weight (a leaf that requires grad) for the whole autocast region: cast here, every call cast the
    weights again (a 512 x 512 x 3 x 3 one 0.9 ms, a third of ResNet-50's bfloat16 inference at batch 1)."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 and t.device.type == device else t for t in tensors)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like ``torch.nn.functional.conv2d`` (cross-correlation), computed by our kernels.

    ``stride``, ``padding`` and ``dilation`` are an int or a pair; ``padding`` may also be ``'valid'``
    (no padding) or ``'same'`` (stride 1 only; when ``dilation*(k-1)`` is odd the extra row/column of
    zeros goes at the bottom/right, as in torch). ``input`` is (N, C, H, W) or unbatched (C, H, W);
    N = 0 works. float32, float64, float16 and bfloat16 (computed in float32 and rounded once); under
    ``torch.autocast`` the floating inputs are cast to the autocast dtype, as torch's conv2d does. As
    torch's, also complex dtypes (three real convolutions, below) and, on the CPU, the integer dtypes
    (forward only; sums wrap around in the dtype).

    Memory format, as torch's: channels_last output and gradients when the input or the weight is
    channels_last, contiguous NCHW otherwise.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'input' must be Tensor, not {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    if input.is_complex() or weight.is_complex() or (isinstance(bias, torch.Tensor) and bias.is_complex()):
        return _complex_conv2d(input, weight, bias, stride, padding, dilation, groups)
    stride = _conv_pair(stride, "stride")
    dilation = _conv_pair(dilation, "dilation")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            if stride != [1, 1]:
                raise RuntimeError("conv2d: padding='same' is not supported for strided convolutions")
            padding = [0, 0]
            if weight.dim() == 4 and input.dim() == 4:  # otherwise the op reports the bad shape
                # A total of d*(k-1) zeros per axis: half on each side, the odd one at the bottom/right
                # (torch's rule). The odd one is padded here, explicitly, the rest by the op.
                totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
                padding = [t // 2 for t in totals]
                extra_h, extra_w = (t % 2 for t in totals)
                if extra_h or extra_w:
                    input = torch.nn.functional.pad(input, [0, extra_w, 0, extra_h])
        else:
            raise RuntimeError(f"conv2d: invalid padding string {padding!r}, should be one of {{'valid', 'same'}}")
    else:
        padding = _conv_pair(padding, "padding")
    if _transforms_active():
        input, weight, bias = _autocast_inputs(input, weight, bias)
        output = _fn(_Conv2d).apply(input, weight, bias, stride, padding, dilation, int(groups))
    else:  # the op's own C++ derivative (csrc/autograd/conv2d_autograd.cpp), cast by its Autocast kernel
        output = ops.conv2d_forward(input, weight, bias, stride, padding, dilation, int(groups))
    return output.squeeze(0) if unbatched else output


def _complex_conv2d(input, weight, bias, stride, padding, dilation, groups):
    """A complex convolution as three real ones (Gauss's trick, as torch computes it). With x = a + ib and
    W = c + id, and ⊛ the real convolution, linear in each argument:

        x ⊛ W = (a⊛c − b⊛d) + i((a + b)⊛(c + d) − a⊛c − b⊛d)

    Every step is a differentiable torch op or our convolution, so autograd gives the complex gradients
    (torch's conjugate Wirtinger convention) and the transforms batch it, with nothing of its own. Autocast
    leaves it alone, as it leaves torch's: it casts floating tensors, and a complex one is not."""
    tensors = {"input": input, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"conv2d_forward: expected {name} to have the dtype of input ({input.dtype}), "
                               f"but got {t.dtype}")
    a, b, c, d = input.real, input.imag, weight.real, weight.imag
    args = (stride, padding, dilation, groups)
    device = input.device.type
    no_autocast = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    with no_autocast:
        ac, bd = conv2d(a, c, None, *args), conv2d(b, d, None, *args)
        real, imag = ac - bd, conv2d(a + b, c + d, None, *args) - ac - bd
    if bias is not None:
        per_channel = (-1, 1, 1)  # the channel dimension, batched or not
        real, imag = real + bias.real.view(per_channel), imag + bias.imag.view(per_channel)
    return torch.complex(real, imag)


# -------------------------------------------------------------------------------------------- MaxPool2d
def _pool_pair(value, name: str) -> list[int]:
    """An int or a pair of ints, as F.max_pool2d takes them, as [height, width]."""
    if isinstance(value, (list, tuple, torch.Size)):
        if len(value) == 1:  # torch accepts a 1-tuple as "the same in both dimensions"
            value = (value[0], value[0])
        if len(value) != 2:
            raise RuntimeError(f"max_pool2d(): {name} must be an int or a pair of ints, but got {tuple(value)}")
        return [int(v) for v in value]
    return [int(value), int(value)]


@_with_jvp
class _MaxPool2d(torch.autograd.Function):
    """y[o] = max of the window of o, index[o] = its flat argmax h*W + w; dx[i] = sum_{index[o]=i} dy[o].

    Saves the indices (and the input, for its shape and memory format, as torch does). jvp: the tangent
    of the winner, dy[o] = dx[index[o]].
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, *geometry = inputs
        _, indices = output
        ctx.save_for_backward(input, indices)
        ctx.save_for_forward(indices)
        ctx.geometry = tuple(geometry)
        ctx.mark_non_differentiable(indices)
        # Otherwise autograd fills a tensor of zeros for the indices' (never used) gradient on every
        # backward, which costs as much as the backward itself.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:
            return None, None, None, None, None, None
        input, indices = ctx.saved_tensors
        grad_input = _fn(_MaxPool2dBackward).apply(grad_output, input, indices, _Static(ctx.geometry))
        return grad_input, None, None, None, None, None

    @staticmethod
    def _jvp(ctx, t_input, *_):
        (indices,) = ctx.saved_tensors
        return _gather_windows(t_input, indices), None


def _gather_windows(t, indices):
    """t[..., index[o]] within each plane: the value of every window's winner (plain torch ops, so that
    it is differentiable and batched in its turn; its adjoint is max_pool2d_backward's scatter)."""
    return t.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)


@_with_jvp
class _MaxPool2dBackward(torch.autograd.Function):
    """dx = scatter of dy to the saved indices; itself differentiable, so double backward is right.

    It is linear in dy, and its adjoint is the gather ddy[o] = ddx[index[o]]: the derivative of the
    pooled value with respect to its winner is 1 and to everything else 0. Its derivative with respect
    to the input is zero almost everywhere (the indices are piecewise constant), as in torch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, indices, geometry):
        return ops.max_pool2d_backward(grad_output, input, indices, *geometry.value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, input, indices, geometry = inputs
        ctx.save_for_backward(input, indices)
        ctx.save_for_forward(input, indices)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_grad_input):
        _, indices = ctx.saved_tensors
        return _gather_windows(grad_grad_input, indices), None, None, None

    @staticmethod
    def _jvp(ctx, t_grad_output, *_):
        input, indices = ctx.saved_tensors
        return _fn(_MaxPool2dBackward).apply(t_grad_output, input, indices, ctx.geometry)


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """Like ``torch.nn.functional.max_pool2d``: the maximum of each window, over (N, C, H, W) or (C, H, W).

    Padding counts as -inf and may be at most half the effective kernel ``dilation*(kernel_size-1)+1``;
    ``stride`` defaults to ``kernel_size``. Ties go to the first maximum in row-major scan order, NaN
    propagates. With ``return_indices`` it also returns the int64 flat index ``h*W + w`` of each maximum
    within its plane (usable by ``nn.MaxUnpool2d``). The output has torch's memory format (channels_last
    stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"max_pool2d(): argument 'input' must be Tensor, not {type(input).__name__}")
    kernel = _pool_pair(kernel_size, "kernel_size")
    strides = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else \
        _pool_pair(stride, "stride")
    geometry = (kernel, strides, _pool_pair(padding, "padding"), _pool_pair(dilation, "dilation"), bool(ceil_mode))
    if _transforms_active():
        output, indices = _fn(_MaxPool2d).apply(input, *geometry)
    else:  # the op's derivative in C++ (csrc/autograd/max_pool2d_autograd.cpp)
        output, indices = ops.max_pool2d_forward(input, *geometry)
    return (output, indices) if return_indices else output


# --------------------------------------------------------------------------------------------- batch norm
@_with_jvp
class _BatchNormTrain(torch.autograd.Function):
    """Training: normalise with the batch's statistics, which depend on x (so dx has three terms).

    Returns (output, mean, invstd, var); only the output is differentiable. The backward is our kernel,
    inside _BatchNormBackward, which is differentiable in its turn: double backward is exact. jvp:
    dy = gamma invstd (dx - mean(dx) - xhat mean(dx xhat)) + dgamma xhat + dbeta.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, eps):
        return ops.batch_norm_forward_train(input, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, eps = inputs
        _, mean, invstd, var = output
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, invstd, var)

    @staticmethod
    def backward(ctx, grad_output, _mean, _invstd, _var):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated (double backward)
            dx, dw, db = _fn(_BatchNormBackward).apply(grad_output, input, weight, mean, invstd, ctx.eps, True,
                                                       _Static(mask))
        else:  # the kernel alone: a Function around it would only cost time (small batches are host-bound)
            dx, dw, db = ops.batch_norm_backward(grad_output, input, weight, mean, invstd, True, list(mask))
        return dx, _as_param(dw, weight), _as_param(db, ctx.bias_dtype), None

    @staticmethod
    def _jvp(ctx, t_input, t_weight, t_bias, _t_eps):
        input, weight, mean, invstd = ctx.saved_tensors
        tangent = _batch_norm_tangent(input, weight, mean, invstd, t_input, t_weight, t_bias, training=True)
        return tangent, None, None, None


@_with_jvp
class _BatchNormEval(torch.autograd.Function):
    """Eval: normalise with the running statistics, constants for autograd: dx = gamma * invstd * dy."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, running_mean, running_var, weight, bias, eps):
        return ops.batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, running_mean, running_var, weight, bias, eps = inputs
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.save_for_forward(input, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, running_mean, running_var = ctx.saved_tensors
        invstd = torch.rsqrt(running_var + ctx.eps)  # C values: the kernel computes it the same way
        mask = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dw, db = _fn(_BatchNormBackward).apply(grad_output, input, weight, running_mean, invstd, ctx.eps, False,
                                                   _Static(mask))
        return dx, None, None, _as_param(dw, weight), _as_param(db, ctx.bias_dtype), None

    @staticmethod
    def _jvp(ctx, t_input, _t_mean, _t_var, t_weight, t_bias, _t_eps):
        input, weight, running_mean, running_var = ctx.saved_tensors
        invstd = torch.rsqrt(running_var + ctx.eps)
        return _batch_norm_tangent(input, weight, running_mean, invstd, t_input, t_weight, t_bias, training=False)


def _batch_norm_tangent(input, weight, mean, invstd, t_input, t_weight, t_bias, training):
    """Forward-mode derivative of batch norm's output (docs/batch_norm.md), with plain tensor operations
    (so that it is batched and differentiable in its turn). mean and invstd: the batch's in training, the
    running statistics' in eval."""
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    xhat = (input - mean.view(shape)) * invstd.view(shape)
    terms = []
    if t_input is not None:
        gi = invstd.view(shape) if weight is None else (weight * invstd).view(shape)
        if training:  # the statistics move with x
            t = t_input - t_input.mean(dims, keepdim=True) - xhat * (t_input * xhat).mean(dims, keepdim=True)
        else:
            t = t_input
        terms.append(gi * t)
    if t_weight is not None:
        terms.append(t_weight.view(shape) * xhat)
    if t_bias is not None:
        terms.append(t_bias.view(shape))
    tangent = _sum_terms(terms)
    return None if tangent is None else tangent.to(input.dtype)


def _batch_norm_backward_formula(grad_output, input, weight, eps, training, mean, invstd):
    """(dx, dgamma, dbeta) of batch norm as a composition of differentiable tensor operations
    (docs/batch_norm.md), for the second derivative only: the values themselves come from our kernel.

    Training: mean and invstd are recomputed from x, so autograd sees how they depend on it; eval: they
    are the running statistics' constants.
    """
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training:
        mean = input.mean(dims, keepdim=True)
        invstd = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean, invstd = mean.view(shape), invstd.view(shape)
    xhat = (input - mean) * invstd
    gi = invstd if weight is None else weight.view(shape) * invstd
    if training:
        dx = gi * (grad_output - grad_output.mean(dims, keepdim=True)
                   - xhat * (grad_output * xhat).mean(dims, keepdim=True))
    else:
        dx = gi * grad_output
    return dx, (grad_output * xhat).sum(dims), grad_output.sum(dims)


class _BatchNormBackward(torch.autograd.Function):
    """(dx, dgamma, dbeta) = batch_norm_backward(dy, x, gamma, mean, invstd) by our kernel, differentiable
    so that double backward is exact: its backward differentiates _batch_norm_backward_formula (the
    same function written with tensor operations) by autograd. Second derivatives are for gradient
    penalties (WGAN-GP, R1); the first-order values, what training uses, stay our kernel's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, weight, mean, invstd, eps, training, mask):
        return ops.batch_norm_backward(grad_output, input, weight, mean, invstd, training, list(mask.value))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, mean, invstd, eps, training, mask = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_output, input, weight, mean, invstd)
        ctx.eps, ctx.training, ctx.mask = eps, training, mask.value

    @staticmethod
    def backward(ctx, g_dx, g_dw, g_db):
        create_graph = torch.is_grad_enabled()  # a third derivative asked for
        grad_output, input, weight, mean, invstd = ctx.saved_tensors
        # The outputs that carry an incoming gradient, and the inputs that want one.
        outs = [i for i, (g, m) in enumerate(zip((g_dx, g_dw, g_db), ctx.mask)) if m and g is not None]
        ins = [i for i, t in enumerate((grad_output, input, weight)) if t is not None and ctx.needs_input_grad[i]]
        result = [None] * 8
        if not outs or not ins:
            return tuple(result)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(i in ins) if t is not None else None
                      for i, t in enumerate((grad_output, input, weight))]
            formula = _batch_norm_backward_formula(*leaves, ctx.eps, ctx.training, mean, invstd)
            grads = torch.autograd.grad([formula[i] for i in outs], [leaves[i] for i in ins],
                                        [(g_dx, g_dw, g_db)[i] for i in outs], allow_unused=True,
                                        create_graph=create_graph)
        for i, g in zip(ins, grads):
            result[i] = g
        return tuple(result)


# ------------------------------------------------------------------------------------- the ops' own autograd
# Each op is differentiable by itself, called as torch.ops.torch_cs231n.<op>. The layers' ops: their
# Function's setup_context and backward are registered as the op's autograd (ReLU's ops, the convolution's
# and max-pool's forwards and batch norm's forwards have C++ ones); the backward ops take their non-tensor
# arguments loose where their Functions take them as _Static values, hence adapters. The functional API
# applies the Functions, which also carry torch.func's jvp and batching (under transforms only, for ReLU,
# the convolution, max-pool and batch norm).
def _register(op, setup_context, backward):
    torch.library.register_autograd("torch_cs231n::" + op, backward, setup_context=setup_context)


# The forwards' derivatives (conv2d_forward's, max_pool2d_forward's, batch norm's forwards', ReLU's) are in
# C++ (csrc/autograd/).


def _max_pool2d_backward_setup(ctx, inputs, output):
    grad_output, input, indices, *geometry = inputs
    _MaxPool2dBackward.setup_context(ctx, (grad_output, input, indices, _Static(geometry)), output)


def _max_pool2d_backward_backward(ctx, grad_grad_input):
    return (*_MaxPool2dBackward.backward(ctx, grad_grad_input)[:3], None, None, None, None, None)


def _conv2d_backward_setup(ctx, inputs, output):
    grad_output, input, weight, stride, padding, dilation, groups, output_mask = inputs
    _Conv2dBackward.setup_context(ctx, (grad_output, input, weight, _Static((stride, padding, dilation, groups)),
                                        _Static(output_mask)), output)


def _conv2d_backward_backward(ctx, *grads):
    return (*_Conv2dBackward.backward(ctx, *grads)[:3], None, None, None, None, None)


_register("conv2d_backward", _conv2d_backward_setup, _conv2d_backward_backward)
_register("max_pool2d_backward", _max_pool2d_backward_setup, _max_pool2d_backward_backward)


# The other ops' derivatives by the same device as _BatchNormBackward's: the op computes the values, and
# its backward differentiates a formula for it written with tensor operations (autograd does the rest).
# Each formula takes the op's arguments and returns its outputs.
def _register_by_formula(op, formula):
    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, *grads):
        create_graph = torch.is_grad_enabled()
        wanted = [i for i, t in enumerate(ctx.inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
        result = [None] * len(ctx.inputs)
        with torch.enable_grad():
            args = [t.detach().requires_grad_(i in wanted) if isinstance(t, torch.Tensor) else t
                    for i, t in enumerate(ctx.inputs)]
            outs = formula(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
            if pairs and wanted:
                found = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                                            allow_unused=True, create_graph=create_graph)
                for i, g in zip(wanted, found):
                    result[i] = g
        return tuple(result)

    _register(op, setup_context, backward)


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _batch_norm_backward_op_formula(grad_output, input, weight, mean, invstd, training, output_mask):
    """batch_norm_backward with mean and invstd as the inputs they are to the op (docs/batch_norm.md)."""
    dims, xmu = _dims(input), input - _per_channel(mean, input)
    gi = _per_channel(invstd if weight is None else weight * invstd, input)
    m = grad_output.numel() // grad_output.shape[1] if grad_output.numel() else 1
    sum_dy, sum_dy_xmu = grad_output.sum(dims), (grad_output * xmu).sum(dims)
    if training:
        proj = _per_channel(sum_dy_xmu / m * invstd * invstd, input)
        dx = gi * (grad_output - _per_channel(sum_dy / m, input) - xmu * proj)
    else:
        dx = gi * grad_output
    return (dx if output_mask[0] else None, sum_dy_xmu * invstd if output_mask[1] else None,
            sum_dy if output_mask[2] else None)


def _batch_norm_stats_formula(input):
    return input.mean(_dims(input)), input.var(_dims(input), unbiased=False)


def _batch_norm_merge_stats_formula(counts, means, vars, eps):
    """Chan's merge as one formula: mean = Σ n m / N, var = Σ n (v + (m - mean)^2) / N."""
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    var = (counts[:, None] * (vars + (means - mean) ** 2)).sum(0) / total
    return mean, var, torch.rsqrt(var + eps)


def _batch_norm_backward_reduce_formula(grad_output, input, mean):
    dims = _dims(input)
    return grad_output.sum(dims), (grad_output * (input - _per_channel(mean, input))).sum(dims)


def _batch_norm_backward_elemt_formula(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    gi = _per_channel(invstd if weight is None else weight * invstd, input)
    proj = _per_channel(sum_dy_xmu / count * invstd * invstd, input)
    return gi * (grad_output - _per_channel(sum_dy / count, input) - (input - _per_channel(mean, input)) * proj)


for _op, _formula in (("batch_norm_backward", _batch_norm_backward_op_formula),
                      ("batch_norm_stats", _batch_norm_stats_formula),
                      ("batch_norm_merge_stats", _batch_norm_merge_stats_formula),
                      ("batch_norm_backward_reduce", _batch_norm_backward_reduce_formula),
                      ("batch_norm_backward_elemt", _batch_norm_backward_elemt_formula),
                      ("gemm", torch.matmul)):
    _register_by_formula(_op, _formula)


def _as_param(grad, like):
    """The kernels give dgamma/dbeta in the statistics dtype (float for a half input); the parameter's own
    dtype is what autograd expects (`like`: the parameter, or its dtype)."""
    dtype = like.dtype if isinstance(like, torch.Tensor) else like
    return grad if grad is None or dtype is None or grad.dtype == dtype else grad.to(dtype)


def _values_per_channel(size) -> int:
    n = size[0]
    for s in size[2:]:
        n *= s
    return n


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Like ``torch.nn.functional.batch_norm``: per-channel normalisation over dim 0 and dims 2.. .

    Training normalises with the batch's biased variance and, when running statistics are given, updates
    them in place (running_mean <- (1 - momentum) running_mean + momentum mean; running_var likewise with
    the unbiased variance var * M / (M - 1), M = values per channel). Eval normalises with the running
    statistics. Input of 2 or more dims, (N, C, ...), as F.batch_norm; the output has the input's
    suggested memory format (channels_last stays channels_last).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    # F.batch_norm's own checks, with its messages and exception types.
    if training:
        size = input.size()
        if input.dim() >= 2 and _values_per_channel(size) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if not training:
        if running_mean is None or running_var is None:
            raise RuntimeError("running_mean must be defined in evaluation mode" if running_mean is None
                               else "running_var must be defined in evaluation mode")
        if _transforms_active():  # the Python Function, which carries the jvp and the batching
            return _fn(_BatchNormEval).apply(input, running_mean, running_var, weight, bias, eps)
        # The op, whose autograd is in C++ (csrc/autograd/batch_norm_autograd.cpp): the Function's Python
        # bookkeeping cost more than the kernel of a small layer (MobileNetV2 at batch 1, 52 of them:
        # inference 1.27 -> 0.91-0.95 of torch's time, a backward 0.35 ms a layer).
        return ops.batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps)

    running = [t for t in (running_mean, running_var) if t is not None]
    is_batched = torch._C._functorch.is_batchedtensor
    if running and is_batched(input) and not all(is_batched(t) for t in running):
        # Each sample's statistics would update the one buffer: torch's batch norm refuses it too.
        raise RuntimeError("batch_norm: got a batched input (torch.func.vmap) in training while running_mean or "
                           "running_var, which are updated in place, are not batched; use eval mode, or "
                           "track_running_stats=False, or batch the running statistics as well")
    if _transforms_active():  # the Python Function, which carries the jvp and the batching
        output, mean, _invstd, var = _fn(_BatchNormTrain).apply(input, weight, bias, eps)
    else:  # the op, whose autograd is in C++: at small batches the layer is host-bound
        output, mean, _invstd, var = ops.batch_norm_forward_train(input, weight, bias, eps)
    _update_running_stats(running_mean, running_var, mean, var, _values_per_channel(input.size()), momentum)
    return output


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """running <- (1 - momentum) running + momentum batch, with the batch's variance unbiased by its count
    of values per channel (common/batch_norm.h). An empty batch leaves them alone, as torch does.

    One op call (batch_norm_update_stats_) in eager mode, except where running statistics are batched by a
    torch.func transform or require grad; there, and under torch.compile (which may trace momentum=None's
    1 / num_batches_tracked as a symbol, and fuses the ops anyway), torch's in-place ops under no_grad."""
    if count == 0:
        return
    eager = not torch.compiler.is_compiling() and not _transforms_active()
    if eager and not any(t is not None and t.requires_grad for t in (running_mean, running_var)):
        ops.batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, count)
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:  # momentum * unbiased = (momentum * count / (count - 1)) * var
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * count / (count - 1))
