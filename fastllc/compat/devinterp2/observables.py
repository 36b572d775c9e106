"""devinterp 2.0.1's ``susceptibilities()`` and ``bif()`` on fastllc: same arguments, same xarray results.

    # from devinterp.slt.susceptibilities import susceptibilities
    # from devinterp.slt.bif import bif
    from fastllc.compat.devinterp2 import susceptibilities, bif

``susceptibilities(model, dataset, observables, weight_restrictions, *, sampling_task, lr, n_beta, loss_fn=None,
include_sampling_task=False, **kwargs)`` returns devinterp's ``DataTree`` (``/susceptibilities``: ``sus``
[sus_flat, wr] with coordinates ``dataset_id``, ``batch``, ``target_position`` on ``sus_flat`` and ``wr``,
attribute ``dataset_id_to_name``; ``/context``: ``input_ids`` [ctx_flat] with ``dataset_id``, ``batch``,
``position``), computed with devinterp's estimator (``fastllc/observables/susceptibilities.py``, "devinterp");
``bif(model, dataset, observables, *, lr, n_beta, param_masks=None, correlation_method="token",
reduce_chain_dimension_method="stack", average_tokenwise_bif=False, compute_covariance=False, bif_batch_size=32,
bif_device=None, loss_fn=None, **kwargs)`` returns devinterp's ``Dataset`` (``influences`` [batch_1, batch_2]
or [batch_1, batch_2, target_position, target_position_T], float32; ``input_ids`` [batch, position]). The
``**kwargs`` are devinterp's ``sample()`` keywords with its defaults (``fastllc.compat.devinterp2``, whose
settings, minibatch order, L̂_n(w*) and training mode this layer shares), plus ``backend``, ``max_memory`` and
``progress``. Both from ONE run: ``run = observe(model, dataset, observables, weight_restrictions, lr=..., n_beta=...,
**kwargs)``, then ``susceptibilities_from_run(run, sampling_task)`` and ``bif_from_run(run, ...)`` (the full
restriction's chains; ``token_moments=True`` in ``observe`` for the token-wise method).

What is devinterp's: the SGLD update and its defaults (localization 0), the minibatch order (its DataLoader's
first epoch, cycled), L̂_n(w*) over ``num_init_loss_batches`` of those minibatches, the model in training mode
(dropout on) for the chains and the observables, each observable's ``batch_size·batches_per_draw`` sequences
(``random.Random(obs_seed).sample``, in that order), observables ordered by name, a draw after each of the steps
burn-in + k·``num_steps_bw_draws`` (the weights after it), the estimators.

What differs (README, "Observables"): every weight restriction's chains run in ONE batch (devinterp: one
sampling run per restriction, chain after chain), so restriction g's chain j draws its noise from fastllc's
counter streams keyed by (init_seed, g·num_chains + j): agreement in distribution, not draw for draw, and no
common noise across restrictions; probe losses are kept as running sums, never written per step (devinterp: a
zarr of every step's per-token losses in a temporary folder it does not delete); ``output_path`` (a folder)
receives the raw draws of all restrictions as one ``draws.npz`` and is never reused (devinterp returns a stored
run whose sampler settings match, even if the model or data changed); diverging chains are left out (devinterp
warns and keeps the zeros of the unfinished draws); ``weight_restrictions`` values may also be devinterp names
(``"l0h1"``, passed to ``create_param_masks``); ``susceptibilities`` adds ``sus_se`` (standard error over
chains) and the attribute ``fastllc`` (every restriction's λ̂ result as JSON: weights sampled, health) to
``/susceptibilities``, ``bif`` the attribute ``fastllc`` (its restriction's); ``bif_device`` is ignored (the CPU
computes it). Refused in one line: what ``fastllc.compat.devinterp2`` refuses (``settings.py``).

``loss_fn`` ((model, input_ids) → per-token loss [B, T−1]) is devinterp's: the chains follow the mean of its
entries, every observable records its entries, L̂_n(w*) is their mean over the init minibatches. It runs on
backend ``generic``, which evaluates it for all chains at once through ``torch.func.vmap``, so it must be
vmap-able (no ``.item()``, no branching on values; devinterp calls it one chain at a time), and its shape is
checked on every probe batch (devinterp: on the first init minibatch).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import FastLLCError
from ...validate import check_bool, check_choice, check_int
from ...observables.bif import compute_bif
from ...observables.recording import Draws
from ...observables.susceptibilities import compute_susceptibilities
from .sampling import create_param_masks, param_mask_selection
from .settings import (DevinterpBatches, dataset_tokens, fastllc_settings, init_loss, minibatch_orders,
                       sample_settings)


def to_obs_id(task_name: str) -> str:
    """devinterp's identifier for an observable name (``devinterp/slt/observables.py``)."""
    result = "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)
    if result and result[0].isdigit():
        result = "_" + result
    return result or "_"


def _observable_tokens(spec, name: str, settings: dict, length: int) -> torch.Tensor:
    """The fixed sequences of one observable: ``random.Random(obs_seed).sample`` of batch_size·batches_per_draw."""
    dataset, per_draw = spec if isinstance(spec, tuple) else (spec, settings["batches_per_draw"])
    check_int(f"observables[{name!r}] batches_per_draw", per_draw, minimum=1)
    tokens = dataset_tokens(dataset)
    count = settings["batch_size"] * per_draw
    if len(tokens) < count:
        raise FastLLCError(f"observable {name!r} has {len(tokens)} sequences, fewer than batch_size·batches_per_draw"
                           f" = {count}")
    if tokens.shape[1] != length:
        raise FastLLCError(f"observable {name!r} has sequences of length {tokens.shape[1]}, the dataset {length}")
    return tokens[random.Random(settings["obs_seed"]).sample(range(len(tokens)), count)]


def _probe_sets(observables, settings: dict, length: int) -> dict:
    """{obs id: tokens} in devinterp's order (sorted ids), each observable's sequences as devinterp picks them."""
    if not isinstance(observables, dict) or not observables:
        raise FastLLCError("observables must be a non-empty dict {name: dataset or (dataset, batches_per_draw)}")
    ids = {to_obs_id(name): name for name in observables}
    if len(ids) < len(observables):
        raise FastLLCError(f"observable names {list(observables)} collide as devinterp identifiers")
    return {oid: _observable_tokens(observables[ids[oid]], ids[oid], settings, length) for oid in sorted(ids)}


def _restrictions(model, weight_restrictions: dict) -> dict:
    """{wr name: {parameter: mask} or None}: devinterp ParamMasks, None (full) or devinterp names."""
    out = {}
    for name, masks in weight_restrictions.items():
        if isinstance(masks, (str, list)):
            masks = create_param_masks(model, masks)
        out[str(name)] = param_mask_selection(model, masks)
    return out


def observe(model, dataset, observables: dict, weight_restrictions: dict, *, lr: float, n_beta: float,
            loss_fn=None, token_moments=False, chain_mean=False, scratch=None, caller: str = "observe",
            **kwargs):
    """Every weight restriction of ``weight_restrictions`` ({name: ParamMasks, None or a devinterp name}) in ONE
    batched run with devinterp 2.0.1's ``sample()`` settings (``kwargs``): fastllc's ``ObservedRun``, whose probe
    sets are the observables (by devinterp id, in devinterp's order). ``susceptibilities_from_run`` and
    ``bif_from_run`` read devinterp's results from it: both from one run. ``loss_fn`` (model, input_ids) →
    per-token loss [B, T−1]: what the chains follow (its mean), the observables record and L̂_n(w*) averages, as
    in devinterp. ``token_moments``/``chain_mean``: what token-wise influences and chain-averaged influences need
    kept (``Recorder``); ``"auto"``: kept when the sums with them fit the budget (``max_memory``, else a quarter of
    the available memory), else the raw draws go to ``output_path``'s file or ``scratch/draws.npz`` (a folder the
    caller removes) and influences are computed from them in blocks. ``caller``: the function named in a refusal."""
    from ...observables.lm import observe_lm
    s = sample_settings(lr, n_beta, observables, loss_fn, kwargs, caller=caller)
    model = _load(model)
    tokens = dataset_tokens(dataset)
    probes = _probe_sets(observables, s, tokens.shape[1])
    masks = _restrictions(model, weight_restrictions)
    steps = s["num_burnin_steps"] + s["num_draws"] * s["num_steps_bw_draws"] + 1  # devinterp draws after a step
    draws = Draws(steps, first=s["num_burnin_steps"] + 1, thin=s["num_steps_bw_draws"])
    orders = minibatch_orders(len(tokens), s, steps)
    per_chain = orders if len(orders) == 1 else orders.repeat(len(masks), 1, 1)  # every group: chain j's order
    device = s["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    raw = _raw_path(s["output_path"])
    token_moments, chain_mean, raw = _kept_sums(probes, len(masks) * s["num_chains"], draws.count, token_moments,
                                                chain_mean, raw, scratch, s["max_memory"], caller)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["init_seed"])  # dropout masks: seeded, the caller's generator untouched
        init = init_loss(model, tokens, orders, s)  # per order, then averaged
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return observe_lm(model, tokens, probes, restrictions=masks, init_loss=init, dropout=True, draws=draws,
                          randomness=DevinterpBatches(per_chain, s["init_seed"], len(tokens), dim), raw=raw,
                          device=device, backend=s["backend"], max_memory=s["max_memory"], progress=s["progress"],
                          token_moments=token_moments, chain_mean=chain_mean, token_loss=s["loss_fn"],
                          **dict(fastllc_settings(s), steps=steps))


def _kept_sums(probes: dict, chains: int, draws: int, token_moments, chain_mean, raw, scratch, max_memory,
               caller: str) -> tuple:
    """(token_moments, chain_mean, raw) for ``observe``: an "auto" option kept when the sums with it fit the
    budget (``recording.sums_budget``), else the raw draws kept instead (``raw``, or ``scratch/draws.npz``); refused
    in one line, naming what a devinterp caller can change, when the sums left do not fit."""
    from ...observables.moments import moments_bytes
    from ...observables.recording import sums_budget
    from ...resources import format_bytes
    examples, length = sum(len(t) for t in probes.values()), next(iter(probes.values())).shape[1] - 1
    size = lambda tokens, kept: moments_bytes(chains, examples, length, len(probes), token_moments=tokens, draws=kept)
    budget, source = sums_budget(max_memory)
    fits = lambda needed: budget is None or needed <= budget
    auto = (token_moments == "auto", chain_mean == "auto")
    if auto[0]:
        token_moments = _token_moments_fit(probes, chains) and fits(size(True, 0))
    if auto[1]:
        chain_mean = _chain_mean_fit(size(token_moments, draws), budget)
    if ((auto[0] and not token_moments) or (auto[1] and not chain_mean)) and raw is None:
        if scratch is None:
            raise FastLLCError(f"{caller}: the sums do not fit {source}; the raw draws need output_path= or "
                               "scratch=")
        raw = Path(scratch) / "draws.npz"
    needed = size(token_moments, draws if chain_mean else 0)
    explicit = (token_moments is True and not auto[0]) or (chain_mean is True and not auto[1])
    if not fits(needed):
        raise FastLLCError(f"{caller}: the observables' running sums need {format_bytes(needed)}, more than "
                           f"{format_bytes(budget)} ({source}); use fewer num_chains, fewer or shorter observables "
                           "(batch_size·batches_per_draw sequences each) or a larger max_memory"
                           + (", or token_moments/chain_mean='auto' (the raw draws to disk)" if explicit else ""))
    return token_moments, chain_mean, raw


def _token_moments_fit(probes: dict, chains: int) -> bool:
    """Whether Σ x xᵀ per chain fits a quarter of the available memory (``moments.moments_bytes``)."""
    from ...resources import available_memory_bytes
    from ...observables.moments import moments_bytes
    examples = sum(len(t) for t in probes.values())
    length = next(iter(probes.values())).shape[1] - 1
    available = available_memory_bytes()
    needed = moments_bytes(chains, examples, length, len(probes), token_moments=True)
    return available is None or needed <= available // 4


def _chain_mean_fit(needed: int, budget: int | None) -> bool:
    """Whether the sums with every chain's draws (``needed`` bytes) fit ``budget`` (None: unknown, so kept)."""
    return budget is None or needed <= budget


def _load(model):
    from ...lm import load_causal_lm
    return load_causal_lm(model)


def _raw_path(output_path):
    if output_path is None:
        return None
    folder = Path(output_path)
    if folder.exists():
        raise FastLLCError(f"output_path {folder} exists; fastllc never reuses a stored run (devinterp would, if its "
                           "sampler settings matched): remove it or choose another path")
    folder.mkdir(parents=True)
    return folder / "draws.npz"


def susceptibilities(model, dataset, observables: dict, weight_restrictions: dict, *, sampling_task: str, lr: float,
                     n_beta: float, loss_fn=None, include_sampling_task: bool = False, **kwargs):
    """devinterp 2.0.1's ``susceptibilities`` (module docstring): a ``DataTree``; every restriction, "full"
    included, in one batched run."""
    import xarray  # noqa: F401  (the result type)
    check_bool("include_sampling_task", include_sampling_task)
    if not isinstance(weight_restrictions, dict) or "full" not in weight_restrictions:
        raise FastLLCError("weight_restrictions must include a 'full' key (use None for the full model)")
    if not isinstance(observables, dict) or sampling_task not in observables:
        raise FastLLCError(f"sampling_task {sampling_task!r} not found in observables: "
                           f"{list(observables) if isinstance(observables, dict) else observables!r}")
    if not include_sampling_task and len(observables) < 2:
        raise FastLLCError("need at least one observable besides sampling_task (or include_sampling_task=True)")
    run = observe(model, dataset, observables, {"full": weight_restrictions["full"], **weight_restrictions}, lr=lr,
                  n_beta=n_beta, loss_fn=loss_fn, caller="susceptibilities", **kwargs)
    return susceptibilities_from_run(run, sampling_task, include_sampling_task=include_sampling_task)


def susceptibilities_from_run(run, sampling_task: str, *, include_sampling_task: bool = False):
    """devinterp's susceptibilities ``DataTree`` of a run of ``observe`` (every restriction but "full" a ``wr``)."""
    import xarray  # noqa: F401  (the result type)
    task = to_obs_id(sampling_task)
    chi = compute_susceptibilities(run, task, estimator="devinterp")
    keep = [o for o in run.probes.names if include_sampling_task or o != task]
    tree = _sus_tree(chi, _probe_tokens(run), keep, [wr for wr in run.groups if wr != "full"])
    tree["susceptibilities"].attrs["fastllc"] = run.results.to_json()  # every restriction's λ̂, weights sampled
    return tree


def _probe_tokens(run) -> dict:
    return {name: run.probes.inputs[run.probes.rows(name)] for name in run.probes.names}


def _sus_tree(chi, probes: dict, keep: list, wr_order: list):
    """devinterp's SusceptibilitiesV2 layout (``devinterp/slt/susceptibilities.py`` ``_build_output``)."""
    import xarray as xr
    rows = [list(chi.restrictions).index(wr) for wr in wr_order]
    sus, se, sus_coords, ids, ids_coords = [], [], [], [], []
    for i, oid in enumerate(keep):
        part = slice(chi.offsets[chi.probe_sets.index(oid)], chi.offsets[chi.probe_sets.index(oid) + 1])
        values, errors = chi.token[rows][:, part], chi.token_se[rows][:, part]  # [wr, batch, T−1]
        batch, length = values.shape[1:]
        sus.append(values.reshape(len(rows), -1).T.float().numpy())  # float32, as devinterp's (its zarr)
        se.append(errors.reshape(len(rows), -1).T.float().numpy())
        grid = np.meshgrid(np.arange(batch), np.arange(1, length + 1), indexing="ij")
        sus_coords.append((np.full(batch * length, i), grid[0].ravel(), grid[1].ravel()))
        tokens = probes[oid].numpy()
        ids.append(tokens.ravel())
        grid = np.meshgrid(np.arange(tokens.shape[0]), np.arange(tokens.shape[1]), indexing="ij")
        ids_coords.append((np.full(tokens.size, i), grid[0].ravel(), grid[1].ravel()))
    flat = lambda parts, k: np.concatenate([p[k] for p in parts])
    sus_c = xr.Coordinates({"dataset_id": ("sus_flat", flat(sus_coords, 0)), "batch": ("sus_flat", flat(sus_coords, 1)),
                            "target_position": ("sus_flat", flat(sus_coords, 2))}, indexes={})
    ids_c = xr.Coordinates({"dataset_id": ("ctx_flat", flat(ids_coords, 0)), "batch": ("ctx_flat", flat(ids_coords, 1)),
                            "position": ("ctx_flat", flat(ids_coords, 2))}, indexes={})
    attrs = {"dataset_id_to_name": list(keep)}
    return xr.DataTree.from_dict({
        "/susceptibilities": xr.Dataset({"sus": (["sus_flat", "wr"], np.concatenate(sus)),
                                         "sus_se": (["sus_flat", "wr"], np.concatenate(se))},
                                        coords=sus_c.merge(xr.Coordinates({"wr": wr_order})), attrs=attrs),
        "/context": xr.Dataset({"input_ids": (["ctx_flat"], np.concatenate(ids))}, coords=ids_c, attrs=attrs)})


def bif(model, dataset, observables: dict, *, lr: float, n_beta: float, param_masks=None,
        correlation_method: str = "token", reduce_chain_dimension_method: str = "stack",
        average_tokenwise_bif: bool = False, compute_covariance: bool = False, bif_batch_size: int = 32,
        bif_device=None, loss_fn=None, **kwargs):
    """devinterp 2.0.1's ``bif`` (module docstring): an ``xarray.Dataset`` with ``influences`` and ``input_ids``."""
    import xarray  # noqa: F401  (the result type)
    check_choice("correlation_method", correlation_method, ("token", "sequence"))
    check_choice("reduce_chain_dimension_method", reduce_chain_dimension_method, ("stack", "mean"))
    for name, value in (("average_tokenwise_bif", average_tokenwise_bif), ("compute_covariance", compute_covariance)):
        check_bool(name, value)
    check_int("bif_batch_size", bif_batch_size, minimum=1)
    tokens = correlation_method == "token" and reduce_chain_dimension_method == "stack"
    with tempfile.TemporaryDirectory(prefix="fastllc-bif-") as scratch:  # raw draws, if the sums would not fit
        run = observe(model, dataset, observables, {"full": param_masks}, lr=lr, n_beta=n_beta, loss_fn=loss_fn,
                      scratch=scratch, token_moments="auto" if tokens else False,
                      chain_mean="auto" if reduce_chain_dimension_method == "mean" else False, caller="bif",
                      **kwargs)
        return bif_from_run(run, correlation_method=correlation_method,
                            reduce_chain_dimension_method=reduce_chain_dimension_method,
                            average_tokenwise_bif=average_tokenwise_bif, compute_covariance=compute_covariance,
                            bif_batch_size=bif_batch_size)


def bif_from_run(run, *, correlation_method: str = "token", reduce_chain_dimension_method: str = "stack",
                 average_tokenwise_bif: bool = False, compute_covariance: bool = False, bif_batch_size: int = 32,
                 restriction: str = "full"):
    """devinterp's BIF ``Dataset`` of restriction ``restriction`` of a run of ``observe``."""
    import xarray as xr
    result = compute_bif(run, restriction=restriction, method=correlation_method, chains=reduce_chain_dimension_method,
                         kind="covariance" if compute_covariance else "correlation",
                         average_tokens=average_tokenwise_bif, block=bif_batch_size)
    n = len(result.rows)
    dims, coords = ["batch_1", "batch_2"], {"batch_1": np.arange(n), "batch_2": np.arange(n)}
    if result.matrix.dim() == 4:
        length = result.matrix.shape[-1]
        dims += ["target_position", "target_position_T"]
        coords.update(target_position=np.arange(1, length + 1), target_position_T=np.arange(1, length + 1))
    out = xr.DataArray(result.matrix.float().numpy(), name="influences", dims=dims, coords=coords).to_dataset()
    out["input_ids"] = xr.DataArray(run.probes.inputs.numpy(), dims=["batch", "position"])
    out.attrs["fastllc"] = run.results[restriction].to_json()
    return out


__all__ = ["bif", "bif_from_run", "observe", "susceptibilities", "susceptibilities_from_run", "to_obs_id"]
