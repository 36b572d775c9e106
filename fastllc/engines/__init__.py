"""Engines: one model family's forward and backward for C chains at once, over stacked per-chain weights.

``mlp.py``: the study's MLP with a hand-written backward (training and the ``torch`` backend); ``transformer.py``:
Hugging Face causal LMs (GPT-2, GPT-NeoX, Llama) with the chains folded into the batch, autograd for the
backward (the ``transformer`` backend). The ``native`` and ``triton`` backends' kernels are in ``fastllc/kernels/``.
"""
