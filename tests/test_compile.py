"""Conv-nets made of our modules (a small one, and a converted ResNet-18) under
torch.compile(fullgraph=True) match eager mode."""
import pytest
import torch

import torch_cs231n

from models import small_convnet


def assert_compiled_step_matches_eager(model, x):
    """One forward+backward of `model` compiled (fullgraph, aot_eager: graph capture and autograd with the
    kernels run as they are) against eager mode, from the same running statistics: equal outputs,
    parameter gradients and updated buffers."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_eager = model(x)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), list(model.parameters()))
    stats_eager = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    out_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(out_compiled.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_compiled, out_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stats_eager[k], msg=k)


def test_compiled_convnet_matches_eager(device):
    torch.manual_seed(0)
    model = small_convnet(torch_cs231n).to(device)
    x = torch.randn(4, 3, 16, 16, device=device)
    for training in (True, False):
        model.train(training)
        assert_compiled_step_matches_eager(model, x)


def test_compiled_resnet18_matches_eager():
    """A converted torchvision ResNet-18 (every conv, batch norm, ReLU and max-pool ours) compiles with
    fullgraph=True, forward and backward, and gives eager mode's numbers."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torch_cs231n.convert(torchvision.models.resnet18(num_classes=10))
    # 20 convolutions, 20 batch norms, 9 ReLU modules (each block reuses its own), 1 max-pool
    assert sum(type(m).__module__.startswith("torch_cs231n") for m in model.modules()) == 50
    assert_compiled_step_matches_eager(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("training", [False, True])
def test_export_and_trace_keep_our_ops(device, training):
    """torch.export and torch.jit.trace capture our ops as they are (not torch's), and the captured
    program gives eager mode's output (in training mode, from the same running statistics). The in-place
    ReLU is traced as the out-of-place op and a copy."""
    torch.manual_seed(1)
    model = small_convnet(torch_cs231n).to(device).train(training)
    x = torch.randn(4, 3, 16, 16, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(x)
    model.load_state_dict(state)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    for op in ("conv2d_forward", "relu_forward", "max_pool2d_forward"):
        assert any(f"torch_cs231n.{op}" in t for t in targets), (op, targets)
    assert not any(t.startswith("aten.convolution") or t.startswith("aten.max_pool2d") for t in targets), targets
    torch.testing.assert_close(program.module()(x), want)
    model.load_state_dict(state)
    traced = torch.jit.trace(model, (x,), check_trace=not training)  # a check reruns: the statistics move
    model.load_state_dict(state)
    torch.testing.assert_close(traced(x), want)
