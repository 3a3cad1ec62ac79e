"""fastkd._memory: large CPU outputs advised onto transparent huge pages."""

import re
import sys
from pathlib import Path

import pytest
import torch

from fastkd import _memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("shape", [(3, 5), (1024, 4096)])
def test_empty_is_torch_empty(shape):
    out = _memory.empty(shape, torch.float32, torch.device("cpu"))
    assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous() and not out.requires_grad
    out.fill_(1.5)
    assert out.sum().item() == 1.5 * out.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="needs Linux with transparent huge pages not off")  # fmt: skip
def test_large_cpu_outputs_are_advised_onto_huge_pages():
    big = _memory.empty((2048, 4096), torch.float32, torch.device("cpu"))  # 32 MiB: its own mapping
    inside = -(-big.data_ptr() // _memory.HUGE_PAGE) * _memory.HUGE_PAGE  # an address in the advised part
    assert _vma_fields(inside).get("THPeligible") == "1"
    small = _memory.empty((16, 16), torch.float32, torch.device("cpu"))  # under MIN_BYTES: left as it is
    assert small.nbytes < _memory.MIN_BYTES
