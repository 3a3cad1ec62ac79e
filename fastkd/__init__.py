"""fastkd: fused GPU kernels for knowledge distillation and model calibration.

Every op has a pure-PyTorch reference (``fastkd.reference``, the CPU path) and Triton kernels
(``fastkd.kernels``); ``backend=`` picks one (see ``fastkd._backend``).
"""

from fastkd.kd_loss import KDLoss, kd_loss
from fastkd.softmax import TemperedSoftmax, tempered_log_softmax, tempered_softmax

__version__ = "0.1.0"

__all__ = ["KDLoss", "TemperedSoftmax", "kd_loss", "tempered_log_softmax", "tempered_softmax"]
