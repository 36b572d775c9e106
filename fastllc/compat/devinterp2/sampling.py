"""devinterp 2.0.1's LLC API on fastllc: switching a study over is a one-line import change::

    # from devinterp.slt.llc import llc
    # from devinterp.slt.weight_restrictions import create_param_masks
    from fastllc.compat.devinterp2 import llc, create_param_masks

``llc(model, dataset, observables, *, lr, n_beta, param_masks=None, loss_fn=None, **kwargs)`` takes the
arguments of devinterp 2.0.1's ``llc`` and ``sample`` (``num_chains``, ``num_draws``, ``batch_size``,
``num_burnin_steps``, ``num_steps_bw_draws``, ``num_init_loss_batches``, ``init_seed``,
``gradient_accumulation_steps``, ``localization``, ``sampling_method`` ``"sgmcmc_sgld"`` | ``"rmsprop_sgld"``
with ``rmsprop_alpha``/``rmsprop_eps`` or ``sampling_method_kwargs``, ``shuffle``,
``match_sampling_input_ids_across_chains``, ``device``, ``output_path``, ...) with its defaults, and returns
its ``xarray.Dataset`` (``llc_mean``, ``llc_std``, ``llc_per_chain`` [chain], ``llc_scalar``, ``loss_trace``
[chain, step], ``init_loss``; float32/float64 as devinterp's) plus fastllc's ``llc_se``, ``llc_r_hat``,
``llc_ess``, ``healthy`` [chain] and the ``LLCResult`` as JSON in ``attrs["fastllc"]``. All chains run
together through ``fastllc.lm.estimate`` (memory-planned groups; backend ``auto``: ``transformer`` for the
families it writes when dropout is off, else ``generic``; both take this layer's minibatch order).

What devinterp 2.0.1 computes, and so this layer (its source, ``devinterp/slt/...``):
- λ̂ per chain is nβ·(mean over EVERY step, burn-in included, of the step's minibatch loss − L̂_n(w*))
  (``llc.py`` ``compute_llc``: ``loss_trace.mean(dim="step")``); ``num_steps_bw_draws`` only lengthens the
  chain (num_draws·num_steps_bw_draws + num_burnin_steps steps); ``llc_std`` is xarray's ``std`` (ddof 0).
- The loss at step t is the minibatch's mean next-token cross-entropy at w_t, before the update
  (``sampler.py`` ``sample_single_chain``), over all tokens (no attention or loss mask), with the model in
  training mode (dropout on, ``sampler.py``: ``model.train()``); this layer passes ``dropout=True``.
- Minibatches: a ``DataLoader(shuffle=shuffle, drop_last=True)`` seeded with ``init_seed`` (or
  ``init_seed + chain`` without ``match_sampling_input_ids_across_chains``), its first epoch replayed by
  ``itertools.cycle``; by default every chain sees the same minibatches. This layer draws the same index
  order from the same DataLoader (``devinterp_order``): the chains see devinterp's minibatches exactly.
- L̂_n(w*) is the mean loss over the first ``num_init_loss_batches`` × ``gradient_accumulation_steps`` of
  those minibatches (``sampling.py`` ``_write_init_loss``), averaged over chains, in training mode.
- The update is Δw = −(lr/2)·m·(nβ∇L_m + localization·(w − w*)) + √lr·m·N(0, 1) (``SGMCMC.sgld``), m the
  mask; RMSprop-SGLD as fastllc's ``rmsprop_sgld`` (α 0.99, eps 0.1).

Differences (listed in the README, "devinterp 2"): the SGLD noise comes from fastllc's counter streams keyed
by (``init_seed``, chain), not ``torch.manual_seed(init_seed + chain)``: results agree in distribution, not
draw for draw; dropout masks come from torch's generator forked and seeded with ``init_seed``; chains whose
loss diverges are flagged (``healthy``) and left out of the means (NaN in ``llc_per_chain``); L̂_n(w*) is
computed once per distinct minibatch order (devinterp: once per chain); ``observables`` (and
``batches_per_draw``, ``obs_seed``) and ``save_metrics`` are accepted and ignored (``llc`` returns no
observable); ``output_path`` caches this layer's result as JSON, not devinterp's zarr of per-token losses.
Refused in one line: ``noise_level`` ≠ 1, ``llc_weight_decay``, ``bounding_box_size``, ``init_noise``,
other ``sampling_method_kwargs``, masks with values other than 0/1, selections of nothing. ``loss_fn``
((model, input_ids) → per-token loss [B, T−1]) replaces the cross-entropy as in devinterp (the chain loss is the
mean of its entries), on backend ``generic``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ... import storage
from ...errors import FastLLCError
from ...lm.models import dimensions, is_hooked_transformer
from ...sampling.restrict import closest_names
from .settings import (DEFAULTS, DevinterpBatches, dataset_tokens, fastllc_settings, init_loss, minibatch_orders,
                       sample_settings, sampling_steps)

_RESULT_FILE = "fastllc-llc.json"


def llc(model, dataset, observables=None, *, lr, n_beta, param_masks=None, loss_fn=None, **kwargs):
    """devinterp 2.0.1's ``llc`` on fastllc (module docstring): an ``xarray.Dataset``."""
    import xarray  # noqa: F401  (the result type; fastllc[lm] installs it)
    from ... import lm

    settings = sample_settings(lr, n_beta, observables, loss_fn, kwargs)
    model = lm.load_causal_lm(model)
    tokens = dataset_tokens(dataset)
    restrict = param_mask_selection(model, param_masks)
    cached = _cached(settings, restrict)
    if cached is not None:
        return cached
    orders = minibatch_orders(len(tokens), settings, sampling_steps(settings))
    device = settings["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["init_seed"])  # dropout masks, if any: seeded, the caller's generator untouched
        init = init_loss(model, tokens, orders, settings)
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = lm.estimate(model, tokens, **fastllc_settings(settings), init_loss=init, restrict=restrict,
                             randomness=DevinterpBatches(orders, settings["init_seed"], len(tokens), dim),
                             dropout=True, device=device, token_loss=settings["loss_fn"],
                             backend=settings["backend"], max_memory=settings["max_memory"],
                             progress=settings["progress"])
    out = as_dataset(result, settings["n_beta"])
    _store(settings, restrict, out)
    return out


def param_mask_selection(model, param_masks) -> dict | None:
    """devinterp's ``param_masks`` ({parameter name: bool mask or None (all of it)}; parameters left out stay
    fixed) as ``fastllc.lm.estimate``'s ``restrict`` dict; None (or every trainable parameter unmasked): all."""
    if param_masks is None:
        return None
    if not isinstance(param_masks, dict):
        raise FastLLCError(f"param_masks must be a dict {{parameter name: bool mask or None}} (create_param_masks), "
                           f"got {type(param_masks).__name__}")
    params = dict(model.named_parameters())
    selection = {}
    for name, mask in param_masks.items():
        if name not in params:
            raise FastLLCError(f"param_masks names {name!r}, not a parameter of the model{closest_names(str(name), params)}")
        if params[name].requires_grad:  # devinterp leaves a frozen parameter's grad None: it never moves
            selection[name] = torch.ones(params[name].shape, dtype=torch.bool) if mask is None else mask
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not selection or not any(bool(torch.as_tensor(m).any()) for m in selection.values()):
        raise FastLLCError("param_masks selects no weight to sample (devinterp's optimizer refuses an empty "
                           "parameter list); select at least one, e.g. create_param_masks(model, 'l0h0')")
    if all(param_masks.get(n, 0) is None for n in trainable):
        return None
    return selection


def as_dataset(result, n_beta: float):
    """devinterp 2.0.1's ``compute_llc`` Dataset (its expressions and dtypes) from fastllc's ``LLCResult``;
    unhealthy chains are NaN in ``llc_per_chain`` and left out of the means (xarray skips NaN)."""
    import xarray as xr

    healthy = np.asarray(result.healthy, dtype=bool)
    trace = xr.DataArray(result.loss_trace.float().numpy(), dims=("chain", "step"))
    per_chain = (n_beta * (trace.mean(dim="step") - result.init_loss)).where(xr.DataArray(healthy, dims="chain"))
    kept = result.loss_trace.double()[torch.as_tensor(healthy)]
    scalar = n_beta * (float(kept.mean()) - result.init_loss) if healthy.any() else math.nan
    out = xr.Dataset({"llc_mean": per_chain.mean(), "llc_std": per_chain.std(), "llc_per_chain": per_chain,
                      "llc_scalar": scalar, "loss_trace": trace, "init_loss": result.init_loss,
                      "llc_se": result.llc_se, "llc_r_hat": result.r_hat, "llc_ess": result.ess,
                      "healthy": xr.DataArray(healthy, dims="chain")})
    out.attrs["fastllc"] = result.to_json()
    return out


# ---- output_path: this layer's cache, checked like devinterp's (sampling.py _check_cache) ------------------

def _record(settings: dict, restrict) -> dict:
    """What a cached result must have been made with: the sampler settings (as devinterp compares them) and,
    unlike devinterp, the weight restriction (a digest of its masks)."""
    record = {k: settings[k] for k in DEFAULTS if k not in ("output_path", "device", "save_metrics",
                                                              "batches_per_draw", "obs_seed")}
    loss_fn = settings.get("loss_fn")
    record.update(lr=settings["lr"], n_beta=settings["n_beta"],
                  sampling_method_kwargs=dict(settings["sampling_method_kwargs"] or {}) or None,
                  loss_fn=None if loss_fn is None else f"{getattr(loss_fn, '__module__', '')}."
                                                      f"{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}")
    if restrict is not None:
        digest = hashlib.sha256()
        for name in sorted(restrict):
            digest.update(name.encode() + torch.as_tensor(restrict[name]).bool().contiguous().numpy().tobytes())
        record["param_masks"] = digest.hexdigest()
    return json.loads(json.dumps(record, default=str))


def _cached(settings: dict, restrict):
    """The result cached at ``output_path`` (None if there is none); refused if made with other settings."""
    if settings["output_path"] is None or not Path(settings["output_path"]).exists():
        return None
    path = Path(settings["output_path"])
    try:
        saved = json.loads((path / _RESULT_FILE).read_text())
    except (OSError, ValueError):
        raise FastLLCError(f"output_path {path} exists but holds no readable fastllc result (a devinterp zarr "
                           f"store?); delete it (rm -rf '{path}') or choose another path") from None
    wanted = _record(settings, restrict)
    if saved.get("config") != wanted:
        differ = sorted(k for k in set(wanted) | set(saved.get("config", {}))
                        if wanted.get(k) != saved.get("config", {}).get(k))
        raise FastLLCError(f"output_path {path} has a result made with other settings ({', '.join(differ)}); "
                           f"delete and retry: rm -rf '{path}'")
    import xarray as xr

    out = xr.Dataset.from_dict(saved["dataset"])
    for name, dtype in saved["dtypes"].items():
        out[name] = out[name].astype(dtype)
    return out


def _store(settings: dict, restrict, out) -> None:
    if settings["output_path"] is None:
        return
    path = Path(settings["output_path"])
    storage.check_writable_dir(path, "output_path")
    path.mkdir(parents=True, exist_ok=True)
    record = {"config": _record(settings, restrict), "dataset": out.to_dict(data="list"),
              "dtypes": {name: str(v.dtype) for name, v in out.data_vars.items()}}
    storage.write_atomically(path / _RESULT_FILE, json.dumps(record))


# ---- create_param_masks: devinterp 2.0.1's weight_restrictions.py for the architectures fastllc.lm names ----

_GPT2 = dict(prefix="transformer.h", embed=("transformer.wte.weight",), unembed=("lm_head.weight",),
             attn=("attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias", "attn.c_proj.weight"),
             mlp=("mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "mlp.c_proj.weight"),
             heads={"attn.c_attn.bias": (0, "concat"), "attn.c_attn.weight": (1, "concat"),
                    "attn.c_proj.weight": (0, None)})
_NEOX = dict(prefix="gpt_neox.layers", embed=("gpt_neox.embed_in.weight",), unembed=("embed_out.weight",),
             attn=("attention.dense.bias", "attention.dense.weight", "attention.query_key_value.bias",
                   "attention.query_key_value.weight"),
             mlp=("mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_h_to_4h.bias",
                  "mlp.dense_h_to_4h.weight"),
             heads={"attention.dense.weight": (1, None), "attention.query_key_value.bias": (0, "interleaved"),
                    "attention.query_key_value.weight": (0, "interleaved")})
_LLAMA = dict(prefix="model.layers", embed=("model.embed_tokens.weight",), unembed=("lm_head.weight",),
              attn=("self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.weight",
                    "self_attn.v_proj.weight"),
              mlp=("mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"),
              heads={"self_attn.k_proj.weight": (0, None), "self_attn.o_proj.weight": (1, None),
                     "self_attn.q_proj.weight": (0, None), "self_attn.v_proj.weight": (0, None)})
_QWEN2 = dict(_LLAMA, attn=_LLAMA["attn"] + ("self_attn.k_proj.bias", "self_attn.q_proj.bias", "self_attn.v_proj.bias"),
              heads={**_LLAMA["heads"], **{f"self_attn.{p}_proj.bias": (0, None) for p in "qkv"}})
# TransformerLens keeps a head axis first on every attention weight, so a head is index h of dim 0. Two variants,
# as in devinterp: multi-head attention (W_K/W_V [heads, ...]) and grouped-query attention, whose keys and values
# are the parameters _W_K/_W_V [kv-heads, ...] (W_K/W_V are then properties that repeat them per head).
# "embed" is W_E only and "unembed" W_U/b_U only (not W_pos, not ln_final): devinterp's choice, kept.
_HOOKED_MHA = dict(prefix="blocks", embed=("embed.W_E",), unembed=("unembed.W_U", "unembed.b_U"),
                   attn=tuple(f"attn.{w}" for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")),
                   mlp=("mlp.W_in", "mlp.W_out", "mlp.W_gate", "mlp.b_in", "mlp.b_out"),
                   heads={f"attn.{w}": (0, None) for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")})
_HOOKED_GQA = dict(_HOOKED_MHA,
                   attn=tuple(f"attn.{w}" for w in ("W_Q", "_W_K", "_W_V", "W_O", "b_Q", "_b_K", "_b_V", "b_O")),
                   heads={f"attn.{w}": (0, None) for w in ("W_Q", "_W_K", "_W_V", "W_O", "b_Q", "_b_K", "_b_V")})
# devinterp 2.0.1's HEAD_STRUCTURES entries (devinterp/slt/_model_structures.py) for these model types; a tuple
# lists variants, of which the one naming most of the model's layer parameters applies (devinterp's _get_spec)
SPECS = {"gpt2": _GPT2, "gpt_neox": _NEOX, "llama": _LLAMA, "mistral": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
         "olmo": _LLAMA, "qwen2": _QWEN2, "hooked_transformer": (_HOOKED_MHA, _HOOKED_GQA)}


def create_param_masks(model, restriction) -> dict:
    """devinterp 2.0.1's ``create_param_masks``: ``"full"``, ``"l0"``, ``"l0h1"``, ``"l0g0"`` (a GQA group),
    ``"l0 attn"``, ``"l0 mlp"``, ``"embed"``, ``"unembed"``, a parameter name, or a list (masks ORed) →
    {parameter name: bool mask of its shape, or None for all of it}, in the model's parameter order; parameters
    left out stay fixed. Element for element devinterp's (e.g. ``"embed"`` is the token embedding only, and
    ``"unembed"`` of a tied GPT-2 selects nothing). Model types: those of ``SPECS``, by ``config.model_type``,
    and TransformerLens ``HookedTransformer``s (``"embed"`` is ``embed.W_E``, ``"unembed"`` ``unembed.W_U`` and
    ``b_U``; a head is index h of dim 0 of ``blocks.{l}.attn.W_Q``, ``W_K``, ``W_V``, ``W_O``, ``b_Q``, ``b_K``,
    ``b_V``, or of ``_W_K``... at h // (heads / kv-heads) under grouped-query attention)."""
    if isinstance(restriction, list):
        if "full" in restriction:
            raise FastLLCError("create_param_masks: cannot combine 'full' with other restrictions")
        return _merged([create_param_masks(model, r) for r in restriction])
    if not isinstance(restriction, str):
        raise FastLLCError(f"restriction must be a str or list[str], got {type(restriction).__name__}")
    restriction = restriction.strip()
    params = dict(model.named_parameters())
    if restriction == "full":
        return {name: None for name in params}
    spec, r = _spec(model), restriction.lower()
    if r in ("embed", "unembed"):
        return {name: None for name in params if any(name.endswith(k) for k in spec[r])}
    head = re.match(r"l(\d+)\s*([hg])(\d+)$", r)
    layer = re.match(r"l(\d+)(?:\s+(attn|mlp))?$", r)
    if head or layer:
        index = int((head or layer)[1])
        layers = _count_layers(params, spec)
        if index >= layers:
            raise FastLLCError(f"create_param_masks: layer {index} out of range (model has {layers} layers)")
    if head:
        return _head_masks(model, spec, params, index, head[2], int(head[3]))
    if layer:
        prefix = f"{spec['prefix']}.{index}."
        ends = spec[layer[2]] if layer[2] else ("",)
        return {name: None for name in params if name.startswith(prefix) and any(name.endswith(e) for e in ends)}
    if restriction in params:
        return {restriction: None}
    raise FastLLCError(f"create_param_masks: unknown restriction {restriction!r}; valid: 'full', 'l0', 'l0h1', 'l0g0', "
                       f"'l0 attn', 'l0 mlp', 'embed', 'unembed' or a parameter name{closest_names(restriction, params)}")


def _spec(model) -> dict:
    """The model's entry of ``SPECS``: ``hooked_transformer`` for a TransformerLens model (devinterp's test, a
    ``cfg`` with ``n_heads``), else by ``config.model_type``."""
    if is_hooked_transformer(model):
        model_type = "hooked_transformer"
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SPECS:
        raise FastLLCError(f"create_param_masks: model type {model_type!r} is not one fastllc.compat.devinterp2 knows "
                           f"({', '.join(sorted(SPECS))}); pass devinterp's own create_param_masks(...) as param_masks")
    entry = SPECS[model_type]
    return entry if isinstance(entry, dict) else _best_variant(entry, [name for name, _ in model.named_parameters()])


def _best_variant(variants: tuple, names: list[str]) -> dict:
    """The variant naming the most layer parameters (the first on a tie), as devinterp's _get_spec scores them:
    a parameter counts if it lies under the layer prefix and ends with one of the variant's attn, mlp or head
    names."""
    def score(spec):
        ends = tuple(set(spec["attn"]) | set(spec["mlp"]) | set(spec["heads"]))
        return sum(name.startswith(spec["prefix"] + ".") and name.endswith(ends) for name in names)
    return max(variants, key=score)  # max keeps the first of equal scores, as devinterp's strict > does


def _head_counts(model) -> tuple[int, int, int]:
    """(heads, d_model, kv-heads) as devinterp's _get_model_config reads them: TransformerLens's ``cfg`` or
    transformers' ``config``; kv-heads default to heads (no grouped-query attention)."""
    sizes = dimensions(model)
    return sizes.heads, sizes.width, sizes.kv_heads


def _count_layers(params, spec) -> int:
    layer = 0
    while any(name.startswith(f"{spec['prefix']}.{layer}.") for name in params):
        layer += 1
    return layer


def _head_masks(model, spec, params, layer: int, kind: str, index: int) -> dict:
    """Head (``kind`` "h") or GQA group ("g") ``index`` of ``layer``: devinterp's _head_masks/_group_masks."""
    heads, width, kv = _head_counts(model)
    if index >= (heads if kind == "h" else kv):
        what = "heads" if kind == "h" else "KV heads/groups"
        raise FastLLCError(f"create_param_masks: {'head' if kind == 'h' else 'group'} {index} out of range (model has "
                           f"{heads if kind == 'h' else kv} {what})")
    hd, prefix, masks = width // heads, f"{spec['prefix']}.{layer}.", {}
    for name, param in params.items():
        short = name[len(prefix):] if name.startswith(prefix) else None
        if short not in spec["heads"]:
            continue
        dim, fused = spec["heads"][short]
        mask = torch.zeros(param.shape[0] if param.dim() == 1 else param.shape[dim], dtype=torch.bool)
        _mark(mask, kind, index, fused, heads, kv, hd)
        if param.dim() > 1:
            shape = [1] * param.dim()
            shape[dim] = -1
            mask = mask.view(*shape).expand_as(param)
        masks[name] = mask
    return masks


def _mark(mask, kind, index, fused, heads, kv, hd) -> None:
    """Set head/group ``index``'s entries of one axis (devinterp's layouts: interleaved q|k|v per head for
    GPT-NeoX, q then k then v for GPT-2, separate projections otherwise)."""
    size = mask.shape[0]
    if kind == "h":
        kv_head = index * kv // heads
        if fused == "interleaved":
            mask.view(heads, 3, hd)[index] = True
        elif fused == "concat":
            q, rest = mask.split([heads * hd, size - heads * hd])
            q.view(heads, hd)[index] = True
            rest.view(2, kv, hd)[:, kv_head] = True
        elif size in (kv * hd, kv):
            mask.view(kv, -1)[kv_head] = True
        else:
            mask.view(heads, -1)[index] = True
    elif fused == "concat":
        q, rest = mask.split([heads * hd, size - heads * hd])
        q.view(kv, heads // kv, hd)[index] = True
        rest.view(2, kv, hd)[:, index] = True
    else:
        mask.view(kv, -1)[index] = True


def _merged(masks_list: list[dict]) -> dict:
    """devinterp's _merge_param_masks: a parameter unmasked in any is unmasked; masks ORed; first-seen order."""
    if len(masks_list) == 1:
        return masks_list[0]
    merged = {}
    for name in dict.fromkeys(n for m in masks_list for n in m):
        entries = [m[name] for m in masks_list if name in m]
        if any(e is None for e in entries):
            merged[name] = None
        else:
            merged[name] = entries[0]
            for e in entries[1:]:
                merged[name] = torch.logical_or(merged[name], e)
    return merged


__all__ = ["llc", "create_param_masks", "as_dataset", "param_mask_selection", "SPECS"]
