"""Triton kernels and their launchers (the ``triton`` sampling backend, ``fastllc.backends.triton``).

Importing this package imports Triton (an extra: ``pip install 'fastllc[triton]'``; CUDA builds of
torch bring it) and defines the kernels; it never touches the CUDA driver, so it is safe on any machine.
Nothing else in fastllc imports it until the triton backend runs. Triton decides at definition time
whether a kernel is compiled for the GPU or run by its NumPy interpreter (``TRITON_INTERPRET=1``): set
the variable *before* the first import of this package to run the kernels on CPU tensors (tests). ``INTERPRETED`` records which one happened.
``python -m fastllc.kernels.aot`` compiles the real kernel for a GPU architecture without a GPU.
"""

try:
    import triton  # noqa: F401  (an extra of fastllc: say which when it is missing)
except ImportError as err:
    raise ImportError("fastllc.kernels needs the triton package: pip install 'fastllc[triton]'") from err

from .mlp_sgld import INTERPRETED, default_num_warps, draws, padded, run_chains  # noqa: E402

__all__ = ["INTERPRETED", "default_num_warps", "draws", "padded", "run_chains"]
