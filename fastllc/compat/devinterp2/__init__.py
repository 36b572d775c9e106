"""devinterp 2.0.1's sampling API on fastllc: switching a study over is a one-line import change::

    # from devinterp.slt.llc import llc
    # from devinterp.slt.weight_restrictions import create_param_masks
    # from devinterp.slt.susceptibilities import susceptibilities   (and bif)
    from fastllc.compat.devinterp2 import llc, create_param_masks, susceptibilities, bif

``settings.py``: what both share, devinterp's ``sample()`` keywords and defaults, its minibatch order, L̂_n(w*) and
the randomness that replays the order; ``sampling.py``: ``llc`` and ``create_param_masks`` (its arguments, result
fields and cache); ``observables.py``: ``susceptibilities`` and ``bif`` on ``fastllc.observables``, every weight
restriction a chain group of one batched run (it uses ``sampling.py``'s public mask functions). No module imports
another's private names. Each module lists how it differs from devinterp 2.0.1; so does the README.
"""

from .observables import bif, bif_from_run, observe, susceptibilities, susceptibilities_from_run
from .sampling import SPECS, as_dataset, create_param_masks, llc, param_mask_selection
from .settings import DEFAULTS, DevinterpBatches, dataset_tokens, devinterp_order

__all__ = ["DEFAULTS", "SPECS", "DevinterpBatches", "as_dataset", "bif", "bif_from_run", "create_param_masks",
           "dataset_tokens", "devinterp_order", "llc", "observe", "param_mask_selection", "susceptibilities",
           "susceptibilities_from_run"]
