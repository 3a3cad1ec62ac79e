"""Build of fastkd: the Python package ``fastkd`` and its Triton kernels, installed as ``fastkd.kernels``."""

from setuptools import setup

# `fastkd demo`: scikit-learn ships its default data set (digits); matplotlib draws reliability diagrams.
DEMO = ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"]
# Triton's interpreter (TRITON_INTERPRET=1), which runs the kernels on CPU in the tests, breaks on numpy 2.4.
# torchmetrics is the tests' independent oracle for the calibration error; the tests also run the demo.
TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy<2.3", "torchmetrics>=1.0", *DEMO]

setup(
    name="fastkd",
    version="0.1.0",
    description="Fused GPU kernels for knowledge distillation and model calibration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastkd", "fastkd.demo", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "triton>=3.2; sys_platform == 'linux'",
    ],
    extras_require={
        "test": TEST,
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4.60"],
        "demo": DEMO,
    },
    entry_points={"console_scripts": ["fastkd = fastkd.__main__:main"]},
)
