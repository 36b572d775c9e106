"""devinterp 2.0.1's ``sample()`` as fastllc runs it: what ``llc`` (``sampling.py``) and ``susceptibilities`` /
``bif`` (``observables.py``) share, so that neither reaches into the other.

- ``sample_settings``: ``sample()``'s keywords with its defaults (``DEFAULTS``) and this layer's own
  (``FASTLLC_OPTIONS``), checked, with devinterp's names in the one-line messages; the custom per-token loss
  (``loss_fn``) checked and kept as ``s["loss_fn"]``.
- ``fastllc_settings``: the ``SGLDConfig`` fields those settings mean (every step recorded, as devinterp's
  ``compute_llc`` averages every step).
- ``dataset_tokens``: the token ids [N, T] of what devinterp takes as a dataset.
- ``devinterp_order`` and ``minibatch_orders``: the sequence indices of every step, as devinterp's seeded
  ``DataLoader`` gives them (its first epoch, cycled); ``DevinterpBatches`` replays them beside fastllc's
  counter-based noise, a ``randomness`` for the backends.
- ``init_loss``: devinterp's L̂_n(w*) (``sampling.py`` ``_write_init_loss``), with the model in training mode.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ...errors import FastLLCError
from ...sampling.randomness import CounterRandomness
from ...validate import check_bool, check_float, check_int

# devinterp 2.0.1's sample() keywords and defaults (devinterp/slt/sampling.py, sample())
DEFAULTS = dict(num_chains=4, num_draws=200, batch_size=32, num_burnin_steps=0, num_steps_bw_draws=1,
                num_init_loss_batches=32, init_seed=100, batches_per_draw=3, obs_seed=1337,
                gradient_accumulation_steps=1, localization=0.0, noise_level=1.0, llc_weight_decay=0.0,
                bounding_box_size=None, sampling_method="sgmcmc_sgld", sampling_method_kwargs=None,
                rmsprop_eps=None, rmsprop_alpha=None, shuffle=True, match_sampling_input_ids_across_chains=True,
                init_noise=None, device=None, save_metrics=False, output_path=None)
FASTLLC_OPTIONS = dict(backend="auto", max_memory=None, progress=False)  # this layer's own keywords
_POSITIVE = ("num_chains", "num_draws", "batch_size", "num_steps_bw_draws", "num_init_loss_batches",
             "gradient_accumulation_steps", "batches_per_draw")


def sample_settings(lr, n_beta, observables, loss_fn, kwargs: dict, caller: str = "llc") -> dict:
    """The keywords with devinterp's defaults, checked (devinterp's names in the messages; ``caller`` names the
    function the user called)."""
    unknown = sorted(set(kwargs) - set(DEFAULTS) - set(FASTLLC_OPTIONS))
    if unknown:
        raise FastLLCError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)} (devinterp 2.0.1's "
                           f"sample() takes {', '.join(DEFAULTS)}; fastllc adds {', '.join(FASTLLC_OPTIONS)})")
    s = {**DEFAULTS, **FASTLLC_OPTIONS, **kwargs}
    s["lr"], s["n_beta"] = check_float("lr", lr, above=0), check_float("n_beta", n_beta, above=0)
    for name in _POSITIVE:
        s[name] = check_int(name, s[name], minimum=1)
    s["num_burnin_steps"] = check_int("num_burnin_steps", s["num_burnin_steps"], minimum=0)
    s["init_seed"] = check_int("init_seed", s["init_seed"])
    s["localization"] = check_float("localization", s["localization"], minimum=0)
    for name in ("shuffle", "match_sampling_input_ids_across_chains", "save_metrics"):
        check_bool(name, s[name])
    if observables is not None and not isinstance(observables, dict):
        raise FastLLCError(f"observables must be a dict {{name: dataset or (dataset, batches_per_draw)}}, got "
                           f"{type(observables).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise FastLLCError(f"loss_fn must be a function (model, input_ids) → per-token loss [batch, length − 1], got "
                           f"{type(loss_fn).__name__}")
    s["loss_fn"] = loss_fn
    _refuse_off_defaults(s)
    s.update(_sampler(s))
    return s


def _refuse_off_defaults(s: dict) -> None:
    """devinterp options fastllc does not implement: refused unless they have their 'off' value."""
    off = {"noise_level": lambda v: v == 1.0, "llc_weight_decay": lambda v: v == 0.0,
           "bounding_box_size": lambda v: v is None, "init_noise": lambda v: not v}
    for name, is_off in off.items():
        if not is_off(s[name]):
            raise FastLLCError(f"{name}={s[name]!r} is not supported by fastllc.compat.devinterp2 (only the default "
                               f"{DEFAULTS[name]!r})")


def _sampler(s: dict) -> dict:
    """fastllc's sampler settings from ``sampling_method``, ``sampling_method_kwargs`` and ``rmsprop_*``
    (their rules as devinterp's sample(): ``rmsprop_*`` only with rmsprop_sgld, not also in the kwargs)."""
    method = s["sampling_method"]
    if method not in ("sgmcmc_sgld", "rmsprop_sgld"):
        raise FastLLCError(f"sampling_method must be 'sgmcmc_sgld' or 'rmsprop_sgld', got {method!r}")
    extra = dict(s["sampling_method_kwargs"] or {})
    for name in ("eps", "alpha"):
        value = s[f"rmsprop_{name}"]
        if value is None:
            continue
        if method != "rmsprop_sgld":
            raise FastLLCError(f"rmsprop_{name} can only be set when sampling_method='rmsprop_sgld', got "
                               f"sampling_method={method!r}")
        if name in extra:
            raise FastLLCError(f"rmsprop_{name} is set both as a top-level argument and in "
                               f"sampling_method_kwargs[{name!r}]; specify only one")
        extra[name] = value
    allowed = {"alpha", "eps", "add_grad_correction"} if method == "rmsprop_sgld" else set()
    if set(extra) - allowed or extra.get("add_grad_correction"):
        bad = sorted(set(extra) - allowed) or ["add_grad_correction=True"]
        raise FastLLCError(f"sampling_method_kwargs {', '.join(bad)} not supported by fastllc for {method}")
    if method == "sgmcmc_sgld":
        return {"sampler": "sgld"}
    return {"sampler": "rmsprop_sgld", "rmsprop_alpha": float(extra.get("alpha", 0.99)),
            "rmsprop_eps": float(extra.get("eps", 0.1))}


def sampling_steps(s: dict) -> int:
    """The steps of one devinterp chain: num_draws·num_steps_bw_draws + num_burnin_steps."""
    return s["num_draws"] * s["num_steps_bw_draws"] + s["num_burnin_steps"]


def fastllc_settings(s: dict) -> dict:
    """SGLDConfig fields: every step recorded and averaged (burn-in included, as devinterp's compute_llc)."""
    rmsprop = {k: s[k] for k in ("rmsprop_alpha", "rmsprop_eps")} if s["sampler"] == "rmsprop_sgld" else {}
    return dict(chains=s["num_chains"], steps=sampling_steps(s), burn_in=0, thin=1, epsilon=s["lr"],
                gamma=s["localization"], nbeta=s["n_beta"],
                batch_size=s["batch_size"] * s["gradient_accumulation_steps"], seed=s["init_seed"],
                sampler=s["sampler"], **rmsprop)


def dataset_tokens(dataset) -> torch.Tensor:
    """Token ids [N, T] of a Hugging Face ``datasets.Dataset`` with ``input_ids`` (what devinterp 2 takes), a
    LongTensor, or anything ``fastllc.lm.token_data`` reads (its ``input_ids`` only: devinterp reads no mask)."""
    from ...lm import token_data

    if hasattr(dataset, "with_format") and hasattr(dataset, "column_names"):
        if "input_ids" not in dataset.column_names:
            raise FastLLCError(f"the dataset has no 'input_ids' column (columns: {', '.join(dataset.column_names)})")
        column = dataset.with_format("torch")[:]["input_ids"]
        if not isinstance(column, torch.Tensor):
            raise FastLLCError("the dataset's 'input_ids' must be sequences of one length (devinterp 2 requires it)")
        dataset = column
    return token_data(dataset).tokens


def devinterp_order(n: int, batch_size: int, seed: int, shuffle: bool) -> torch.Tensor:
    """The first epoch [E, batch_size] of the sequence indices that devinterp 2.0.1's loaders give
    (``DataLoader(dataset, batch_size, shuffle, generator=Generator().manual_seed(seed), drop_last=True)``),
    taken from the same DataLoader over ``range(n)``; devinterp's ``itertools.cycle`` replays it."""
    if n < batch_size:
        raise FastLLCError(f"the dataset has {n} sequences, fewer than batch_size={batch_size}: devinterp's loader "
                           "(drop_last=True) would give no minibatch")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=True)
    return torch.stack([batch.long() for batch in loader])


def minibatch_orders(n: int, s: dict, steps: int) -> torch.Tensor:
    """The indices of every step [R, max(steps, num_init_loss_batches), batch_size·accumulation]: one order shared
    by every chain (R = 1, devinterp's default ``match_sampling_input_ids_across_chains``) or one per chain."""
    accumulate, b = s["gradient_accumulation_steps"], s["batch_size"]
    seeds = ([s["init_seed"]] if s["match_sampling_input_ids_across_chains"]
             else [s["init_seed"] + c for c in range(s["num_chains"])])
    orders = []
    for seed in seeds:
        epoch = devinterp_order(n, b, seed, s["shuffle"])
        needed = max(steps, s["num_init_loss_batches"]) * accumulate
        orders.append(epoch[torch.arange(needed) % len(epoch)].reshape(-1, accumulate * b))
    return torch.stack(orders)


def init_loss(model, tokens: torch.Tensor, orders: torch.Tensor, s: dict) -> float:
    """devinterp's L̂_n(w*): the loss over the first num_init_loss_batches (× accumulation) minibatches of each
    order, in training mode, averaged over the orders (per chain in devinterp: the same where they match); the
    custom ``s["loss_fn"]`` if given (the mean of its per-token losses)."""
    from ... import lm
    from ...lm.api import init_loss_at, language_model

    wrapped, _ = language_model(model, s.get("loss_fn"))
    losses = []
    with lm.sampling_mode(model):
        model.train()
        for order in orders:
            rows = order[:s["num_init_loss_batches"]].reshape(-1)
            losses.append(init_loss_at(wrapped, lm.token_data(tokens[rows])))
    return float(np.mean(losses))


class DevinterpBatches:
    """devinterp's minibatch indices (``orders`` [R, steps, m]: one order shared by all chains, or one per
    chain) with fastllc's counter-based unit noise keyed by (seed, chain): a ``randomness`` for the backends."""

    def __init__(self, orders: torch.Tensor, seed: int, n: int, dim: int):
        self.orders = orders.numpy()
        self.noise = CounterRandomness(seed, n, orders.shape[-1], dim)

    def _rows(self, chains):
        return chains if self.orders.shape[0] > 1 else np.zeros_like(chains)

    def fill(self, chains: np.ndarray, step: int, indices: np.ndarray, noise: np.ndarray, blocks=None) -> None:
        self.noise.fill(chains, step, indices, noise, blocks)
        indices[:] = self.orders[self._rows(np.asarray(chains)), step]

    def draw(self, chain: int, step: int):
        _, noise = self.noise.draw(chain, step)
        return torch.from_numpy(self.orders[chain if self.orders.shape[0] > 1 else 0, step].copy()), noise


__all__ = ["DEFAULTS", "FASTLLC_OPTIONS", "DevinterpBatches", "dataset_tokens", "devinterp_order", "fastllc_settings",
           "init_loss", "minibatch_orders", "sample_settings", "sampling_steps"]
