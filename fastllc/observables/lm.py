"""Probes of a causal language model: per-token losses of named token sets at every draw (``observe_lm``).

The model runs as ``fastllc.lm`` runs it (``CausalLM``: tokens [B, T] → next-token logits [B, T−1, V], inside
``sampling_mode``: eval, eager attention, fused tanh-GELU, all restored afterwards), its chains follow the
next-token loss on ``tokens`` and every probe set is N_o sequences of the same length T: K = T − 1 token losses
per sequence (cross-entropy of token t+1 given tokens ≤ t), masked tokens (``loss_masks``) weigh 0. Restrictions
are ``fastllc.lm`` names (``"l0 attn"``, ``"l1h2"``, ``"l0 mlp"``, ``"embed"``, parameter names or globs, lists),
a {parameter name: bool mask} dict over the Hugging Face model's own names, or ``None`` (every weight). The chains'
memory is planned as ``fastllc.lm.estimate_groups`` plans it (parts run one after another when the batch does not
fit ``max_memory``); the probes add about probe_batch·(T−1)·V·4·3 bytes per chain of a group while evaluated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import sgld_config
from ..errors import FastLLCError
from ..lm.api import PREFIX, init_loss_at, language_model
from ..lm.data import IGNORE, token_data
from ..lm.memory import plan
from ..lm.models import load_causal_lm, sampling_mode
from ..lm.names import name_mask
from ..validate import check_bool
from .recording import Draws, Recorder, make_probes
from .run import LOG, ObservedRun, restriction_masks, sample_groups


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy [B, T−1] (0 where the target is IGNORE)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none")
    return flat.view(targets.shape)


def given_token_losses(outputs: torch.Tensor, _targets) -> torch.Tensor:
    """The element loss when the module already returns per-token losses [B, T−1] (``TokenLossLM``: a custom
    ``token_loss``): its outputs, as they are."""
    return outputs


def lm_probes(probes: dict, vocab_size, loss_masks: dict | None = None, element_loss=token_losses):
    """{name: token data} (a LongTensor [N, T], a dataset with ``input_ids``, a DataLoader) as ``Probes`` of
    per-token losses (``element_loss``: the cross-entropy of the logits, or ``given_token_losses``)."""
    if not isinstance(probes, dict) or not probes:
        raise FastLLCError("probes must be a non-empty dict {name: token ids [N, T]}")
    sets, weights = {}, {}
    for name, tokens in probes.items():
        data = token_data(tokens, (loss_masks or {}).get(name), vocab_size=vocab_size)
        sets[name] = (data.tokens, data.targets)
        weights[name] = (data.targets != IGNORE).double()
    return make_probes(sets, element_loss, weights)


def lm_restrictions(model, lm, restrictions) -> dict:
    """{name: bool mask [d] over ``lm``'s weights}: names as ``fastllc.lm`` reads them (module docstring)."""
    if not isinstance(restrictions, dict) or not restrictions:
        raise FastLLCError("restrictions must be a non-empty dict {name: part names, {param: mask} or None}")
    selections = {}
    for name, what in restrictions.items():
        if what is None:
            selections[name] = None
        elif isinstance(what, dict):
            selections[name] = {PREFIX + key: mask for key, mask in what.items()}
        else:
            selections[name] = {PREFIX + key: mask for key, mask in
                                name_mask(model, what, label=f"restrictions[{name!r}]").items()}
    return restriction_masks(lm, selections)


def observe_lm(model, tokens, probes: dict, config=None, *, restrictions=None, loss_mask=None,
               probe_loss_masks: dict | None = None, init_sequences: int | None = None, init_loss: float | None = None,
               token_moments: bool = False, chain_mean: bool = False, raw=None, probe_batch: int = 32,
               attention: str | None = "eager", fused_gelu: bool = True, max_memory: int | None = None,
               dropout: bool = False, draws: Draws | None = None, backend: str = "auto", device="cpu",
               randomness=None, progress: bool = False, token_loss=None, **settings) -> ObservedRun:
    """Every restriction's chains (default ``{"full": None}``) of the causal LM ``model`` (or a local directory)
    in one batched run on ``tokens``, the probe token sets ``probes`` {name: [N_o, T]} recorded at every draw (per
    token). L_n(w*) as ``fastllc.lm.estimate`` computes it (over ``init_sequences``; ``init_loss`` overrides).
    Settings: an ``SGLDConfig`` or its fields (``chains`` per restriction). ``dropout=True``: the model in training
    mode (dropout on, for the chains and the probes: devinterp's choice). ``draws``: when the probes are evaluated
    (default: λ̂'s records). ``backend="auto"``: ``transformer`` for the families it writes with dropout off (as
    ``fastllc.lm``), else ``generic``; both evaluate the probes through the module. ``token_loss``: a function
    (model, input_ids [B, T]) → per-token loss [B, T−1] replacing the next-token cross-entropy everywhere, as
    ``fastllc.lm.estimate`` takes it (devinterp 2's ``loss_fn``): the chains follow the mean of its entries, the
    probes record its entries, L_n(w*) is their mean (backend ``generic``). Other arguments: ``observe``."""
    model = load_causal_lm(model)
    lm, chain_loss = language_model(model, token_loss)
    element_loss = token_losses if token_loss is None else given_token_losses
    data = token_data(tokens, loss_mask, vocab_size=lm.vocab_size)
    config = sgld_config(config, settings)
    found = lm_probes(probes, lm.vocab_size, probe_loss_masks, element_loss)
    masks = lm_restrictions(model, lm, restrictions if restrictions is not None else {"full": None})
    total = config.chains * len(masks)
    chosen = plan(model, total, config.batch_size, len(data), data.tokens.shape[1], config.sampler, max_memory,
                  config.orthogonal)
    LOG.info(chosen.describe())
    recorder = Recorder(found, draws or Draws(config.steps, config.burn_in, config.thin),
                        {n: (g * config.chains, (g + 1) * config.chains) for g, n in enumerate(masks)},
                        token_moments=token_moments, chain_mean=chain_mean, raw=raw, probe_batch=probe_batch,
                        max_memory=max_memory)
    with sampling_mode(model, attention, fused_gelu):
        model.train(check_bool("dropout", dropout))  # sampling_mode restores every module's mode afterwards
        init = float(init_loss) if init_loss is not None else init_loss_at(lm, data, init_sequences)
        return sample_groups(lm, *data.pair, chain_loss, config, masks, recorder, init_loss=init,
                             backend=backend, device=device, randomness=randomness, progress=progress,
                             parts=chosen.groups)


__all__ = ["given_token_losses", "lm_probes", "lm_restrictions", "observe_lm", "token_losses"]
