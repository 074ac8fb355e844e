"""Batching rules (torch.library.register_vmap) for the ops, so that torch.func.vmap, and the transforms
built on it (jacrev, per-sample gradients), run our kernels on the whole batch at once, with no loop
over the vmapped dimension. The autograd Functions of functional.py set generate_vmap_rule, so that their
forward and backward are batched through these rules.

Each rule folds the vmapped dimension B into a dimension the kernel already loops over:
    ReLU         elementwise: the vmapped dimension stays where it is
    max-pool     into the batch: (B, N, C, H, W) -> (B*N, C, H, W)
    convolution  into the batch when only the input is batched; otherwise into the channels, as B groups
                 of the convolution: x (N, B*C, H, W), w (B*F, C/g, kH, kW), groups B*g, so that per-sample
                 weights (and per-sample d_W) are B independent convolutions in one call
    batch norm   into the channels: (B, N, C, ...) -> (N, B*C, ...), each sample its own statistics
"""
import torch

_lib = "torch_cs231n::"
ops = torch.ops.torch_cs231n


def _front(t, dim, size):
    """t with its vmapped dimension first; an unbatched t expanded to `size` there (a view, no copy)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _into_channels(t):
    """(B, N, C, ...) -> (N, B*C, ...)."""
    return t.movedim(0, 1).flatten(1, 2)


def _from_channels(t, size):
    """(N, B*C, ...) -> (B, N, C, ...)."""
    return t.unflatten(1, (size, -1)).movedim(1, 0)


# --------------------------------------------------------------------------------------------------- ReLU
@torch.library.register_vmap(_lib + "relu_forward")
def _relu_forward(info, in_dims, input):
    return ops.relu_forward(input), in_dims[0]


@torch.library.register_vmap(_lib + "relu_backward")
def _relu_backward(info, in_dims, grad_output, output):
    b = info.batch_size
    return ops.relu_backward(_front(grad_output, in_dims[0], b), _front(output, in_dims[1], b)), 0


# ---------------------------------------------------------------------------------------------- max-pool
@torch.library.register_vmap(_lib + "max_pool2d_forward")
def _max_pool2d_forward(info, in_dims, input, kernel_size, stride, padding, dilation, ceil_mode):
    x = _front(input, in_dims[0], info.batch_size)
    output, indices = ops.max_pool2d_forward(x.flatten(0, 1), kernel_size, stride, padding, dilation, ceil_mode)
    return (output.unflatten(0, x.shape[:2]), indices.unflatten(0, x.shape[:2])), (0, 0)


@torch.library.register_vmap(_lib + "max_pool2d_backward")
def _max_pool2d_backward(info, in_dims, grad_output, input, indices, kernel_size, stride, padding, dilation,
                         ceil_mode):
    b = info.batch_size
    dy, x, ind = (_front(t, d, b) for t, d in zip((grad_output, input, indices), in_dims[:3]))
    dx = ops.max_pool2d_backward(dy.flatten(0, 1), x.flatten(0, 1), ind.flatten(0, 1), kernel_size, stride, padding,
                                 dilation, ceil_mode)
    return dx.unflatten(0, x.shape[:2]), 0


# ------------------------------------------------------------------------------------------- convolution
def _grouped_weight(weight, w_dim, size):
    """Weights (B, F, C/g, kH, kW) (expanded if unbatched) as the (B*F, C/g, kH, kW) of B groups."""
    return _front(weight, w_dim, size).flatten(0, 1)


@torch.library.register_vmap(_lib + "conv2d_forward")
def _conv2d_forward(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    b = info.batch_size
    x_dim, w_dim, b_dim = in_dims[:3]
    if w_dim is None and b_dim is None:  # one convolution of the B*N samples
        x = _front(input, x_dim, b)
        y = ops.conv2d_forward(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups)
        return y.unflatten(0, x.shape[:2]), 0
    x = _into_channels(_front(input, x_dim, b))
    w = _grouped_weight(weight, w_dim, b)
    bias = _front(bias, b_dim, b).flatten(0, 1) if bias is not None else None
    y = ops.conv2d_forward(x, w, bias, stride, padding, dilation, groups * b)
    return _from_channels(y, b), 0


@torch.library.register_vmap(_lib + "conv2d_backward")
def _conv2d_backward(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    b = info.batch_size
    dy_dim, x_dim, w_dim = in_dims[:3]
    if w_dim is None and not output_mask[1] and not output_mask[2]:  # d_x alone: one backward of B*N samples
        dy, x = _front(grad_output, dy_dim, b), _front(input, x_dim, b)
        dx, dw, db = ops.conv2d_backward(dy.flatten(0, 1), x.flatten(0, 1), weight, stride, padding, dilation, groups,
                                         output_mask)
        return (dx.unflatten(0, x.shape[:2]) if dx is not None else None, dw, db), (0, None, None)
    # B groups: each sample's d_W and d_b come out separately.
    dy = _into_channels(_front(grad_output, dy_dim, b))
    x = _into_channels(_front(input, x_dim, b))
    w = _grouped_weight(weight, w_dim, b)
    dx, dw, db = ops.conv2d_backward(dy, x, w, stride, padding, dilation, groups * b, output_mask)
    dx = _from_channels(dx, b) if dx is not None else None
    dw = dw.unflatten(0, (b, -1)) if dw is not None else None
    db = db.unflatten(0, (b, -1)) if db is not None else None
    return (dx, dw, db), tuple(0 if g is not None else None for g in (dx, dw, db))


# -------------------------------------------------------------------------------------------- batch norm
def _channel_values(t, dim, size):
    """A per-channel tensor of each sample, (B, C) flattened to the B*C channels (expanded if unbatched)."""
    return _front(t, dim, size).flatten(0, 1) if t is not None else None


@torch.library.register_vmap(_lib + "batch_norm_forward_train")
def _batch_norm_forward_train(info, in_dims, input, weight, bias, eps):
    b = info.batch_size
    x = _into_channels(_front(input, in_dims[0], b))
    y, mean, invstd, var = ops.batch_norm_forward_train(x, _channel_values(weight, in_dims[1], b),
                                                        _channel_values(bias, in_dims[2], b), eps)
    stats = tuple(s.unflatten(0, (b, -1)) for s in (mean, invstd, var))
    return (_from_channels(y, b), *stats), (0, 0, 0, 0)


@torch.library.register_vmap(_lib + "batch_norm_forward_eval")
def _batch_norm_forward_eval(info, in_dims, input, running_mean, running_var, weight, bias, eps):
    b = info.batch_size
    x = _into_channels(_front(input, in_dims[0], b))
    per_channel = [_channel_values(t, d, b) for t, d in zip((running_mean, running_var, weight, bias), in_dims[1:5])]
    return _from_channels(ops.batch_norm_forward_eval(x, *per_channel, eps), b), 0


@torch.library.register_vmap(_lib + "batch_norm_backward")
def _batch_norm_backward(info, in_dims, grad_output, input, weight, mean, invstd, training, output_mask):
    b = info.batch_size
    dy = _into_channels(_front(grad_output, in_dims[0], b))
    x = _into_channels(_front(input, in_dims[1], b))
    per_channel = [_channel_values(t, d, b) for t, d in zip((weight, mean, invstd), in_dims[2:5])]
    dx, dw, db = ops.batch_norm_backward(dy, x, *per_channel, training, output_mask)
    dx = _from_channels(dx, b) if dx is not None else None
    dw = dw.unflatten(0, (b, -1)) if dw is not None else None
    db = db.unflatten(0, (b, -1)) if db is not None else None
    return (dx, dw, db), tuple(0 if g is not None else None for g in (dx, dw, db))
