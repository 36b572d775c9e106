"""Interoperability: a devinterp-compatible API (``devinterp``). (DataLoaders as data: ``fastllc.loaders``.)

Switching a devinterp study over is one import line::

    from fastllc.compat.devinterp import estimate_learning_coeff_with_summary
"""
