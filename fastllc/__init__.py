"""fastllc: fast batched estimation of the local learning coefficient (LLC) with SGLD."""

from .api import estimate, estimate_checkpoints, estimate_groups, estimate_run, estimate_run_groups
from .calibration import CalibrationCell, CalibrationResult, calibrate
from .errors import FastLLCError
from .llc import GroupResults, LLCResult, estimate_llc
from .model import ModularMLP
from .sampling import PreconditionedSGLD, RMSPropSGLD, SGLDConfig
from .tasks import Task, make_task
from .train import Run, TrainConfig, train

__all__ = ["calibrate", "CalibrationCell", "CalibrationResult", "estimate", "estimate_checkpoints", "estimate_groups", "estimate_run", "estimate_run_groups", "estimate_llc",
           "FastLLCError", "GroupResults", "LLCResult", "ModularMLP", "PreconditionedSGLD", "RMSPropSGLD", "Run", "SGLDConfig", "Task", "TrainConfig",
           "make_task", "train"]
__version__ = "0.1.0"
