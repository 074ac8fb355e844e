"""Builds torch_cs231n._C: a CUDAExtension when a CUDA toolkit and a CUDA build of torch are present,
a CppExtension otherwise. FORCE_CUDA=1/0 overrides, DEBUG=1 builds with -O0 -g.

    pip install --no-build-isolation -e .      # or: python setup.py build_ext --inplace
"""
import importlib.util
import os

from setuptools import setup

# Load the build rules by path: importing the package itself would import torch_cs231n._C.
_spec = importlib.util.spec_from_file_location(
    "_build_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_cs231n", "_build_config.py")
)
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)

cfg.configure_cuda_env()  # before torch.utils.cpp_extension reads CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cfg.want_cuda(torch.version.cuda)
Extension = CUDAExtension if with_cuda else CppExtension
extra = {"cxx": cfg.cxx_flags(with_cuda)}
if with_cuda:
    extra["nvcc"] = cfg.nvcc_flags()
print(f"torch_cs231n: building the {'CUDA' if with_cuda else 'CPU-only'} extension", flush=True)

root = os.path.dirname(os.path.abspath(__file__))
ext = Extension(
    name="torch_cs231n._C",
    sources=[os.path.relpath(s, root) for s in cfg.sources(with_cuda)],
    include_dirs=cfg.include_dirs(with_cuda),
    library_dirs=cfg.library_dirs(with_cuda),
    extra_compile_args=extra,
    extra_link_args=cfg.ld_flags(with_cuda),
    py_limited_api=False,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
