"""Interoperability: PyTorch DataLoaders as data (``loaders``) and a devinterp-compatible API (``devinterp``).

Switching a devinterp study over is one import line::

    from fastllc.compat.devinterp import estimate_learning_coeff_with_summary
"""
