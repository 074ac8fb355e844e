"""convert/revert: torch.nn layers swapped for ours in place, and back, with the same numbers."""
import copy

import pytest
import torch
from torch import nn

import torch_cs231n

from models import TinyResNet


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [x] + list(model.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize("training", [True, False])
def test_convert_keeps_the_numbers(device, training):
    torch.manual_seed(0)
    reference = TinyResNet().to(device).train(training)
    model = copy.deepcopy(reference)
    params_before = [p for p in model.parameters()]
    converted, report = torch_cs231n.convert(model, return_report=True)
    assert converted is model
    assert [p for p in model.parameters()] == params_before, "parameters must be the same objects"
    assert model.training == training and all(m.training == training for m in model.modules())
    kinds = {type(m) for m in model.modules()}
    assert {torch_cs231n.Conv2d, torch_cs231n.BatchNorm2d, torch_cs231n.ReLU, torch_cs231n.MaxPool2d} <= kinds
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d}
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)) for m in reference.modules())
    assert len(report.swapped) == n_layers and not report.skipped

    x = torch.randn(2, 3, 32, 32, device=device)
    out_ref, grads_ref = outputs_and_grads(reference, x)
    out, grads = outputs_and_grads(model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4)
    if training:  # running statistics were updated alike
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_revert_restores_torch_layers(device):
    model = TinyResNet().to(device)
    state = copy.deepcopy(model.state_dict())
    torch_cs231n.convert(model)
    reverted, report = torch_cs231n.revert(model, return_report=True)
    assert reverted is model and len(report.swapped) > 0
    assert not any(type(m).__module__.startswith("torch_cs231n") for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_layers_we_cannot_take_are_left_alone_and_reported():
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.BatchNorm1d(2), nn.ReLU(),
                          nn.Sequential(nn.Conv3d(1, 1, 3), nn.Conv2d(1, 1, 3)))
    _, report = torch_cs231n.convert(model, return_report=True)
    assert type(model[0]) is nn.Conv1d and type(model[1]) is nn.BatchNorm1d and type(model[3][0]) is nn.Conv3d
    assert type(model[2]) is torch_cs231n.ReLU and type(model[3][1]) is torch_cs231n.Conv2d
    assert {name for name, _, _ in report.swapped} == {"2", "3.1"}
    assert {name for name, _, _ in report.skipped} == {"0", "1", "3.0"}
    assert "3.0: Conv3d" in str(report)


def test_lazy_layers_are_reported_until_initialized():
    """A lazy layer has no shapes before its first forward: convert says so, and converts it after one."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    _, report = torch_cs231n.convert(model, return_report=True)
    assert "0: LazyConv2d (not yet initialized: run one forward pass, then convert)" in str(report)
    assert {name for name, _, _ in report.skipped} == {"0", "1"}
    model(torch.randn(2, 3, 6, 6))
    torch_cs231n.convert(model)
    assert [type(m) for m in model] == [torch_cs231n.Conv2d, torch_cs231n.BatchNorm2d, torch_cs231n.ReLU]


def test_user_subclasses_keep_their_forward():
    class Scaled(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled())
    torch_cs231n.convert(model)
    assert type(model[0]) is Scaled


def test_convert_a_single_layer_and_state_dict_loads_into_torch():
    layer = torch_cs231n.convert(nn.BatchNorm2d(4))
    assert type(layer) is torch_cs231n.BatchNorm2d
    layer(torch.randn(3, 4, 5, 5))
    torch_layer = nn.BatchNorm2d(4)
    torch_layer.load_state_dict(layer.state_dict())
    assert int(torch_layer.num_batches_tracked) == 1
