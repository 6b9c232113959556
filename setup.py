"""Build of mtlfast: pure Python always, the compiled extension ``mtlfast._C`` when it can be built.

- torch not importable at build time -> pure-Python install (the ``cpp``/``cuda`` backends then explain
  that the extension is missing).
- torch importable -> C++ CPU extension (csrc/cpu + csrc/mtlfast_ops.cpp, OpenMP).
- CUDA build of torch and nvcc present, or ``MTLFAST_BUILD_CUDA=1`` -> CUDA sources (csrc/cuda) as well,
  for the archs in ``TORCH_CUDA_ARCH_LIST`` (default: the compute capabilities of the GPUs visible at build
  time, else "9.0", i.e. sm_90: H100/H200). ``MTLFAST_BUILD_CUDA=0`` disables. A GPU the build cannot run is
  refused by the ``cuda`` backend with the rebuild to do (``mtlfast.backends.cuda_arch_refusal``). A CUDA_HOME
  without the CUDA headers (an nvcc wrapper script) builds the CPU extension only, saying why.
- ``MTLFAST_NO_EXTENSION=1`` -> pure Python regardless.
- A compile failure does not fail the install unless ``MTLFAST_STRICT_BUILD=1`` (bench/gpu_check.sh sets it);
  it is printed, and ``mtlfast info`` reports the extension as missing.

MAX_JOBS defaults to what cores and memory allow (nvcc jobs take ~2 GiB each).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# `kernels` and `models` are taken names on PyPI: they are installed only as mtlfast.kernels / mtlfast.models.
PACKAGE_DIR = {"mtlfast": "mtlfast", "mtlfast.kernels": "kernels", "mtlfast.models": "models", "mtlfast.bench": "bench"}


def _subpackages():
    packages = []
    for package, directory in PACKAGE_DIR.items():
        for init in glob.glob(os.path.join(ROOT, directory, "**", "__init__.py"), recursive=True):
            rel = os.path.relpath(os.path.dirname(init), os.path.join(ROOT, directory))
            packages.append(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return sorted(set(packages))


def _csrc_digest() -> str:
    """mtlfast/_sources.py's digest of csrc/, loaded by path (the package is not importable before it is built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mtlfast_sources", os.path.join("mtlfast", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_digest("csrc")


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 4
    return max(1, min(cores, int(mem_gib // 2)))


def _default_cuda_archs(torch) -> str:
    """The visible GPUs' compute capabilities (as torch's default, without its +PTX for the newest and without
    its cap at the archs it knows: a GPU newer than nvcc fails the build), else 9.0: a build machine without a
    GPU (where torch would build for every arch it knows). The kernels then run on those GPUs only: another
    GPU is refused by the cuda backend with the rebuild to do."""
    if torch.cuda.is_available():
        found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(found))
    return "9.0"


def _missing_cuda_headers(cuda_home: str) -> str:
    """Why the folder torch takes as CUDA_HOME (the environment's, else the one above nvcc's bin/) lacks the CUDA
    headers, or "": an nvcc wrapper script in /usr/local/bin makes torch take /usr/local, where a compile would
    stop at the first CUDA header and (without MTLFAST_STRICT_BUILD) leave a pure-Python install."""
    if os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return ""
    return (f"CUDA_HOME={cuda_home} has bin/nvcc but no include/cuda_runtime_api.h (nvcc may be a wrapper script); "
            f"set CUDA_HOME to the CUDA toolkit's folder, e.g. /usr/local/cuda")


def _extension():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) for a pure-Python install."""
    if os.environ.get("MTLFAST_NO_EXTENSION") == "1":
        print("mtlfast: MTLFAST_NO_EXTENSION=1, pure-Python install", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:
        print(f"mtlfast: torch not importable at build time ({exc}); pure-Python install", file=sys.stderr)
        return [], {}

    force_cuda = os.environ.get("MTLFAST_BUILD_CUDA")
    home = cpp_extension.CUDA_HOME
    nvcc = bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))
    with_cuda = force_cuda == "1" or (force_cuda != "0" and torch.version.cuda is not None and nvcc)
    if with_cuda:
        why = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None
               else f"no nvcc under CUDA_HOME={home}" if not nvcc else _missing_cuda_headers(home))
        if why:
            if force_cuda == "1":
                why = f"MTLFAST_BUILD_CUDA=1, but {why}"
                if os.environ.get("MTLFAST_STRICT_BUILD") == "1":
                    raise SystemExit(f"mtlfast: {why}")
            print(f"mtlfast: {why}; building the CPU extension only", file=sys.stderr)
            with_cuda = False
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    sources = ["csrc/mtlfast_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch's cpp_extension adds the language standard its headers need (C++20 from torch 2.13;
    # torch 2.14's ATen refuses C++17).
    cxx = ["-O3", "-fopenmp"]
    define_macros = [("MTLFAST_SOURCES", f'"{_csrc_digest()}"')]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_cuda_archs(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("MTLFAST_WITH_CUDA", None), ("MTLFAST_CUDA_ARCHS", f'"{archs}"')]
        ext = cpp_extension.CUDAExtension(
            "mtlfast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("mtlfast._C", sources, define_macros=define_macros,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        """Never fails the install unless MTLFAST_STRICT_BUILD=1: a broken compiler leaves a pure install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile error, ...
                if os.environ.get("MTLFAST_STRICT_BUILD") == "1":
                    raise
                print(f"mtlfast: building the extension failed ({exc}); installing pure Python. "
                      "Set MTLFAST_STRICT_BUILD=1 to make this an error.", file=sys.stderr)

    print(f"mtlfast: building mtlfast._C ({'CPU + CUDA' if with_cuda else 'CPU'}), "
          f"MAX_JOBS={os.environ['MAX_JOBS']}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()
setup(packages=_subpackages(), package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass,
      package_data={"mtlfast": ["py.typed", "baselines/*.yaml"]})
