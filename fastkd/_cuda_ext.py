"""The CUDA kernels (csrc/cuda/): found, or built, once per process, for the ``"cuda"`` backend.

The sibling of ``fastkd._ext`` (the C++ CPU kernels), with the same cache. ``load()`` returns True when the
ops ``torch.ops.fastkd_cuda.*`` are registered, else False with the reason in ``error()``; the outcome is
cached. In order:

1. ``FASTKD_CUDA_EXT=0`` in the environment, or no CUDA (``torch.cuda.is_available()`` False: a CPU
   build of torch, or no GPU): not loaded, the reason says which.
2. An ahead-of-time build installed as ``fastkd._C_cuda`` (``FASTKD_BUILD_CUDA=1 pip install
   --no-build-isolation .``): imported.
3. A JIT build cached under ``FASTKD_EXT_DIR`` (default ``~/.cache/fastkd/ext``), one folder per hash of
   the sources, flags, the GPUs' compute capabilities, torch, its CUDA and Python: loaded if there, else
   compiled there first with ``torch.utils.cpp_extension.load`` (ninja, nvcc), saying so on stderr in one
   line. ``TORCH_CUDA_ARCH_LIST`` picks the architectures as for any torch extension (default: the
   visible GPUs').

The backend is opt-in (``backend="cuda"``): a failure here is raised by the backend's check, never a
fallback of ``"auto"``, which does not pick it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
from pathlib import Path

import torch

from fastkd import _ext

NAME = "fastkd_cuda"
CFLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def sources(root: Path | None = None) -> list[Path]:
    root = root or _ext.sources_root()
    return [root / "cuda" / "bindings.cpp", *sorted((root / "cuda").glob("*.cu"))]


def headers(root: Path | None = None) -> list[Path]:
    root = root or _ext.sources_root()
    folder = root / "cuda"
    return sorted([*folder.glob("*.h"), *folder.glob("*.cuh"), *(root / "include" / "fastkd").glob("*.h")])


def build_key(root: Path) -> str:
    """A hash of everything a JIT build depends on: sources, headers, flags, GPUs, torch, CUDA, Python."""
    digest = hashlib.sha256()
    for path in [*sources(root), *headers(root)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join([*CFLAGS, *NVCC_FLAGS, os.environ.get("TORCH_CUDA_ARCH_LIST", "")]).encode())
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        digest.update(repr(caps).encode())
    digest.update(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]}".encode())
    return digest.hexdigest()[:16]


def _load_jit() -> None:
    root = _ext.sources_root()
    folder = _ext.cache_dir() / f"{NAME}-{build_key(root)}"
    library = folder / f"{NAME}.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
            _state["how"] = f"JIT build in {folder}"
            return
        except OSError:  # a library left by an interrupted build: built again below
            library.unlink()
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fastkd: compiling the CUDA kernels (once, cached in {folder}) ...", file=sys.stderr, flush=True)
    cpp_extension.load(
        NAME, [str(p) for p in sources(root)], extra_cflags=CFLAGS, extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(root / "include"), str(root / "cuda")], build_directory=str(folder),
        is_python_module=False, verbose=False,
    )  # fmt: skip
    _state["how"] = f"JIT build in {folder} (compiled now)"


def unavailable_reason() -> str:
    """Why the CUDA kernels cannot run in this process at all ('' when CUDA is there)."""
    if os.environ.get("FASTKD_CUDA_EXT", "1") == "0":
        return "FASTKD_CUDA_EXT=0 in the environment"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return ""


def _attempt() -> None:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    try:
        importlib.import_module("fastkd._C_cuda")
        _state["how"] = "ahead-of-time build fastkd._C_cuda"
    except ImportError:
        _load_jit()


def load() -> bool:
    """Whether the ops are registered (loading or building them on the first call; cached); a failure is
    reported by the backend's check."""
    return _ext.load_once(_state, _lock, _attempt)


def error() -> str:
    """Why ``load()`` is False ('' when it is True or has not run)."""
    return str(_state.get("error", ""))


def info() -> str:
    return f"{_state['how']}" if load() else f"not available: {error()}"
