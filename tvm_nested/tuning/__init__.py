"""Auto-tuning nested models with MetaSchedule into reusable tuning logs (``tvm_nested.tune``)."""

from .measure import RPCSettings, register_tensor_intrinsics
from .tuner import KernelTuning, TuningReport, tune

__all__ = ["KernelTuning", "RPCSettings", "TuningReport", "register_tensor_intrinsics", "tune"]
