"""The build: CUDA kernels exist for every op when built with CUDA, and the JIT path builds and works."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import torch_cs231n
from torch_cs231n import _build_config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Ops with no tensor arguments: one kernel for every device, none per backend.
TENSORLESS_OPS = {"torch_cs231n::build_info", "torch_cs231n::cpu_isa", "torch_cs231n::set_cpu_isa"}
# The CPU convolution's GEMM, exposed for its tests; CUDA uses cuBLAS.
CPU_ONLY_OPS = {"torch_cs231n::gemm"}


def kernel_ops():
    """Every op of the library that has tensors, so a kernel per device."""
    names = [o for o in torch._C._dispatch_get_all_op_names() if o.startswith("torch_cs231n::")]
    return sorted(o for o in names if o not in TENSORLESS_OPS)


def test_ops_are_registered():
    assert "torch_cs231n::relu_forward" in kernel_ops()


@pytest.mark.parametrize("op", kernel_ops())
def test_every_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"


@pytest.mark.parametrize("op", ["relu_forward", "relu_backward", "relu_forward_with_mask", "relu_backward_with_mask"])
def test_relu_derivatives_are_registered_in_cpp(op):
    """ReLU's autograd is in csrc/autograd/relu_autograd.cpp, under the Autograd key (every backend)."""
    op = f"torch_cs231n::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"), f"{op} has no Autograd kernel"
    assert "csrc/autograd/relu_autograd.cpp" in torch._C._dispatch_dump_table(op)


def test_built_with_cuda_when_the_toolkit_allows():
    """Where a toolkit and a CUDA torch are present (CI's machine), the build must have taken CUDA.

    Without this, a CUDA source that stops compiling could silently give a CPU-only build.
    """
    expected = cfg.want_cuda(torch.version.cuda)
    assert torch_cs231n.build_info()["cuda"] == expected, (
        f"built with cuda={torch_cs231n.build_info()['cuda']}, but this machine's toolkit "
        f"({cfg.find_cuda_home()}) and torch ({torch.version.cuda}) ask for cuda={expected} "
        "(FORCE_CUDA=0/1 overrides both)"
    )


@pytest.mark.parametrize("op", [o for o in kernel_ops() if o not in CPU_ONLY_OPS])
def test_every_op_has_a_cuda_kernel_when_built_with_cuda(op):
    if not torch_cs231n.build_info()["cuda"]:
        pytest.skip("this build has no CUDA kernels (no toolkit, a CPU torch, or FORCE_CUDA=0)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def test_build_info_reports_openmp():
    # Without -fopenmp, at::parallel_for runs everything on one thread.
    assert torch_cs231n.build_info()["openmp"] is True


def test_find_cuda_home_reads_through_a_wrapper_script(tmp_path, monkeypatch):
    """`nvcc` on PATH may be a script outside the toolkit that execs the real one."""
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    script = wrappers / "nvcc"
    script.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    script.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    monkeypatch.setattr(cfg, "_is_toolkit", lambda p, real=cfg._is_toolkit: p != "/usr/local/cuda" and real(p))
    assert cfg.find_cuda_home() == os.path.realpath(toolkit)


def test_object_file_names_are_unique():
    """torch.utils.cpp_extension.load names each object after its source's base name (x.cpp -> x.o,
    x.cu -> x.cuda.o), so two sources called relu.cpp in different folders break the JIT build."""
    stems_and_exts = [os.path.splitext(os.path.basename(f)) for f in cfg.sources(with_cuda=True)]
    objects = [stem + (".cuda.o" if ext == ".cu" else ".o") for stem, ext in stems_and_exts]
    assert len(objects) == len(set(objects)), sorted(objects)


# ------------------------------------------------------------------------------------------ libstdc++
def _needed_and_stream_symbols(library):
    """(the DT_NEEDED entries, how many std::ostream insert functions it defines itself) of a library."""
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line]
    symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout
    return needed, sum("_M_insert" in line for line in symbols.splitlines())


needs_binutils = pytest.mark.skipif(not (shutil.which("readelf") and shutil.which("nm") and shutil.which("g++")),
                                    reason="needs readelf, nm and g++")


@needs_binutils
def test_link_flags_keep_libstdcxx_shared_even_when_the_driver_links_it_statically(tmp_path):
    """A driver that links libstdc++ statically (here forced with -static-libstdc++, as LDFLAGS or a
    distribution's specs would) gives a library with its own copy of the C++ streams; with our link
    flags it must still use the shared libstdc++ and define no stream functions of its own."""
    source = tmp_path / "streams.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'std::string describe(long x) { std::ostringstream s; s << "got " << x; return s.str(); }\n')
    static = tmp_path / "static.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(static), "-static-libstdc++"], check=True)
    needed, own = _needed_and_stream_symbols(static)
    assert not any(n.startswith("libstdc++") for n in needed) and own > 0, (
        "the control case should have linked libstdc++ statically", needed, own)
    ours = tmp_path / "ours.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(ours), "-static-libstdc++", *cfg.ld_flags()],
                   check=True)
    needed, own = _needed_and_stream_symbols(ours)
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    assert own == 0, f"{own} std::ostream functions are defined inside the library"


@needs_binutils
def test_link_flags_keep_libstdcxx_shared_when_a_folder_holds_only_the_archive(tmp_path):
    """The GPU machine's case: a compiler whose own lib folder has libstdc++.a and no libstdc++.so, searched
    before the system's. `-lstdc++` alone takes that archive; our flags name torch's own shared file."""
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive) or not os.path.isfile(archive):
        pytest.skip("this g++ has no libstdc++.a to stand in for such a compiler's")
    only_archive = tmp_path / "lib"
    only_archive.mkdir()
    (only_archive / "libstdc++.a").symlink_to(archive)
    source = tmp_path / "streams.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'std::string describe(long x) { std::ostringstream s; s << "got " << x; return s.str(); }\n')
    control = tmp_path / "control.so"
    subprocess.run(["g++", "-shared", "-fPIC", f"-L{only_archive}", str(source), "-o", str(control),
                    *cfg.SHARED_LIBSTDCXX], check=True)
    needed, own = _needed_and_stream_symbols(control)
    assert own > 0, ("the control case (-lstdc++ alone) should have taken the archive", needed, own)
    ours = tmp_path / "ours.so"
    subprocess.run(["g++", "-shared", "-fPIC", f"-L{only_archive}", str(source), "-o", str(ours), *cfg.ld_flags()],
                   check=True)
    needed, own = _needed_and_stream_symbols(ours)
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    assert own == 0, f"{own} std::ostream functions are defined inside the library"


@needs_binutils
def test_built_extension_uses_the_shared_libstdcxx():
    library = _loaded_library()
    needed, own = _needed_and_stream_symbols(library)
    assert any(n.startswith("libstdc++.so") for n in needed), (library, needed)
    assert own == 0, f"{library} defines {own} std::ostream functions: a second libstdc++ is linked in"


def _loaded_library():
    """The file of the torch_cs231n library this process loaded (_C or the JIT's .so)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "torch_cs231n" in line and line.rstrip().endswith(".so")}
    assert len(paths) == 1, paths
    return paths.pop()


def test_force_cuda_overrides(monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert cfg.want_cuda("13.0") is False
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert cfg.want_cuda(None) is True
    monkeypatch.delenv("FORCE_CUDA")
    assert cfg.want_cuda(None) is False  # a CPU build of torch never gets CUDA kernels


# ------------------------------------------------------------------------------------------------ JIT
@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """A source checkout without a compiled _C: the package and csrc/ only."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    shutil.copytree(os.path.join(ROOT, "torch_cs231n"), root / "torch_cs231n",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    return root


PROBE = (
    "import torch, torch_cs231n; "
    "x = torch.tensor([-1.0, 2.0], requires_grad=True); y = torch_cs231n.functional.relu(x); y.sum().backward(); "
    "assert y.tolist() == [0.0, 2.0] and x.grad.tolist() == [0.0, 1.0]; "
    "print('backend', torch_cs231n.build_info()['backend'], torch_cs231n.__file__)"
)


def run_probe(checkout, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TORCH_CS231N_JIT"}
    full_env.update(PYTHONPATH=str(checkout), **env)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=checkout, env=full_env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.slow
def test_jit_build_in_a_checkout_without_c(source_copy, tmp_path_factory):
    # CPU-only JIT keeps CI short; the CUDA sources are proven by the ahead-of-time build above.
    ext_dir = tmp_path_factory.mktemp("torch_extensions")
    env = {"FORCE_CUDA": "0", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    first = run_probe(source_copy, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "JIT-building" in first.stderr, "the JIT build must say so, once"
    assert f"backend jit {source_copy}" in first.stdout

    # A compiled _C beside the package is preferred, unless TORCH_CS231N_JIT=1 forces the JIT (cached now).
    built = [f for f in os.listdir(os.path.join(ROOT, "torch_cs231n")) if f.startswith("_C") and f.endswith(".so")]
    if not built or torch_cs231n.build_info()["backend"] != "aot":
        pytest.skip("no ahead-of-time build of _C to compare with")
    shutil.copy(os.path.join(ROOT, "torch_cs231n", built[0]), source_copy / "torch_cs231n")
    aot = run_probe(source_copy, **env)
    assert aot.returncode == 0, aot.stderr[-3000:]
    assert "backend aot" in aot.stdout and "JIT-building" not in aot.stderr
    forced = run_probe(source_copy, TORCH_CS231N_JIT="1", **env)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "backend jit" in forced.stdout


# ------------------------------------------------------------------------------------------ gpu-check
def test_gpu_check_says_so_without_a_gpu(tmp_path):
    """`make gpu-check` belongs on a GPU machine: elsewhere it stops at once, with a reason and exit 2,
    before building anything."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs for real here")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device is visible" in proc.stderr
    assert not (tmp_path / "out").exists()
