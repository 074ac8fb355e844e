"""Real models: a torchvision ResNet-18 and MobileNetV2 (random weights, nothing downloaded), one training
step (forward, cross-entropy loss, backward to every parameter) at batch 16 x 3x128x128, converted with
torch_cs231n.convert() against the same model with torch's layers. Target (the CPU-convolution issue):
<= 1.15 for both. Forward alone is the model under no_grad, in training mode (batch statistics).
ResNet-18 (NCHW) and MobileNetV2 (channels_last) are timed under torch.autocast(bfloat16) too, float32
parameters and input; those, and ResNet-18, ResNet-50 and MobileNetV2 at batch 1 in eval mode at 224x224
(inference: their fwd column; a small batch leaves the last layers few output pixels, where the
convolution takes its dot products, cpu/conv2d_dots.h, and one sample to share among the threads), are
informative (no target), not part of --quick.
ResNeXt-50 (grouped 3 x 3 layers) likewise, in NCHW and in channels_last."""
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


def _loss_case(name, describe, make_inputs, models, target=None):
    """A model case timing cross_entropy(model(x), labels), ours against torch's, models["ours"] and
    models["torch"] being set by make_inputs; backward to every parameter."""
    return Case(
        op="model",
        name=name,
        describe=describe,
        make_inputs=make_inputs,
        ours=lambda x, labels: F.cross_entropy(models["ours"](x), labels),
        reference=lambda x, labels: F.cross_entropy(models["torch"](x), labels),
        target=target,
        quick=False,
        grad_targets=lambda who: list(models[who].parameters()),
    )


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

        yield _loss_case(name, f"{name} train step {BATCH}x3x{SIZE}x{SIZE}", make_inputs, models, target=1.15)

    # ResNeXt-50 (32 groups of 4 to 32 channels in its 3 x 3 layers: conv2d_grouped.h and the pixel rows),
    # in NCHW as torchvision builds it and in channels_last: informative (no target).
    for layout in (torch.contiguous_format, torch.channels_last):
        models = {}

        def make_resnext_inputs(device, dtype, models=models, layout=layout):
            ours, reference = _models("resnext50_32x4d")
            for who, model in (("ours", ours), ("torch", reference)):
                models[who] = model.to(device, dtype).to(memory_format=layout)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device, dtype).contiguous(memory_format=layout)
            labels = torch.randint(CLASSES, (BATCH,), generator=g).to(device)
            return x, labels

        suffix = "_cl" if layout == torch.channels_last else ""
        describe = f"resnext50_32x4d train step {BATCH}x3x{SIZE}x{SIZE}" + (" channels_last" if suffix else "")
        yield _loss_case("resnext50" + suffix, describe, make_resnext_inputs, models)

    # Mixed precision, as a user trains on a CPU with AVX512-BF16: autocast runs the convolutions in
    # bfloat16 (torch's policy for conv2d); batch norm, ReLU and max-pool take what they are given.
    # ResNet-18 in NCHW, and MobileNetV2 in channels_last (its depthwise layers read bfloat16 as it lies).
    for name, layout, case in (
        ("resnet18", torch.contiguous_format, "resnet18_autocast"),
        ("mobilenet_v2", torch.channels_last, "mobilenet_v2_autocast_cl"),
    ):
        models = {}

        def make_autocast_inputs(device, dtype, name=name, layout=layout, models=models):
            ours, reference = _models(name)
            models["ours"], models["torch"] = (m.to(device).to(memory_format=layout) for m in (ours, reference))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device).contiguous(memory_format=layout)
            labels = torch.randint(CLASSES, (BATCH,), generator=g).to(device)
            return x, labels

        def autocast_step(who, x, labels, models=models):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return F.cross_entropy(models[who](x), labels)

        describe = f"{name} train step {BATCH}x3x{SIZE}x{SIZE} autocast bfloat16"
        yield Case(
            op="model",
            name=case,
            describe=describe + (" channels_last" if layout == torch.channels_last else ""),
            make_inputs=make_autocast_inputs,
            ours=lambda x, labels, step=autocast_step: step("ours", x, labels),
            reference=lambda x, labels, step=autocast_step: step("torch", x, labels),
            target=None,
            quick=False,
            grad_targets=lambda who, models=models: list(models[who].parameters()),
        )

    # Inference of one image, as a CPU serves a model: eval mode (running statistics), batch 1, 224x224.
    # ResNet-18, and ResNet-50 and MobileNetV2 (1x1 layers in NCHW, 52 batch norms: where the Python
    # around each layer and a single sample's parallelism show).
    for name in ("resnet18", "resnet50", "mobilenet_v2"):
        models = {}

        def make_inference_inputs(device, dtype, name=name, models=models):
            ours, reference = _models(name)
            models["ours"], models["torch"] = ours.eval().to(device), reference.eval().to(device)
            x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
            labels = torch.zeros(1, dtype=torch.long, device=device)
            return x, labels

        yield _loss_case(f"{name}_b1", f"{name} eval 1x3x224x224 (inference: fwd)", make_inference_inputs, models)
