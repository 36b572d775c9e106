"""Models whose learning coefficient is known in closed form, to check λ̂ against (``dln``)."""

from .dln import (DLNConfig, benchmark_table, dln_data, dln_learning_coefficient, dln_teacher, format_table,
                  half_squared_error, reduced_rank_regression_llc)

__all__ = ["DLNConfig", "benchmark_table", "dln_data", "dln_learning_coefficient", "dln_teacher", "format_table",
           "half_squared_error", "reduced_rank_regression_llc"]
