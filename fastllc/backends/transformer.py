"""Backend ``transformer``: transformer causal LMs of known families (``fastllc/engines/transformer.py``: GPT-2, GPT-NeoX,
Llama), every chain folded into the batch dimension.

What ``generic`` does with ``torch.func.vmap``, written out: chain c's weights are the [C, *shape] views of
the parameter-major buffer W (``sampling/layout.py``), each a leaf of autograd; the engine evaluates all
chains' minibatches [C, m, T] as one batched forward (a ``baddbmm`` per linear layer, attention over the
folded batch [C·m·heads, T, d_head]) to the per-chain losses L_m [C]; one backward of their sum gives every
chain's ∇L_m (chains share nothing, so each chain's gradient is its own loss's). Where the engine writes the
backward out (``writes_gradients``: GPT-2 with the tanh-GELU), it writes ∇L_m straight into G's views, in
buffers its group keeps from step to step (``Workspace``), and autograd is not used. Then, as in ``generic``, G =
gradient_factor·∇L_m and the sampler's batched update ``update(G, ξ, projection)``, with the counter-based
noise written straight into the same layout. ``restrict`` is ``generic``'s own code (its ``ChainWeights``):
∇L_m zeroed outside the mask before the update reads it, w* copied back into the fixed weights after every
step. ``observe`` (``fastllc/observables/recording.py``) is ``generic``'s hook, called as ``generic`` calls it: at
the draws it asks for (``observe.due(t)``), before step t's update, once per folded batch with that batch's chain
indices, its group's own module copy, the parameter names and the batch's weight views at w_t,
``observe(t, ids, model, names, weights)``; the recorder evaluates its probes through the Hugging Face module
(``vmap`` over ``functional_call``), so the values are ``generic``'s at the same weights. Without it the loop is
unchanged (one ``is not None`` test a step). Not here: the MALA acceptance (``mala=True`` goes to ``generic``), the
study's chain loss (it needs ``F.cross_entropy``), several starting points in one batch.

Which models: a ``fastllc.lm.CausalLM`` (what ``fastllc.lm.estimate`` builds) around a family the engine
writes, with ``fastllc.lm.next_token_loss``, float32 weights, all trainable, dropout off (eval mode, as
``lm.sampling_mode`` sets it) or, for GPT-2 with the tanh-GELU, on (``dropout=True``: the written pass draws the
masks, each chain group from a generator of its own seeded by one draw from torch's global generator and its first
chain, for its folded batches in turn: a run repeats bit for bit with the same seed, number of groups and chains per
folded batch (``workers``, ``per_batch``: chosen from the machine's cores and the model's shape), but a chain's masks,
unlike its noise and minibatches, depend on which chains run beside it). ``supports`` says False for anything else, so ``auto`` gives it to
``generic``; ``require`` says why in one line.

On the CPU the chains run in groups, one per core, each in its own thread with single-threaded torch ops
(``sampling/threads.py``), as every torch-based backend does.

Measured and not adopted: replaying the step as a recorded graph (``make_fx``, as ``generic`` does) was
bit-identical and 3–15% faster per step on the bench's tiny GPT-2, for 0.4–0.8 s of tracing per group (it
would pay from several hundred steps; TorchScript cannot hold the graph: ``native_layer_norm_backward``'s
None arguments); ``torch.compile``: ``engines/transformer.py``.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from ..errors import FastLLCError
from ..sampling.config import SGLDConfig
from ..sampling.contract import Samples, chain_loss_fn, nan_from_first_non_finite
from ..sampling.chains import ChainWeights, chain_rows, prepare_model_run
from ..sampling.layout import StepDraws
from ..sampling.threads import chain_groups, run_groups_timed

NAME = "transformer"
CAPABILITIES = frozenset({"samplers", "restrict", "observe"})
DEVICES = ("cpu",)
AUTO_PRIORITY = 25  # before generic (30): the same chains of the models it knows, without vmap

# A group of a single chain still pays for its own thread: 2 chains as two groups of one ran at 136–139 chain-steps/s
# against 78–95 as one group of two (tiny GPT-2 of the bench, 2 cores, load 3); so one group per core at any count.
MIN_CHAINS_PER_GROUP = 1
# A group folds its chains into batches of at most this many bytes of its widest activation, run one after another
# each step: per chain-step of one thread on the bench's tiny GPT-2 (512 KiB of MLP activations per chain), 4 chains
# a batch took 7.6–8.1 ms, 2 took 7.7–8.7, 1 took 8.2–9.1 and 8 took 9.4–9.5 (element-wise passes out of cache).
BATCH_BYTES = 2 << 20


def _unsupported(model, loss_fn, device) -> str | None:
    if device is not None and torch.device(device).type not in DEVICES:
        return f"the transformer backend runs on the CPU, not {torch.device(device).type}; use backend='generic'"
    if model is None:
        return "the transformer backend runs transformer language models, not the study's MLP"
    from ..engines import transformer as engine
    return engine.unsupported(model, loss_fn)


def supports(model, loss_fn, device=None) -> bool:
    """A ``fastllc.lm.CausalLM`` of a family ``engines/transformer.py`` writes, with ``next_token_loss`` (module docstring)."""
    return _unsupported(model, loss_fn, device) is None


def require(device, model=None, loss_fn=None) -> None:
    """The one-line reason this backend cannot run ``model`` (when given) on ``device``, else nothing."""
    if device is not None and torch.device(device).type not in DEVICES:
        raise FastLLCError(_unsupported(None, None, device))
    if model is not None:
        reason = _unsupported(model, loss_fn, device)
        if reason:
            raise FastLLCError(reason)


class _Batch:
    """Chains ``ids`` of a group folded into one batch: their weights (``sampling/chains.py``'s ``ChainWeights``: the
    parameter-major buffer, the sampler's update, ``restrict``), autograd leaves viewing them, and their draws."""

    def __init__(self, ids: np.ndarray, shapes, w_star, hyper, direction, moves, config: SGLDConfig, device):
        C, d = len(ids), w_star.numel()
        self.ids, self.m = ids, config.batch_size
        self.chains = chains = ChainWeights(w_star.to(device).expand(C, d), shapes, *(v[ids] for v in hyper),
                                             config.sampler_object(), device)
        if moves is not None:
            chains.restrict(chain_rows(moves, ids))
        self.projection = None
        if direction is not None:
            rows = chains.to_parameter_major(chain_rows(direction, ids).to(device).expand(C, d))
            self.projection = (chains.rows(chains.G), chains.rows(rows))
        self.leaves = [view.detach().requires_grad_() for view in chains.weights]  # W's storage: see every update
        self.grads = chains.views(chains.G)  # where a hand-written backward writes ∇L_m
        self.draws = StepDraws(C, config.batch_size, d, device)

    def step(self, t: int, engine, inputs, targets, randomness, workspace) -> torch.Tensor:
        """Step t of every chain of the batch; L_m(w_t) [C]. ``workspace``: the group's buffers (``Workspace``)."""
        C, chains = len(self.ids), self.chains
        indices, noise = self.draws.draw(randomness, self.ids, t, chains.blocks)
        flat = indices.view(-1)
        tokens, predicted = (v.index_select(0, flat).view(C, self.m, -1) for v in (inputs, targets))
        if getattr(engine, "writes_gradients", False):
            loss = engine.losses_and_gradients(chains.weights, self.grads, tokens, predicted, workspace)
        else:
            loss = engine.losses(self.leaves, tokens, predicted)
            grads = torch.autograd.grad(loss.sum(), self.leaves)
            torch.cat([g.reshape(-1) for g in grads], out=chains.G)
        if chains.frozen is not None:  # ∇L_m in the restricted space, before the update reads it
            chains.frozen.zero(chains.G)
        chains.step(noise, self.projection)
        return loss.detach()


def _run_group(ids: np.ndarray, engine, per_batch: int, inputs, targets, config: SGLDConfig, randomness, tick,
               observe=None, model=None, names=None, dropout_seed=None, **batch):
    """SGLD for the chains ``ids`` in folded batches of at most ``per_batch`` chains, one after another each step:
    (loss trace [T, C], final weights [C, d] chain-major). ``observe``: called at its draws with every batch's
    weights at w_t, through ``model`` (this group's own module copy) and ``names`` (module docstring)."""
    from ..engines import transformer as lm_engine
    batches = [_Batch(part, config=config, **batch) for part in np.array_split(ids, -(-len(ids) // per_batch))]
    # the batches run one after another: one set of buffers serves them all; dropout masks from a generator of this
    # group's own, keyed by its first chain, so that a run is reproducible whichever thread runs first
    generator = None if dropout_seed is None else torch.Generator().manual_seed(dropout_seed + int(ids[0]))
    workspace = lm_engine.Workspace(generator)
    T = config.steps
    losses = torch.empty(T, len(ids), device=batch["device"])
    report_every = max(1, T // 100)
    for t in range(T):
        if observe is not None and observe.due(t):  # every batch's weights are w_t until its step below
            for b in batches:
                observe(t, b.ids, model, names, b.chains.weights)
        losses[t] = torch.cat([b.step(t, engine, inputs, targets, randomness, workspace) for b in batches])
        if (t + 1) % report_every == 0:
            tick(len(ids) * report_every)
    finals = torch.cat([b.chains.to_chain_major(b.chains.W) for b in batches])
    return losses.cpu(), finals.cpu()


def _private_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module tree copied, sharing every parameter and buffer tensor: ``functional_call`` (the recorder's)
    swaps weights on module objects, so concurrent groups need their own (None if the model cannot be copied)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo=shared)
    except Exception:  # an attribute that cannot be copied: the caller runs one group
        return None


def _group_models(model, groups: list, observe):
    """(groups, {group: its module}): each group its own copy when observed (one group if it cannot be copied)."""
    if observe is None:
        return groups, dict.fromkeys(groups, model)
    models = [model] + [_private_copy(model) for _ in groups[1:]]
    if any(copy_ is None for copy_ in models):
        groups, models = [(0, groups[-1][1])], [model]
    return groups, dict(zip(groups, models))


def chains_per_batch(engine, m: int, T: int) -> int:
    """How many chains a folded batch holds: its widest activation (``engine.widest``: the MLP's hidden units,
    q | k | v or the attention scores, per token) within ``BATCH_BYTES``."""
    return max(1, BATCH_BYTES // (4 * m * T * engine.widest(T)))


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, init_loss: float | None = None,
           workers: int | None = None, per_batch: int | None = None, observe=None) -> Samples:
    """``init_loss``: L_n(w*) when the caller knows it (no pass over the data is made for it; ∇L_n(w*) only
    under the orthogonal restriction). ``workers``: the number of chain groups (default one per core);
    ``per_batch``: chains per folded batch (default ``chains_per_batch``); both for tests and measurements.
    ``observe``: called at its draws (module docstring)."""
    from ..engines import transformer as lm_engine
    config.validate()
    device = torch.device(device)
    require(device, model, loss_fn)
    chain_loss_fn(loss_fn, config)  # the study's chain loss needs F.cross_entropy: refused in one line
    if config.mala:
        raise FastLLCError("the transformer backend does not record the MALA acceptance; use backend='generic'")
    model, inputs, targets, hyper, names, shapes, w_star, init_loss, moves, direction, randomness = prepare_model_run(
        model, inputs, targets, loss_fn, config, restrict=restrict, init_loss=init_loss, randomness=randomness,
        device=device)
    C, T = config.chains, config.steps
    if observe is not None:
        observe.begin(C, T, device)

    groups = chain_groups(C, device, min_per_group=MIN_CHAINS_PER_GROUP, groups=workers or None)
    groups, model_of = _group_models(model, groups, observe)
    engine = lm_engine.build(model, names)
    per_batch = per_batch or chains_per_batch(engine, config.batch_size, inputs.shape[1])
    # dropout (GPT-2 in training mode): one draw from torch's global generator seeds every group's masks
    dropout = getattr(engine, "dropout", None)
    dropout_seed = int(torch.randint(2**62, (1,))) if dropout is not None and any(vars(dropout).values()) else None
    run = functools.partial(_run_group, engine=engine, per_batch=per_batch, inputs=inputs, targets=targets,
                            dropout_seed=dropout_seed,
                            config=config, randomness=randomness, shapes=shapes, w_star=w_star, hyper=hyper,
                            direction=direction, moves=moves, device=device, observe=observe, names=names)
    results, seconds = run_groups_timed(
        lambda lo, hi, tick: run(np.arange(lo, hi, dtype=np.int64), tick=tick, model=model_of[lo, hi]),
        groups, total=C * T, desc=f"SGLD (transformer, {C} chains)", progress=progress)
    losses = nan_from_first_non_finite(torch.cat([r[0] for r in results], dim=1).T.double())
    return Samples(losses, init_loss, *hyper, NAME, str(device), seconds, torch.cat([r[1] for r in results]))
