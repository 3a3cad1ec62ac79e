"""A throwaway backend, registered through the registry alone: every op of the contract passed on to
the PyTorch backend, each call counted. ``tests/test_registry.py`` loads this file as a pytest plugin
(``-p echo_backend``) and runs op tests on ``backend="echo"``: the proof that a new backend is one
registry entry plus its own module, and touches no other file.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter

from fastkd._backend import Backend, register_backend
from fastkd.backends import torch as torch_backend

CONTRACT = ("tempered_softmax_forward", "tempered_softmax_backward", "kd_loss_forward", "kd_loss_topk_forward",
            "scale_grad_", "calibration_pass", "fidelity_pass")  # fmt: skip
CALLS: Counter = Counter()


def _counted(name: str):
    def call(*args, **kwargs):
        CALLS[name] += 1
        return getattr(torch_backend, name)(*args, **kwargs)

    return call


module = types.ModuleType("echo_backend_impl")
module.NAME = "echo"
module.WORKSPACE_BYTES_PER_ENTRY = torch_backend.WORKSPACE_BYTES_PER_ENTRY
for _name in CONTRACT:
    setattr(module, _name, _counted(_name))
sys.modules[module.__name__] = module
register_backend(Backend("echo", module.__name__, check=lambda x: None, auto=lambda x: False))


def pytest_sessionfinish(session):
    path = os.environ.get("ECHO_CALLS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(CALLS), f)
