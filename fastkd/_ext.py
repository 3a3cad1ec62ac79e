"""The C++ CPU kernels (csrc/): found, or built, once per process, for the ``"cpu"`` backend.

``load()`` returns True when the ops ``torch.ops.fastkd_cpu.*`` are registered, else False with the
reason in ``error()``; the outcome is cached, so ``backend="auto"`` asks as often as it likes. In order:

1. ``FASTKD_CPU_EXT=0`` in the environment: not loaded (the reason says so).
2. An ahead-of-time build, installed as ``fastkd._C_cpu_<isa>`` by ``FASTKD_BUILD_EXT=1 pip install
   --no-build-isolation .`` (setup.py), whose instruction set (avx512, avx2 or default, from the name)
   this CPU has (``torch.backends.cpu.get_cpu_capability()``): imported.
3. A JIT build cached under ``FASTKD_EXT_DIR`` (default ``~/.cache/fastkd/ext``), one folder per hash of
   the sources, flags, torch and Python versions: loaded if there, else compiled there first with
   ``torch.utils.cpp_extension.load`` (ninja, ``-O3 -march=native -fopenmp``), saying so on stderr in
   one line. Rows run in parallel under OpenMP (``at::parallel_for``): without ``-fopenmp`` it would
   run on one thread.

No compiler, no ninja, or a failed build: one warning naming the reason, and the ops run on the
PyTorch backend (``"auto"``) or raise (``backend="cpu"``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

NAME = "fastkd_cpu"
ISAS = ("default", "avx2", "avx512")  # in the order of torch.backends.cpu.get_cpu_capability()'s levels
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-parameter"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def sources_root() -> Path:
    """The csrc folder: beside the package in a clone (or an editable install), inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for root in (here.parent / "csrc", here / "csrc"):
        if (root / "cpu" / "bindings.cpp").is_file():
            return root
    raise FileNotFoundError(f"the C++ sources (csrc/cpu/*.cpp) are neither in {here.parent} nor in {here}")


def sources(root: Path | None = None) -> list[Path]:
    root = root or sources_root()
    return sorted((root / "cpu").glob("*.cpp"))


def headers(root: Path | None = None) -> list[Path]:
    root = root or sources_root()
    return sorted([*(root / "cpu").glob("*.h"), *(root / "include" / "fastkd").glob("*.h")])


def march() -> str:
    """The -march of a build: FASTKD_CPU_ARCH (e.g. x86-64-v3, x86-64), else native."""
    return os.environ.get("FASTKD_CPU_ARCH", "native")


def build_key(root: Path) -> str:
    """A hash of everything a JIT build depends on: sources, headers, flags, torch and Python."""
    digest = hashlib.sha256()
    for path in [*sources(root), *headers(root)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join([*CFLAGS, march(), *LDFLAGS]).encode())
    digest.update(f"{torch.__version__} {torch.compiled_with_cxx11_abi()} {sys.version_info[:2]}".encode())
    digest.update(sysconfig.get_platform().encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("FASTKD_EXT_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastkd" / "ext"


def _machine_isa() -> int:
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return ISAS.index(capability) if capability in ISAS else 0


def _load_aot() -> bool:
    """Import an ahead-of-time build this CPU can run, the widest first."""
    for isa in reversed(ISAS[: _machine_isa() + 1]):
        try:
            importlib.import_module(f"fastkd._C_cpu_{isa}")
        except ImportError:
            continue
        _state["how"] = f"ahead-of-time build fastkd._C_cpu_{isa}"
        return True
    return False


def _load_jit() -> None:
    root = sources_root()
    folder = cache_dir() / f"{NAME}-{build_key(root)}"
    library = folder / f"{NAME}.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
            _state["how"], _state["path"] = f"JIT build in {folder}", str(library)
            return
        except OSError:  # a library left by an interrupted build: built again below
            library.unlink()
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()  # "Ninja is required to load C++ extensions"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fastkd: compiling the C++ CPU kernels (once, cached in {folder}) ...", file=sys.stderr, flush=True)
    cpp_extension.load(
        NAME, [str(p) for p in sources(root)], extra_cflags=[*CFLAGS, f"-march={march()}"],
        extra_ldflags=LDFLAGS, extra_include_paths=[str(root / "include")], build_directory=str(folder),
        is_python_module=False, verbose=False,
    )  # fmt: skip
    _state["how"], _state["path"] = f"JIT build in {folder} (compiled now)", str(library)


def load_once(state: dict, lock: threading.Lock, attempt: Callable[[], None],
              on_error: Callable[[], None] | None = None) -> bool:  # fmt: skip
    """Whether ``attempt()`` returned (it raises on failure), running it once per ``state`` under
    ``lock``: the outcome is kept in state["ok"], a failure's type and message in state["error"] (then
    ``on_error()`` runs, once). The CUDA kernels' loader (``fastkd._cuda_ext``) shares it."""
    if "ok" in state:
        return bool(state["ok"])
    with lock:
        if "ok" in state:
            return bool(state["ok"])
        try:
            attempt()
            state["ok"] = True
        except Exception as error:  # noqa: BLE001  (any failure to build or load is a fallback, said once)
            reason = " ".join(str(error).split())
            state["ok"], state["error"] = False, f"{type(error).__name__}: {reason[-600:]}"
            if on_error is not None:
                on_error()
    return bool(state["ok"])


def _attempt() -> None:
    if os.environ.get("FASTKD_CPU_EXT", "1") == "0":
        raise RuntimeError("FASTKD_CPU_EXT=0 in the environment")
    if not _load_aot():
        _load_jit()


def _warn() -> None:
    if os.environ.get("FASTKD_CPU_EXT", "1") != "0":
        warnings.warn(f"fastkd: the C++ CPU kernels are not available ({_state['error']}); CPU tensors run "
                      "the PyTorch backend", RuntimeWarning, stacklevel=5)  # fmt: skip


def load() -> bool:
    """Whether the ops are registered (loading or building them on the first call; cached)."""
    return load_once(_state, _lock, _attempt, _warn)


def error() -> str:
    """Why ``load()`` is False ('' when it is True or has not run)."""
    return str(_state.get("error", ""))


def info() -> str:
    """How the ops were loaded and what they target (instruction set, threads)."""
    if not load():
        return f"not available: {error()}"
    return f"{_state['how']}; {torch.ops.fastkd_cpu.info()}"
