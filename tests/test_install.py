"""The installed layout (DESIGN.md §1): kernels/ and models/ only as mtlfast.kernels / mtlfast.models, the
compiled extension present after the README install, and a pure-Python build when torch is absent."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    # -I: no cwd, PYTHONPATH or user site on sys.path, only what is installed.
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True)


def test_subpackages_import_under_mtlfast(tmp_path):
    result = _python("import mtlfast.kernels, mtlfast.models, mtlfast.bench.harness; "
                     "print(mtlfast.kernels.__file__); print(mtlfast.models.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    kernels_file, models_file = result.stdout.split()
    assert os.path.samefile(kernels_file, os.path.join(ROOT, "kernels", "__init__.py")) or "site-packages" in kernels_file
    assert models_file.endswith(os.path.join("models", "__init__.py"))


@pytest.mark.parametrize("name", ["kernels", "models", "bench"])
def test_no_top_level_package_installed(tmp_path, name):
    result = _python(f"import importlib.util; print(importlib.util.find_spec({name!r}))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None", f"a top-level {name!r} is importable: {result.stdout}"


def test_extension_built_and_loaded():
    from mtlfast import _ext

    status = _ext.status()
    assert status.loaded, f"the README install should build mtlfast._C here: {status.reason}"
    assert "openmp=yes" in status.build_info


def test_missing_extension_reason(monkeypatch):
    """A pure install's reason says so (Python's own ImportError for the missing submodule names a circular
    import, which sent readers of `mtlfast info` the wrong way)."""
    import importlib.util

    from mtlfast import _ext

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mtlfast._C" else real_find_spec(name, *a))
    status = _ext._load()
    assert not status.loaded and status.reason.startswith("not built: a pure-Python install")


def test_pure_python_wheel_without_torch(tmp_path):
    """With torch not importable at build time, setup.py still builds a (pure-Python) wheel."""
    # sys.modules["torch"] = None makes every `import torch` in setup.py raise ImportError.
    code = ("import sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', '-q', 'build', '--build-base', {str(tmp_path / 'build')!r}, "
            f"'bdist_wheel', '--bdist-dir', {str(tmp_path / 'bdist')!r}, '-d', {str(tmp_path / 'dist')!r}]; "
            "__file__ = 'setup.py'; exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch not importable at build time" in result.stderr
    (wheel,) = os.listdir(tmp_path / "dist")
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert "mtlfast/kernels/__init__.py" in names and "mtlfast/models/__init__.py" in names
    assert not any(n.startswith(("kernels/", "models/", "bench/")) for n in names)
    assert not any(n.endswith(".so") for n in names), "no extension can be built without torch"


def test_cuda_glue_type_checks_against_torch_headers(tmp_path):
    """The extension's CUDA glue (csrc/mtlfast_ops.cpp under MTLFAST_WITH_CUDA: the CUDA ops' argument checks and
    launcher calls) type-checks against torch's and the CUDA toolkit's headers. A CPU build of torch compiles none
    of it (CMake compiles the launchers, csrc/cuda, alone), so a call that no longer matches a launcher's
    signature (csrc/cuda/*.cuh) would first fail on a GPU machine. torch's CPU wheel lacks one generated header,
    c10/cuda/impl/cuda_cmake_macros.h: a stub with its one definition stands in, after torch's include paths (a
    CUDA build's own header wins)."""
    import shutil
    import sysconfig

    from torch.utils import cpp_extension

    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = shutil.which("nvcc")  # torch's CUDA_HOME is None in a CPU build
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda",
             nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    cuda_home = next((h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if not cxx or not cuda_home:
        pytest.skip(f"needs a C++ compiler and the CUDA toolkit's headers (compiler {cxx}, looked in {homes})")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"],
                str(tmp_path), "csrc"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DMTLFAST_WITH_CUDA", *(f"-I{p}" for p in includes),
           "csrc/mtlfast_ops.cpp"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


def test_setup_names_a_cuda_home_without_headers(tmp_path):
    """setup.py builds CUDA sources only with a CUDA_HOME that has the CUDA headers: torch takes the folder above
    nvcc's bin/, which for a wrapper script (/usr/local/bin/nvcc on the CPU machines) has none, and the compile
    would fail at the first CUDA header and leave a pure-Python install. The check names the folder and the fix
    (the install then builds the CPU extension, or stops under MTLFAST_BUILD_CUDA=1 MTLFAST_STRICT_BUILD=1)."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    (check,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_missing_cuda_headers"]
    namespace = {"os": os}
    exec(compile(ast.Module([check], type_ignores=[]), "setup.py", "exec"), namespace)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /usr/local/cuda/bin/nvcc \"$@\"\n")
    why = namespace["_missing_cuda_headers"](str(tmp_path))
    assert f"CUDA_HOME={tmp_path} has bin/nvcc but no include/cuda_runtime_api.h" in why and "/usr/local/cuda" in why
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    assert namespace["_missing_cuda_headers"](str(tmp_path)) == ""
