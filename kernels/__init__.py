"""fastkd's Triton kernels, installed as ``fastkd.kernels``.

Importing this package imports Triton. Whether the kernels run compiled (CUDA tensors) or in Triton's
interpreter (CPU tensors) is fixed when they are defined, by ``TRITON_INTERPRET=1`` being set before
this package is first imported; ``INTERPRET`` records which.
"""

from triton import knobs

INTERPRET: bool = bool(knobs.runtime.interpret)
