"""Models whose learning coefficient is known in closed form, to check λ̂ against (``dln``)."""

from .dln import (BENCHMARK_CONFIGS, BENCHMARK_N, CALIBRATION_SETTINGS, HAND_SETTINGS,
                  CalibratedSettings, DLNConfig, benchmark_table, dln_data, dln_learning_coefficient, dln_teacher,
                  format_comparison, format_table, half_squared_error, reduced_rank_regression_llc)

__all__ = ["BENCHMARK_CONFIGS", "BENCHMARK_N", "CALIBRATION_SETTINGS", "HAND_SETTINGS",
           "CalibratedSettings", "DLNConfig", "benchmark_table", "dln_data", "dln_learning_coefficient", "dln_teacher",
           "format_comparison", "format_table", "half_squared_error", "reduced_rank_regression_llc"]
