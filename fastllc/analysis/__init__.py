"""Circuit analysis of trained modular-addition networks: Fourier modes of the embedding (Numba),
learned-circuit detection, mode ablation, and plots."""

from .circuits import CIRCUIT_RULE, CircuitReport, analyse, analyse_run, circuits_over_training, learned_frequencies
from .fourier import FourierModes, fourier_modes, keep_frequencies

__all__ = ["CIRCUIT_RULE", "CircuitReport", "FourierModes", "analyse", "analyse_run", "circuits_over_training", "fourier_modes", "keep_frequencies",
           "learned_frequencies"]
