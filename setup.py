"""Build of fastkd: the Python package ``fastkd`` and its Triton kernels, installed as ``fastkd.kernels``.

Supported versions: the oldest ones below are what CI installs (the Makefile's pins, checked by
tests/test_package.py); the newest tested ones are in the README's Install section.
"""

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
TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy<2.3", "torchmetrics>=1.0", TRITON, *DEMO,
        *INTEGRATIONS]  # fmt: skip

URL = "https://github.com/fastkd/fastkd"

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
    packages=["fastkd", "fastkd.backends", "fastkd.demo", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    install_requires=[TORCH],
    # No `bench` extra: the benchmark suite (benchmarks/) runs from a clone, where it writes its results.
    extras_require={"triton": [TRITON], "demo": DEMO, "test": TEST},
    entry_points={"console_scripts": ["fastkd = fastkd.__main__:main"]},
)
