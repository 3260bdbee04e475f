"""meshserve.analytics: the cost model, plan chooser, memory estimator, what-if sweeps and calibration.

Pure arithmetic over model configs (meshserve.model.config), declared weight shapes and partition.comm's
collective lists; importing it starts no JAX devices (JAX is imported lazily where shapes or timings need it).
"""

from meshserve.analytics.calibrate import CalibrationPoint, calibrate
from meshserve.analytics.chips import CHIPS, Chip, ChipError, chip_names, get_chip, local_chip_path, save_local_chip
from meshserve.analytics.cost import Breakdown, Estimate, collective_time, estimate
from meshserve.analytics.memory import max_context_tokens, memory_estimate
from meshserve.analytics.plan import OBJECTIVES, PhasePlan, Plan, candidate_meshes, choose_plan
from meshserve.analytics.sizes import ModelSizes, model_sizes
from meshserve.analytics.sweep import analysis_config, analyze, pareto_frontier, pareto_points, prefill_mfu_curve

__all__ = [
    "Chip",
    "ChipError",
    "CHIPS",
    "chip_names",
    "get_chip",
    "local_chip_path",
    "save_local_chip",
    "ModelSizes",
    "model_sizes",
    "Estimate",
    "Breakdown",
    "estimate",
    "collective_time",
    "Plan",
    "PhasePlan",
    "choose_plan",
    "candidate_meshes",
    "OBJECTIVES",
    "memory_estimate",
    "max_context_tokens",
    "analysis_config",
    "analyze",
    "pareto_points",
    "pareto_frontier",
    "prefill_mfu_curve",
    "calibrate",
    "CalibrationPoint",
]
