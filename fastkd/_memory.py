"""Large CPU outputs on transparent huge pages.

The first write to a freshly allocated CPU tensor faults its pages in, one 4 KiB page at a time: for the
N x V gradient of a KD loss that is one fault per 1024 float32 entries, and on a virtual machine (this
project's: 1.2 GB/s for a first write of 128 MiB) it can cost as much as the loss itself. ``empty``
allocates as ``torch.empty`` does and, for a CPU tensor of at least ``MIN_BYTES`` on Linux, advises the
2 MiB-aligned part of it onto transparent huge pages (``madvise(MADV_HUGEPAGE)``, what PyTorch's own
allocator does for every allocation when ``THP_MEM_ALLOC_ENABLE=1``): one fault per 2 MiB. Where THP is
off ("never" in /sys/kernel/mm/transparent_hugepage/enabled) or madvise is unavailable, nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MIN_BYTES = 8 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, on huge pages where it is a large CPU tensor."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _MADVISE is not None and out.device.type == "cpu" and out.nbytes >= MIN_BYTES:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + out.nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, MADV_HUGEPAGE)
    return out
