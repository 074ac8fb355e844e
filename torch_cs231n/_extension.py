"""Loads the compiled kernels, once per process.

Order: the ahead-of-time build ``torch_cs231n._C`` if present; otherwise, in a source checkout (``csrc/``
beside the package), a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, cached).
``TORCH_CS231N_JIT=1`` forces the JIT. Both register the same ``torch_cs231n`` op namespace, which can be
registered only once per process, so exactly one of them is ever loaded.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

import torch

from . import _build_config as cfg

log = logging.getLogger("torch_cs231n")

#: "aot" (torch_cs231n._C) or "jit" (built from csrc/ in this process).
BACKEND: str | None = None


def _jit_build() -> None:
    home = cfg.configure_cuda_env()  # before cpp_extension is imported: it reads CUDA_HOME once
    from torch.utils import cpp_extension

    if home is not None:
        cpp_extension.CUDA_HOME = home  # in case it was imported earlier (torch.utils.benchmark does)
    with_cuda = cfg.want_cuda(torch.version.cuda)
    name = "torch_cs231n_jit_" + ("cuda" if with_cuda else "cpu")
    log.warning("torch_cs231n: no compiled _C found; JIT-building %s from %s (cached after the first time)",
                name, cfg.CSRC)
    cpp_extension.load(
        name=name,
        sources=cfg.sources(with_cuda),
        extra_include_paths=cfg.include_dirs(with_cuda),
        extra_cflags=cfg.cxx_flags(with_cuda),
        extra_cuda_cflags=cfg.nvcc_flags() if with_cuda else None,
        extra_ldflags=cfg.ld_flags(with_cuda) + [f"-L{d}" for d in cfg.library_dirs(with_cuda)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("TORCH_CS231N_JIT_VERBOSE", "0") != "0",
    )


def _compiled_library() -> str | None:
    """The path of the compiled _C beside this file, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _import_compiled(path: str) -> None:
    """Import torch_cs231n._C from exactly this file (importing it registers the ops).

    By path, not by ``from . import _C``: an editable install's import hook would otherwise answer with
    the _C of the checkout it was installed from, whichever copy of the package is running.
    """
    name = f"{__package__}._C"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module


def load() -> str:
    """Make the ops available under ``torch.ops.torch_cs231n``; returns "aot" or "jit"."""
    global BACKEND
    if BACKEND is not None:
        return BACKEND
    if os.environ.get("TORCH_CS231N_JIT", "0") not in ("", "0"):
        _jit_build()
        BACKEND = "jit"
        return BACKEND
    compiled = _compiled_library()
    if compiled is not None:
        _import_compiled(compiled)
        BACKEND = "aot"
    else:
        if not os.path.isfile(os.path.join(cfg.CSRC, "ops.cpp")):
            raise ImportError(
                "torch_cs231n: the compiled extension torch_cs231n._C is missing and there is no csrc/ "
                "to JIT-build from; reinstall with `pip install --no-build-isolation .`"
            ) from None
        _jit_build()
        BACKEND = "jit"
    return BACKEND


def build_info() -> dict:
    """The facts the binary was built with, plus the runtime's: version, cuda, openmp, backend, torch."""
    info = {}
    for item in torch.ops.torch_cs231n.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = int(value) if value.isdigit() else value
    info["cuda"] = bool(info.get("cuda"))
    info["openmp"] = bool(info.get("openmp"))
    info["backend"] = BACKEND
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_archs"] = os.environ.get("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_ARCH_LIST) if info["cuda"] else None
    return info
