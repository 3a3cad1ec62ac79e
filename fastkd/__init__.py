"""fastkd: fused GPU kernels for knowledge distillation and model calibration.

Every op has a pure-PyTorch reference (``fastkd.reference``, the CPU path) and Triton kernels
(``fastkd.kernels``); ``backend=`` picks one (see ``fastkd._backend``).
"""

from fastkd.calibration import CalibrationMeter, CalibrationStats, calibration_stats, expected_calibration_error
from fastkd.fidelity import Fidelity, fidelity
from fastkd.fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from fastkd.kd_loss import KDLoss, kd_loss
from fastkd.reliability import reliability_diagram
from fastkd.softmax import TemperedSoftmax, tempered_log_softmax, tempered_softmax
from fastkd.temperature import FittedTemperature, TemperatureScaler, fit_temperature

__version__ = "0.1.0"

__all__ = [
    "CalibrationMeter",
    "CalibrationStats",
    "Fidelity",
    "FusedLinearKDLoss",
    "FittedTemperature",
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
]
