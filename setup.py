"""owl-sparse: prune LLMs with OWL and serve them with sparse kernels.

The CPU kernels ``owl_sparse._cpu`` (csrc/cpu) are built on every machine with a C++
compiler and torch importable at build time (``pip install --no-build-isolation``); the
CUDA extension ``owl_sparse._C`` only where a CUDA build of torch and ``nvcc`` exist.  Where
a build is skipped the kernels are JIT-built with ninja on first use.  Switches
(environment variables):

- ``OWL_SPARSE_SKIP_CPU_BUILD=1``: do not build the CPU kernels here (JIT on first use).
- ``OWL_SPARSE_SKIP_CUDA_BUILD=1``: never build the CUDA extension (pure-Python install;
  the ops fall back to Triton / the CPU reference, or JIT-build on first use).
- ``OWL_SPARSE_CUDA_ARCHS="80;90"``: compute capabilities to build for (default 80 and 90).
- ``OWL_SPARSE_NVCC_THREADS=4``: parallel nvcc threads per compile.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_archs():
    """Compute capabilities from OWL_SPARSE_CUDA_ARCHS ("80;90", "8.0 9.0" or "80,90")."""
    spec = os.environ.get("OWL_SPARSE_CUDA_ARCHS", "80;90")
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if not item:
            continue
        if not item.isdigit() or int(item) < 80:
            raise ValueError(
                f"OWL_SPARSE_CUDA_ARCHS: {item!r} is not a compute capability >= 80 (sm_80)"
            )
        archs.append(item)
    return archs


def _cuda_extensions():
    """Return (extensions, cmdclass); empty when the CUDA extension cannot be built here.

    Built only with a CUDA build of torch and nvcc on PATH (or CUDA_HOME).  Each arch gets
    SASS (sm_XX); the newest also gets PTX (compute_XX) so newer GPUs can JIT it.  Hopper
    (90) gets sm_90a SASS instead of sm_90, and OWL_SPARSE_SM90A is defined: the 2:4 wgmma
    kernel (csrc/sparse24_wgmma.cuh) exists only there; the PTX stays plain compute_XX.
    """
    if os.environ.get("OWL_SPARSE_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    if shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return [], {}
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp"))
    )
    if not sources:
        return [], {}
    archs = _cuda_archs()
    gencode = []
    for arch in archs:
        if arch == "90":
            gencode += ["-gencode", "arch=compute_90a,code=sm_90a", "-DOWL_SPARSE_SM90A"]
        else:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if archs:
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    threads = os.environ.get("OWL_SPARSE_NVCC_THREADS", "4")
    # No -std flag: torch's BuildExtension adds the standard its headers need.
    ext = CUDAExtension(
        name="owl_sparse._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--threads", threads, "-lineinfo"] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension}


def _cpu_extensions():
    """(extensions, cmdclass) for the CPU kernels; empty without torch or a C++ compiler.

    One binary for every x86-64 CPU: the AVX2 / AVX-512 files carry their instruction set in
    a `#pragma GCC target`, and the code picks one at run time (no -march flag here).
    """
    if os.environ.get("OWL_SPARSE_SKIP_CPU_BUILD", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    ext = CppExtension(
        name="owl_sparse._cpu",
        sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


_cpu_ext, _cpu_cmd = _cpu_extensions()
_cuda_ext, _cuda_cmd = _cuda_extensions()
ext_modules, cmdclass = _cpu_ext + _cuda_ext, {**_cpu_cmd, **_cuda_cmd}

setup(
    name="owl-sparse",
    version="0.1.0",
    description="Prune LLMs with OWL and serve them faster than dense with sparse kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["owl_sparse", "owl_sparse.*"]) + ["owl_sparse.kernels"],
    package_dir={"owl_sparse.kernels": "kernels"},
    package_data={"owl_sparse": ["ops/tables/*.json", "ops/tables/*.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        # 5.25 treats any importable top-level "kernels" as the Hugging Face kernels
        # package; run from a checkout, our kernels/ folder is importable as such and
        # every model load fails (ImportError: CUDAProperties) — keep below it until
        # transformers checks the distribution again.
        "transformers>=4.45,<5.25",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "gguf>=0.10",
        "accelerate>=0.26",  # transformers needs it to read GGUF files
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "ruff>=0.5",
            "import-linter>=2.1",
        ],
        "bench": ["matplotlib>=3.5"],
        "build": ["pybind11>=2.10", "ninja>=1.10"],
    },
    entry_points={"console_scripts": ["owl-sparse=owl_sparse.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
