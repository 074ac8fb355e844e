"""How to compile csrc/: one place for setup.py (ahead of time) and _extension.py (JIT).

This module must import nothing from torch at module level, because
``torch.utils.cpp_extension`` reads ``CUDA_HOME`` once, when it is first imported:
``configure_cuda_env()`` has to run before that.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Architectures compiled when no GPU is visible to ask. 8.0 = A100, 9.0 = H100/H200; the PTX of 9.0
# lets newer cards JIT-compile the kernels.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit's own folder, or None.

    ``nvcc`` on PATH may be a wrapper script that lives outside the toolkit, so the folder above it is
    not trusted unless it holds the toolkit's headers; the script's text is read for the real path.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(candidate):
            return os.path.realpath(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(root):
        return root
    try:
        with open(real, errors="ignore") as f:
            text = f.read(4096)
    except OSError:
        return None
    for path in re.findall(r"(/[^\s\"']+)/bin/nvcc", text):
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def want_cuda(torch_version_cuda: str | None) -> bool:
    """Build the CUDA kernels? FORCE_CUDA=1/0 decides; otherwise a toolkit and a CUDA build of torch.

    Never ``torch.cuda.is_available()``: a build machine without a GPU still builds for users with one.
    """
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force.strip() != "":
        return force.strip() not in ("0", "false", "False", "no")
    return torch_version_cuda is not None and find_cuda_home() is not None


def configure_cuda_env() -> str | None:
    """Point CUDA_HOME at the toolkit and give a default arch list; call before importing cpp_extension."""
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return home


def sources(with_cuda: bool) -> list[str]:
    files = [os.path.join(CSRC, "ops.cpp")]
    files += sorted(glob.glob(os.path.join(CSRC, "autograd", "*.cpp")))  # derivatives, any backend
    files += sorted(glob.glob(os.path.join(CSRC, "autocast", "*.cpp")))  # autocast policies, any backend
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]


def include_dirs(with_cuda: bool) -> list[str]:
    """csrc/ itself, and with CUDA the cuBLAS/cuSPARSE headers that pip's nvidia wheels carry."""
    dirs = [CSRC]
    if with_cuda:
        for site in _site_dirs():
            dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include")))
    return dirs


def library_dirs(with_cuda: bool) -> list[str]:
    """Toolkits that keep libcudart in lib/ rather than lib64/ (torch only adds lib64)."""
    if not with_cuda:
        return []
    home = find_cuda_home()
    return [os.path.join(home, "lib")] if home and os.path.isdir(os.path.join(home, "lib")) else []


def find_cublas() -> tuple[str, str] | None:
    """(folder, file name) of the cuBLAS the CUDA convolution links, or None.

    The toolkit's own first, else the one pip's nvidia wheels install beside torch (a toolkit of nvcc
    alone has none). Either way the library's soname (libcublas.so.13) is the one torch has already
    loaded when ours is, so the process holds one cuBLAS.
    """
    home = find_cuda_home()
    folders = [os.path.join(home, sub) for sub in ("lib64", "lib")] if home else []
    for site in _site_dirs():
        folders += sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "lib")))
        folders.append(os.path.join(site, "nvidia", "cublas", "lib"))
    for folder in folders:
        for name in ["libcublas.so"] + sorted(glob.glob(os.path.join(folder, "libcublas.so.[0-9]*"))):
            if os.path.isfile(os.path.join(folder, name)):
                return folder, os.path.basename(name)
    return None


def debug() -> bool:
    return os.environ.get("DEBUG", "0") not in ("", "0")


def cxx_flags(with_cuda: bool) -> list[str]:
    opt = ["-O0", "-g"] if debug() else ["-O3"]
    # at::parallel_for is OpenMP underneath: without -fopenmp it quietly runs on one thread.
    flags = opt + ["-fopenmp"]  # the C++ standard is torch's choice (C++20 for torch 2.10+)
    if with_cuda:
        flags.append("-DWITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    opt = ["-O0", "-g", "-G"] if debug() else ["-O3"]
    return opt + ["-DWITH_CUDA", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]


# libstdc++ must be the shared one that torch itself uses. Some g++ drivers link it statically: their
# specs or -static-libstdc++ ask for it, or their own lib folder holds only libstdc++.a, which `-lstdc++`
# then finds before any libstdc++.so (ld takes the first folder that has either). The process then holds
# two copies, and a C++ stream of one copy formatting a number with the other's locale crashed every error
# message on a GPU machine (c10::str -> std::ostream::_M_insert). So the link names the very file that
# torch loaded (runtime_libstdcxx), which defines every libstdc++ symbol before the driver's own libraries
# come; where that cannot be read, -lstdc++ in -Bdynamic mode. tests/test_build.py proves both cases and _C.
SHARED_LIBSTDCXX = ["-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state"]


def runtime_libstdcxx() -> str | None:
    """The path of the libstdc++ shared library this process has loaded (torch's, once torch is imported)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def libstdcxx_flags() -> list[str]:
    path = runtime_libstdcxx()
    return [path] if path is not None else SHARED_LIBSTDCXX


def ld_flags(with_cuda: bool = False) -> list[str]:
    flags = ["-fopenmp"] + libstdcxx_flags()
    if with_cuda:  # cuda/blas.cuh calls cuBLAS itself, to choose TF32 or full float32 per call
        found = find_cublas()
        if found is None:
            raise RuntimeError("torch_cs231n: the CUDA build links cuBLAS, but there is no libcublas.so in the CUDA "
                               "toolkit nor in pip's nvidia packages; install cuBLAS (pip install nvidia-cublas), "
                               "or build without CUDA (FORCE_CUDA=0)")
        flags += [f"-L{found[0]}", f"-l:{found[1]}", f"-Wl,-rpath,{found[0]}"]
    return flags
