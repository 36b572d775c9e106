"""Language models: λ̂ of Hugging Face causal LMs and TransformerLens HookedTransformers on token data, per head
or layer by name, in float32 or under bf16 autocast (``bf16=True``: weights, noise and update stay float32).

    import fastllc.lm
    result = fastllc.lm.estimate(model, tokens, chains=16, steps=200, batch_size=16,
                                 epsilon=5e-5, gamma=1000.0, nbeta=1000.0)
    heads = fastllc.lm.estimate_groups(model, tokens, groups="per-head", chains=4, ...)

Modules: ``data`` (token data, the next-token loss, L_n(w*) in chunks), ``models`` (the adapter and the
sampling mode), ``names`` (part names → masks per architecture), ``memory`` (bytes per chain, chains per group), ``api`` (the two entry points),
``series`` (every checkpoint of a training run in one batch: ``estimate_series``, its table and plot).
``transformers`` is needed only to load a model from a directory (``pip install 'fastllc[lm]'``).
"""

from .api import estimate, estimate_groups, memory_plan
from .data import IGNORE, TokenData, loss_at, next_token_loss, token_data
from .memory import MemoryPlan, chain_bytes, plan
from .models import CausalLM, FusedTanhGELU, load_causal_lm, sampling_mode
from .names import LAYOUTS, groups_by_name, name_mask
from .series import SeriesPoint, SeriesResult, estimate_series

__all__ = ["estimate", "estimate_groups", "estimate_series", "SeriesResult", "SeriesPoint", "memory_plan", "MemoryPlan", "chain_bytes", "plan", "IGNORE", "TokenData", "loss_at", "next_token_loss", "token_data",
           "CausalLM", "FusedTanhGELU", "load_causal_lm", "sampling_mode", "LAYOUTS", "groups_by_name", "name_mask"]
