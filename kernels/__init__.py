"""fastkd's Triton kernels, installed as ``fastkd.kernels``.

Importing this package imports Triton. Whether the kernels run compiled (CUDA tensors) or in Triton's
interpreter (CPU tensors) is fixed when they are defined, by ``TRITON_INTERPRET=1`` being set before
this package is first imported; ``INTERPRET`` records which.
"""

import triton


@triton.jit
def _probe():
    pass


INTERPRET: bool = not isinstance(_probe, triton.runtime.JITFunction)
