"""Swap torch.nn layers for ours in an existing model, and back.

The swap changes each layer's class in place (ours subclass torch's and differ only in ``forward``), so the
layer keeps its parameters and buffers (the same objects: an optimizer built earlier still holds them),
hooks, training mode, device and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import modules


def _pairs():
    """(torch's class, ours) for every layer torch_cs231n computes; the ones not merged yet are absent."""
    pairs = []
    for name in ("Conv2d", "MaxPool2d", "BatchNorm2d", "SyncBatchNorm", "ReLU"):
        ours = getattr(modules, name, None)
        if ours is not None:
            pairs.append((getattr(nn, name), ours))
    return pairs


# Layers that look like ours but that we cannot compute: left alone, and reported.
_NEAR_MISSES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.MaxPool1d, nn.MaxPool3d, nn.BatchNorm1d,
                nn.BatchNorm3d, nn.ReLU6, nn.LazyConv2d, nn.LazyBatchNorm2d)


@dataclass
class Report:
    """What convert/revert did: (qualified name, class before, class after) for each swapped layer, and
    (qualified name, class, reason) for each layer of a kind we do not compute."""

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s)"]
        lines += [f"  {name or '(model)'}: {a} -> {b}" for name, a, b in self.swapped]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) alone")
            lines += [f"  {name}: {cls} ({why})" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _swap(model: nn.Module, mapping: dict, report: Report) -> None:
    for name, module in model.named_modules():
        source = type(module)
        target = mapping.get(source)  # exact type: a user's own subclass keeps its own forward
        if target is not None:
            module.__class__ = target
            report.swapped.append((name, _qualname(source), _qualname(target)))
        elif isinstance(module, nn.modules.lazy.LazyModuleMixin):
            # its shapes are not known yet; once a forward has made it a Conv2d or BatchNorm2d, it converts
            report.skipped.append((name, type(module).__qualname__,
                                   "not yet initialized: run one forward pass, then convert"))
        elif isinstance(module, _NEAR_MISSES):
            report.skipped.append((name, type(module).__qualname__, "torch_cs231n has no kernel for this layer"))


def convert(model: nn.Module, *, return_report: bool = False):
    """Replace every ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and ``nn.ReLU`` in
    ``model``, nested ones and ``model`` itself included, with torch_cs231n's, in place. Returns ``model`` (and a
    :class:`Report` of what was swapped and what was left alone, if ``return_report``).
    """
    report = Report()
    _swap(model, {torch_cls: ours for torch_cls, ours in _pairs()}, report)
    return (model, report) if return_report else model


def revert(model: nn.Module, *, return_report: bool = False):
    """The inverse of :func:`convert`: our layers become torch's own again, in place."""
    report = Report()
    _swap(model, {ours: torch_cls for torch_cls, ours in _pairs()}, report)
    return (model, report) if return_report else model
