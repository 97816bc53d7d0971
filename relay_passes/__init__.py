"""Graph-level (Relax) passes of tvm-nested, one per module; the pipeline that orders them is
``tvm_nested/pipeline.py``. Installed as ``tvm_nested.relay_passes``."""

from .deadline import AddDeadlineFunction
from .fold_batchnorm import FoldBatchNorm
from .full_nonfinite import BroadcastNonFiniteFull
from .fuse_epilogue import FuseEpilogue
from .level_guard import LevelGuard
from .lower_nested import LowerNestedLayers, NestedLoweringWarning, read_nested_info
from .metadata import AttachMetadata, collect_metadata
from .schedule import ApplyTuningLog, ReportUnscheduled, ScheduleKernels
from .specialize import SpecializeKernels
from .stage_timer import AddStageTimer
from .stages import SplitStages, merge_stages, read_stage_plan
from .sum_to_add import SumToAdd
from .take_index import NormalizeTakeIndices

__all__ = [
    "AddDeadlineFunction",
    "AddStageTimer",
    "ApplyTuningLog",
    "AttachMetadata",
    "BroadcastNonFiniteFull",
    "FoldBatchNorm",
    "FuseEpilogue",
    "LevelGuard",
    "LowerNestedLayers",
    "NestedLoweringWarning",
    "NormalizeTakeIndices",
    "ReportUnscheduled",
    "ScheduleKernels",
    "SpecializeKernels",
    "SplitStages",
    "SumToAdd",
    "collect_metadata",
    "merge_stages",
    "read_nested_info",
    "read_stage_plan",
]
