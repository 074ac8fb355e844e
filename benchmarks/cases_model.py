"""Real models: a torchvision ResNet-18 and MobileNetV2 (random weights, nothing downloaded), one training
step (forward, cross-entropy loss, backward to every parameter) at batch 16 x 3x128x128, converted with
torch_cs231n.convert() against the same model with torch's layers. Target (the CPU-convolution issue):
<= 1.15 for both. Forward alone is the model under no_grad, in training mode (batch statistics)."""
import copy

import torch
import torch.nn.functional as F

import torch_cs231n

from .suite import Case

BATCH, SIZE, CLASSES = 16, 128, 1000


def _models(name):
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)
    ours = torch_cs231n.convert(copy.deepcopy(reference))
    return ours.train(), reference.train()


def cases():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return  # the Makefile installs it; without it there are no model cases
    for name in ("resnet18", "mobilenet_v2"):
        models = {}

        def make_inputs(device, dtype, name=name, models=models):
            ours, reference = _models(name)
            models["ours"], models["torch"] = ours.to(device, dtype), reference.to(device, dtype)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device, dtype)
            labels = torch.randint(CLASSES, (BATCH,), generator=g).to(device)
            return x, labels

        yield Case(
            op="model",
            name=name,
            describe=f"{name} train step {BATCH}x3x{SIZE}x{SIZE}",
            make_inputs=make_inputs,
            ours=lambda x, labels, models=models: F.cross_entropy(models["ours"](x), labels),
            reference=lambda x, labels, models=models: F.cross_entropy(models["torch"](x), labels),
            target=1.15,
            quick=False,
            grad_targets=lambda who, models=models: list(models[who].parameters()),
        )
