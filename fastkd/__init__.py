"""fastkd: fused kernels for knowledge distillation and model calibration.

Every op checks its arguments once, resolves a backend from the registry (``fastkd._backend``: the
Triton kernels in ``fastkd.kernels`` for CUDA tensors, plain PyTorch elsewhere; ``backend=`` names
one) and runs that backend's implementation of the op's contract (``fastkd.backends``). The float64
reference in ``fastkd.reference`` is the oracle of the tests.
"""

from fastkd.calibration import CalibrationMeter, CalibrationStats, calibration_stats, expected_calibration_error
from fastkd.distributed import vocab_parallel_kd_loss
from fastkd.fidelity import FidelityResult, fidelity
from fastkd.fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from fastkd.kd_loss import KDLoss, kd_loss
from fastkd.reliability import reliability_diagram
from fastkd.softmax import TemperedSoftmax, tempered_log_softmax, tempered_softmax
from fastkd.temperature import FittedTemperature, TemperatureScaler, fit_temperature

__version__ = "0.1.0"

__all__ = [
    "CalibrationMeter",
    "CalibrationStats",
    "FidelityResult",
    "FittedTemperature",
    "FusedLinearKDLoss",
    "KDLoss",
    "TemperatureScaler",
    "TemperedSoftmax",
    "calibration_stats",
    "expected_calibration_error",
    "fidelity",
    "fit_temperature",
    "fused_linear_kd_loss",
    "kd_loss",
    "reliability_diagram",
    "tempered_log_softmax",
    "tempered_softmax",
    "vocab_parallel_kd_loss",
]
