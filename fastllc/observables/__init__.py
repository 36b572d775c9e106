"""Observables from one batched run: susceptibilities and Bayesian influence functions (BIF).

    import fastllc.observables as obs
    run = obs.observe_lm(model, tokens, {"pile": pile_tokens, "code": code_tokens},
                         restrictions={"full": None, "l0 attn": "l0 attn", "l1 attn": "l1 attn"},
                         chains=4, steps=50, epsilon=1e-4, gamma=1000.0, nbeta=30.0, batch_size=16)
    chi = obs.compute_susceptibilities(run, task="pile")       # every restriction × probe set, ± se
    print(chi.table()); obs.plot_susceptibilities(chi, "chi.png")
    chi = obs.compute_susceptibilities(run, "pile", classes={"digits": digit_ids, "space": space_ids})
    print(chi.table(by="class")); obs.plot_susceptibilities(chi, "classes.png", by="class")  # restriction × class
    bif = obs.compute_bif(run, method="sequence")              # correlations between probe sequences
    print(bif.format_top(3))

Every restriction is a chain group of ONE batch on a backend with the ``observe`` capability (``generic``, or ``transformer`` for the language models it runs); the probes
are evaluated for all chains at every draw and kept as running sums (means and covariances per chain, memory in
``moments.py``) or streamed to a ``.npz`` (``raw=``). Modules: ``recording`` (the ``observe=`` object, draws,
probes), ``moments`` (running sums), ``draws`` (raw draws on disk), ``run``/``lm`` (the batched run for any module,
for a causal LM), ``susceptibilities``, ``classes`` (token classes: χ per restriction × class), ``bif``, ``plots``,
``exact`` (closed-form answers of a linear-Gaussian model). devinterp 2.0.1's ``susceptibilities()`` and ``bif()``
(same arguments and xarray results) are built on this package in ``fastllc.compat.devinterp2``.
"""

from .bif import Influence, compute_bif
from .classes import TokenClasses, token_classes
from .draws import RawDraws, open_draws
from .lm import observe_lm
from .moments import Moments
from .plots import plot_influence, plot_susceptibilities
from .recording import Draws, Probes, Recorder, make_probes
from .run import ObservedRun, observe, per_example_cross_entropy, per_example_squared_error
from .susceptibilities import Susceptibilities, compute_susceptibilities

__all__ = ["Draws", "Influence", "Moments", "ObservedRun", "Probes", "RawDraws", "Recorder", "Susceptibilities",
           "TokenClasses", "compute_bif", "compute_susceptibilities", "make_probes", "observe", "observe_lm",
           "open_draws", "per_example_cross_entropy", "per_example_squared_error", "plot_influence",
           "plot_susceptibilities", "token_classes"]
