"""Build of fastkd: the Python package ``fastkd`` and its Triton kernels, installed as ``fastkd.kernels``.

Supported versions: the oldest ones below are what CI installs (the Makefile's pins, checked by
tests/test_package.py); the newest tested ones are in the README's Install section.
"""

import os
import subprocess

from setuptools import setup

# The oldest torch and Triton releases the package admits, each tested (CI: torch 2.13.0, triton 3.6.0).
TORCH = "torch>=2.13"
# Triton is optional: CUDA builds of torch depend on their own Triton, and the CPU path (the PyTorch
# reference) never imports it. The extra is for running the kernels in Triton's interpreter on a CPU.
TRITON = "triton>=3.6"
# `fastkd demo`: scikit-learn ships its default data set (digits); matplotlib draws reliability diagrams.
DEMO = ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"]
# Triton's interpreter (TRITON_INTERPRET=1), which runs the kernels on CPU in the tests, breaks on numpy 2.4.
# torchmetrics is the tests' independent oracle for the calibration error; the tests also run the demo.
# The trainer integrations (examples/, fastkd.fsdp) are tested against Hugging Face's and TRL's releases.
INTEGRATIONS = ["transformers>=5.24", "accelerate>=1.15", "trl>=1.16"]
# ninja builds the C++ CPU kernels on first use (fastkd/_ext.py): `make test` and CI build them from a clean clone.
TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy<2.3", "torchmetrics>=1.0", "ninja", TRITON, *DEMO,
        *INTEGRATIONS]  # fmt: skip

URL = "https://github.com/fastkd/fastkd"

# The C++ CPU kernels (csrc/) ship as sources, which fastkd/_ext.py compiles on first use (JIT, ninja,
# -march=native) and caches. FASTKD_BUILD_EXT=1 builds them here instead, ahead of time, as the module
# fastkd._C_cpu_<isa> (torch must be importable: pip install --no-build-isolation). FASTKD_CPU_ARCH
# picks the -march (default native: the machine that builds is the one that runs; x86-64-v3 or x86-64
# for a wheel that moves); <isa> (avx512, avx2, default) is what that -march enables, and the loader
# imports only a build whose instruction set the running CPU has.
# The CUDA kernels (csrc/cuda/, experimental) likewise: JIT on first use of backend="cuda" (fastkd/_cuda_ext.py),
# or FASTKD_BUILD_CUDA=1 here, as fastkd._C_cuda (nvcc; TORCH_CUDA_ARCH_LIST picks the architectures).
CSRC_DATA = ["README.md", "include/fastkd/*.h", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cuh", "cuda/*.cu",
             "cuda/*.cpp"]  # fmt: skip


def _isa(compiler: str, march: str) -> str:
    """The instruction set a -march gives ATen's vector code: avx512, avx2 or default (common.h's rule)."""
    macros = subprocess.run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__"} <= defined:
        return "avx512"
    return "avx2" if {"__AVX2__", "__FMA__"} <= defined else "default"


def _cuda_extension():
    from glob import glob

    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        "fastkd._C_cuda", ["csrc/cuda/bindings.cpp", *sorted(glob("csrc/cuda/*.cu"))],
        include_dirs=[os.path.abspath("csrc/include"), os.path.abspath("csrc/cuda")],
        define_macros=[("FASTKD_PYTHON_MODULE", "_C_cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )  # fmt: skip


def _extensions() -> dict:
    cuda = os.environ.get("FASTKD_BUILD_CUDA", "0") == "1"
    if os.environ.get("FASTKD_BUILD_EXT", "0") != "1":
        if not cuda:
            return {}
        from torch.utils.cpp_extension import BuildExtension

        build = BuildExtension.with_options(use_ninja=True)
        return {"ext_modules": [_cuda_extension()], "cmdclass": {"build_ext": build}}
    from glob import glob

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    march = os.environ.get("FASTKD_CPU_ARCH", "native")
    name = f"_C_cpu_{_isa(os.environ.get('CXX', 'c++'), march)}"
    extension = CppExtension(
        f"fastkd.{name}", sorted(glob("csrc/cpu/*.cpp")), include_dirs=[os.path.abspath("csrc/include")],
        define_macros=[("FASTKD_PYTHON_MODULE", name)],
        extra_compile_args=["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-Wno-unused-parameter"],
        extra_link_args=["-fopenmp"],
    )  # fmt: skip
    modules = [extension, _cuda_extension()] if cuda else [extension]
    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="fastkd",
    version="0.1.0",
    description="Fused GPU kernels for knowledge distillation and model calibration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    url=URL,
    project_urls={"Source": URL, "Issues": f"{URL}/issues"},
    python_requires=">=3.10",
    packages=["fastkd", "fastkd.backends", "fastkd.demo", "fastkd.kernels", "fastkd.csrc"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels", "fastkd.csrc": "csrc"},
    package_data={"fastkd.csrc": CSRC_DATA},
    install_requires=[TORCH],
    # No `bench` extra: the benchmark suite (benchmarks/) runs from a clone, where it writes its results.
    extras_require={"triton": [TRITON], "demo": DEMO, "test": TEST},
    entry_points={"console_scripts": ["fastkd = fastkd.__main__:main"]},
    **_extensions(),
)
