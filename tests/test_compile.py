"""A conv-net made of all our modules under torch.compile(fullgraph=True) matches eager mode."""
import torch

import torch_cs231n

from models import small_convnet


def test_compiled_convnet_matches_eager(device):
    torch.manual_seed(0)
    model = small_convnet(torch_cs231n).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16, device=device)
    for training in (True, False):
        model.train(training)
        eager_state = {k: v.clone() for k, v in model.state_dict().items()}
        out_eager = model(x)
        grads_eager = torch.autograd.grad(out_eager.square().sum(), list(model.parameters()))
        stats_after_eager = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(eager_state)  # run the compiled model from the same running statistics
        out_compiled = compiled(x)
        grads_compiled = torch.autograd.grad(out_compiled.square().sum(), list(model.parameters()))
        torch.testing.assert_close(out_compiled, out_eager)
        for a, b in zip(grads_compiled, grads_eager):
            torch.testing.assert_close(a, b)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, stats_after_eager[k], msg=k)
