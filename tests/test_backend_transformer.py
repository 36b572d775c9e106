"""Backend ``transformer`` (``fastllc/engines/transformer.py``: GPT-2, GPT-NeoX and Llama with the chains folded into the
batch): the engine is the Hugging Face model's own function (loss and gradient, every family and option); the
chains follow the reference parameter by parameter under the same injected draws (plain, orthogonal, a mask for
all chains or one per chain, the other samplers; tests/test_conformance.py adds every variant on its one-block
GPT-2); chain groups and folded batches change no chain; what it refuses, in one line; ``fastllc.lm`` picks it.

Tolerance. conformance's τ = 2·steps·eps(float32) on |ours − reference| / max(1, |reference|)
(``fastllc/conformance.py`` derives it: both sides compute the same update from the same draws in float32, each
step rounds a weight at most twice, and the order of the sums changes ∇L_m by a few units of roundoff that the
step scales by ε·nβ/2 ≤ 0.02, far below an ulp of w). It holds here unchanged: the engine's operations are the
module's, only blocked differently (a batched matmul per chain instead of one per call, the attention's scale
inside the score product, GELU as x·σ(2u) instead of ½x(1 + tanh u)), which moves each activation, and so
∇L_m, by a few ulps, scaled by the same ε·nβ/2. The engine's own loss and gradient against the module's: a few
ulps of each activation, summed over two layers (``LOSS_ULPS`` = 16 eps, relative)."""

import pytest
import torch
import torch.nn.functional as F

import fastllc.lm as lm
from fastllc import FastLLCError, ModularMLP, SGLDConfig, conformance
from fastllc.backends import generic, reference, resolve_backend, transformer
from fastllc.engines import transformer as engine
from fastllc.engines import transformer_cpu
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters, unflatten

from lm_models import gpt2, llama, neox, tokens

CHAINS, STEPS, M = 3, conformance.STEPS, 4
LOSS_ULPS = 16 * torch.finfo(torch.float32).eps  # relative: a few ulps of each activation, summed over 2 layers
VARIANTS = {  # conformance's settings (PER_CHAIN: ε·nβ/2 ≤ 0.02), by the capability each needs
    "sgld": dict(),
    "orthogonal": dict(orthogonal=True),
    "restrict": dict(orthogonal=True, mask="shared"),
    "restrict_per_chain": dict(orthogonal=True, mask="per_chain"),
    "rmsprop_sgld": dict(sampler="rmsprop_sgld", orthogonal=True),
    "preconditioned_sgld_restrict": dict(sampler="preconditioned_sgld", orthogonal=True, mask="per_chain"),
}


FAMILIES = {"gpt2": gpt2, "neox": neox, "llama": llama, "llama-gqa": lambda: llama(kv_heads=2),
            "neox-sequential": lambda: neox_sequential()}


def causal_lm(**config):
    return lm.CausalLM(gpt2(**config)).eval()


def neox_sequential():
    """GPT-NeoX with a sequential residual and rotary embeddings over whole heads (the defaults are parallel, 25%)."""
    import transformers
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                        vocab_size=32, max_position_embeddings=16, use_parallel_residual=False,
                                        rotary_pct=1.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def run(backend, model, settings, restrict=None, **options):
    data = lm.token_data(tokens(24))
    d = flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(CHAINS, STEPS, len(data), M, d, seed=2)
    keywords = {"restrict": restrict} if restrict is not None else {}
    with lm.sampling_mode(model.model):
        return backend.sample(model, *data.pair, lm.next_token_loss, settings, randomness=noise, **keywords, **options)


def config(variant: str, d: int) -> SGLDConfig:
    settings = {k: v for k, v in VARIANTS[variant].items() if k != "mask"}
    per_chain = dict(conformance.PER_CHAIN)
    if "sampler" in settings:  # a preconditioner up to 1/δ: ε ten times smaller, as conformance runs them
        from fastllc.sampling import samplers
        settings["sampler"] = samplers.sampler_class(settings["sampler"]).example(d)
        per_chain["epsilon"] = [e / 10 for e in per_chain["epsilon"]]
    return SGLDConfig(chains=CHAINS, steps=STEPS, batch_size=M, **per_chain, **settings)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_chains_follow_the_reference(variant):
    model = causal_lm()
    w_star = flat_parameters(model)[2]
    settings = config(variant, w_star.numel())
    kind = VARIANTS[variant].get("mask")
    keep = None if kind is None else conformance.mask(variant if kind == "shared" else "restrict_per_chain",
                                                       w_star.numel(), CHAINS)
    ref = run(reference, model, settings, keep)
    ours = run(transformer, model, settings, keep, workers=2)  # chain groups of 2 and 1: threads too
    assert ours.backend == "transformer" and (ref.final_params - w_star).abs().max() > conformance.MOVED
    outcome = conformance.assert_follows(ours, ref, STEPS)
    assert conformance.relative_error(torch.tensor(ours.init_loss), torch.tensor(ref.init_loss)) <= LOSS_ULPS, outcome
    if keep is not None:  # the fixed weights at w* bit for bit
        fixed = ~keep.expand(CHAINS, -1)
        assert torch.equal(ours.final_params[fixed], w_star.expand(CHAINS, -1)[fixed])


@pytest.mark.parametrize("family", ["neox", "llama-gqa"])
def test_the_other_families_follow_the_reference(family):
    """GPT-NeoX (parallel residual, partial rotary) and Llama (RMSNorm, grouped-query attention, padding row)
    under a restriction per chain and the orthogonal one."""
    model = lm.CausalLM(FAMILIES[family]()).eval()
    w_star = flat_parameters(model)[2]
    settings = config("restrict_per_chain", w_star.numel())
    keep = conformance.mask("restrict_per_chain", w_star.numel())
    ref, ours = run(reference, model, settings, keep), run(transformer, model, settings, keep, workers=2)
    assert (ref.final_params - w_star).abs().max() > conformance.MOVED
    conformance.assert_follows(ours, ref, STEPS)
    assert torch.equal(ours.final_params[~keep], w_star.expand(CHAINS, -1)[~keep])


def test_the_tanh_gelu_and_its_derivative():
    """Against float64 over [−12, 12] and typical pre-activations: the value to 2 ulps of max(1, |y|) (measured
    1.3, as F.gelu's own), the derivative to 32 (measured 16.5, F.gelu's 8.7: σ + x·σ(1 − σ)·2u' cancels for
    negative x); errors of ∇L_m that small are scaled by ε·nβ/2 before they reach a weight."""
    x = torch.cat([torch.linspace(-12, 12, 20001), 0.3 * torch.randn(10000)]).requires_grad_()
    y = engine.TanhGELU.apply(x)
    (slope,) = torch.autograd.grad(y, x, torch.ones_like(y))
    exact = x.detach().double().requires_grad_()
    y64 = F.gelu(exact, approximate="tanh")
    (slope64,) = torch.autograd.grad(y64, exact, torch.ones_like(y64))
    eps = torch.finfo(torch.float32).eps
    assert conformance.relative_error(y.detach(), y64.detach()) <= 2 * eps
    assert conformance.relative_error(slope, slope64) <= 32 * eps


@pytest.mark.parametrize("options", [dict(), dict(activation_function="gelu"), dict(activation_function="relu"),
                                     dict(tie_word_embeddings=False), dict(scale_attn_by_inverse_layer_idx=True),
                                     dict(scale_attn_weights=False, n_inner=48)],
                         ids=["default", "gelu", "relu", "untied", "scaled-by-layer", "unscaled-n_inner"])
def test_the_engine_is_the_models_function(options):
    """Each chain's loss from the folded forward and its gradient equal the module's next-token loss and its
    gradient at that chain's weights, with some positions not predicted (IGNORE)."""
    assert_engine_is_the_models_function(causal_lm(**options))


@pytest.mark.parametrize("family", ["neox", "neox-sequential", "llama", "llama-gqa"])
def test_the_engine_is_the_models_function_and_gradient_in_every_family(family):
    """Loss and ∇L of each chain, Llama's padding row included (nn.Embedding gives it no gradient from the
    lookup; token 0 is Llama's padding token here and occurs in the data)."""
    assert_engine_is_the_models_function(lm.CausalLM(FAMILIES[family]()).eval())


def assert_engine_is_the_models_function(model):
    names, shapes, w_star = flat_parameters(model)
    chains = 3
    weights = w_star + 0.05 * torch.randn(chains, w_star.numel())
    toks = tokens(chains * 5).view(chains, 5, -1)
    targets = toks[:, :, 1:].clone()
    targets[0, 1, :4] = lm.IGNORE
    stacked = [torch.stack([unflatten(w, names, shapes)[name] for w in weights]).requires_grad_() for name in names]
    ours = engine.build(model, names).losses(stacked, toks, targets)
    ours_grad = torch.cat([g.reshape(chains, -1) for g in torch.autograd.grad(ours.sum(), stacked)], dim=1)
    theirs, theirs_grad = [], []
    with lm.sampling_mode(model.model):
        for w, x, y in zip(weights, toks, targets):
            w = w.clone().requires_grad_()
            loss = lm.next_token_loss(torch.func.functional_call(model, unflatten(w, names, shapes), (x,)), y)
            theirs.append(loss.detach())
            theirs_grad.append(torch.autograd.grad(loss, w)[0])
    assert conformance.relative_error(ours.detach(), torch.stack(theirs)) <= LOSS_ULPS
    theirs_grad = torch.stack(theirs_grad)  # flat order, a row per chain: a few ulps of the largest entry
    assert float((ours_grad - theirs_grad).abs().max() / theirs_grad.abs().max()) <= LOSS_ULPS


@pytest.mark.parametrize("options", [dict(), dict(tie_word_embeddings=False), dict(scale_attn_by_inverse_layer_idx=True),
                                     dict(scale_attn_weights=False, n_inner=48)],
                         ids=["default", "untied", "scaled-by-layer", "unscaled-n_inner"])
@pytest.mark.parametrize("kernels", ["native", "aten"])
def test_the_hand_written_gradient_is_autograds(options, kernels):
    """GPT-2's ``losses_and_gradients`` (no autograd) against autograd through ``losses`` at the same weights: the
    loss to a few ulps (the last position's logits are computed, and ignored), every gradient element to a few ulps
    of the largest (the same operations, some products against a transposed copy of W, the tied table's two
    gradients summed as autograd sums them). Awkward shape: 5 sequences of 13 tokens (fewer than the 16 positions, so
    rows 13–15 of the position table get zero), some targets IGNORE; the gradient buffer filled with NaN first
    catches any element not written. Both ways: the fused CPU passes (``engines/transformer_cpu.py``, where they
    build) and ATen's operations."""
    model = causal_lm(**options)
    names, shapes, w_star = flat_parameters(model)
    chains = 3
    weights = w_star + 0.05 * torch.randn(chains, w_star.numel(), generator=torch.Generator().manual_seed(1))
    toks = tokens(chains * 5, length=13, seed=3).view(chains, 5, -1)
    targets = toks[:, :, 1:].clone()
    targets[1, 2, 3:7] = lm.IGNORE
    stacked = [torch.stack([unflatten(w, names, shapes)[name] for w in weights]) for name in names]
    built = engine.build(model, names)
    assert built.writes_gradients
    if kernels == "aten":
        built.kernels = None
    elif built.kernels is None:
        pytest.skip(f"the fused CPU passes cannot be built here: {transformer_cpu.unavailable()}")
    leaves = [w.clone().requires_grad_() for w in stacked]
    theirs = built.losses(leaves, toks, targets)
    theirs_grad = torch.cat([g.reshape(chains, -1) for g in torch.autograd.grad(theirs.sum(), leaves)], dim=1)
    grads = [torch.full_like(w, float("nan")) for w in stacked]
    workspace = engine.Workspace()
    for _ in range(2):  # the second time through buffers the first one left behind
        ours = built.losses_and_gradients(stacked, grads, toks, targets, workspace)
        ours_grad = torch.cat([g.reshape(chains, -1) for g in grads], dim=1)
        assert not ours_grad.isnan().any()
        assert conformance.relative_error(ours, theirs.detach()) <= LOSS_ULPS
        assert float((ours_grad - theirs_grad).abs().max() / theirs_grad.abs().max()) <= LOSS_ULPS
    rows_unused = grads[names.index("model.transformer.wpe.weight")][:, 13:]
    assert torch.equal(rows_unused, torch.zeros_like(rows_unused))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_other_activations_keep_autograd(activation):
    """The hand-written backward knows the tanh-GELU's slope only; other activations differentiate by autograd."""
    model = causal_lm(activation_function=activation)
    assert not engine.build(model, flat_parameters(model)[0]).writes_gradients


def test_the_buffered_tanh_gelu_is_tanh_gelus_forward():
    """``tanh_gelu_into`` runs ``TanhGELU.forward``'s operations in the same order: the same bits, value and slope."""
    x = torch.cat([torch.linspace(-12, 12, 2001), 0.3 * torch.randn(1000)]).requires_grad_()
    y = engine.TanhGELU.apply(x)
    (slope,) = torch.autograd.grad(y, x, torch.ones_like(y))
    buffers = [torch.empty_like(x, requires_grad=False) for _ in range(3)]
    engine.tanh_gelu_into(x.detach().clone(), *buffers)
    assert torch.equal(buffers[0], y.detach()) and torch.equal(buffers[1], slope)


def test_observe_records_generics_probe_losses(tmp_path):
    """``observe``: the same draws and the same per-token probe losses as ``generic`` on the same chains (injected
    draws, a restriction per chain, the orthogonal one; groups of 2 and 1, folded batches of one chain each: the
    recorder is called per batch, each group through its own module copy). Tolerance: conformance's τ relative
    (max(1, |x|)), as on the loss traces: both backends' chains agree to τ and the recorder evaluates the same
    module function (vmap over functional_call) at them, so a probe loss is one more loss of weights agreeing to τ
    (measured: 1.3 eps)."""
    from fastllc.observables import open_draws
    from fastllc.observables.lm import lm_probes
    from fastllc.observables.recording import Draws, Recorder
    model = causal_lm()
    d = flat_parameters(model)[2].numel()
    probes = lm_probes({"a": tokens(3, seed=1), "b": tokens(2, seed=2)}, model.vocab_size)
    keep = conformance.mask("restrict_per_chain", d, CHAINS)
    settings = config("restrict_per_chain", d)
    draws, seen = {}, {}
    for backend, options in ((generic, {}), (transformer, dict(workers=2, per_batch=1))):
        recorder = Recorder(probes, Draws(STEPS, burn_in=1, thin=2), {"all": (0, CHAINS)},
                            raw=tmp_path / f"{backend.NAME}.npz")
        seen[backend.NAME] = run(backend, model, settings, keep, observe=recorder, **options)
        path = recorder.finish()[1]
        draws[backend.NAME] = torch.from_numpy(open_draws(path).losses.copy())
    assert seen["transformer"].backend == "transformer" and draws["generic"].shape == (CHAINS, 3, 5, 15)
    assert (draws["generic"][:, -1] - draws["generic"][:, 0]).abs().max() > conformance.MOVED  # the probes moved
    assert conformance.relative_error(draws["transformer"], draws["generic"]) <= conformance.tolerance()


def test_chain_groups_change_no_chain():
    """A chain follows the same path whatever chains share its group or its folded batch (counter-based draws)."""
    model, data = causal_lm(), lm.token_data(tokens(24))
    settings = SGLDConfig(chains=4, steps=5, batch_size=M, seed=3, epsilon=1e-3, nbeta=20.0, orthogonal=True)
    with lm.sampling_mode(model.model):
        one = transformer.sample(model, *data.pair, lm.next_token_loss, settings, workers=1)
        two = transformer.sample(model, *data.pair, lm.next_token_loss, settings, workers=2)
        first = SGLDConfig(**{**settings.to_dict(), "chains": 1})
        alone = transformer.sample(model, *data.pair, lm.next_token_loss, first)
        split = transformer.sample(model, *data.pair, lm.next_token_loss, settings, workers=1, per_batch=3)  # 2 + 2
    # another batch shape may block a matmul differently: a few ulps of O(1) weights
    torch.testing.assert_close(two.final_params, one.final_params, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.final_params, one.final_params, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.loss_trace, one.loss_trace, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone.final_params, one.final_params[:1], rtol=0, atol=1e-6)


def test_fastllc_lm_picks_it_by_default_and_generic_where_it_cannot():
    toks = tokens(16)
    settings = dict(chains=2, steps=3, batch_size=M, epsilon=1e-4, gamma=100.0, nbeta=20.0)
    assert lm.estimate(gpt2(), toks, **settings).backend == "transformer"
    heads = lm.estimate_groups(gpt2(), toks, groups=["l0h1", "l1 mlp"], **settings)
    assert {r.backend for r in heads.values()} == {"transformer"}
    assert lm.estimate(gpt2(), toks, dropout=True, **settings).backend == "transformer"  # GPT-2's dropout: written
    assert lm.estimate(neox(hidden_dropout=0.1), toks, dropout=True, **settings).backend == "generic"  # NeoX's: not
    assert lm.estimate(neox(), toks, **settings).backend == "transformer"
    assert lm.estimate(mistral(), toks, **settings).backend == "generic"
    assert lm.estimate(gpt2(), toks, mala=True, **settings).backend == "generic"


def mistral():
    import transformers
    config = transformers.MistralConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=16,
                                        intermediate_size=32, vocab_size=32, max_position_embeddings=16)
    return transformers.MistralForCausalLM(config)


def _refusals():
    lm_ = causal_lm()
    return [
        (None, lm.next_token_loss, "the transformer backend runs transformer language models, not the study's MLP"),
        (ModularMLP(5, 4, 8), F.cross_entropy, "the transformer backend runs a fastllc.lm.CausalLM (what "
                                               "fastllc.lm.estimate builds), got ModularMLP"),
        (lm_, F.cross_entropy, "the transformer backend computes fastllc.lm.next_token_loss itself; other losses "
                               "need backend='generic'"),
        (lm.CausalLM(mistral()).eval(), lm.next_token_loss, "the transformer backend runs GPT2LMHeadModel, "
                                                            "GPTNeoXForCausalLM, LlamaForCausalLM, not MistralForCausalLM "
                                                            "(model type 'mistral'); use backend='generic'"),
        (lm.CausalLM(gpt2(activation_function="relu")).train(), lm.next_token_loss,
         "dropout is on in 'model.transformer.drop' (training mode), which the transformer backend writes only for "
         "GPT-2 with the tanh-GELU (gpt2 with relu); use backend='generic'"),
        (lm.CausalLM(gpt2(activation_function="gelu_fast")).eval(), lm.next_token_loss,
         "activation 'gelu_fast' is not one the transformer backend writes (gelu_new, gelu_pytorch_tanh, "
         "gelu, relu, silu, swish); use backend='generic'"),
        (lm.CausalLM(gpt2()).double().eval(), lm.next_token_loss,
         "the transformer backend runs float32 weights; use backend='generic'"),
    ]


@pytest.mark.parametrize("case", range(len(_refusals())))
def test_what_it_cannot_run_is_refused_in_one_line_and_auto_passes_on(case):
    model, loss_fn, message = _refusals()[case]
    assert not transformer.supports(model, loss_fn, torch.device("cpu"))
    if model is None:  # the CLI before training asks about the study's MLP; an explicit name is checked later
        transformer.require(torch.device("cpu"))
        return
    with pytest.raises(FastLLCError) as error:
        transformer.require(torch.device("cpu"), model, loss_fn)
    assert str(error.value) == message
    if model is not None and not isinstance(model, ModularMLP):
        assert resolve_backend("auto", torch.device("cpu"), model, loss_fn) != "transformer"


def test_frozen_weights_other_devices_and_settings_it_lacks_are_refused():
    model = causal_lm()
    model.model.transformer.wpe.weight.requires_grad_(False)
    assert not transformer.supports(model, lm.next_token_loss)
    assert transformer.supports(causal_lm(), lm.next_token_loss, torch.device("cpu"))
    with pytest.raises(FastLLCError, match=r"^the transformer backend runs on the CPU, not meta; use backend='generic'$"):
        transformer.require(torch.device("meta"))
    with pytest.raises(FastLLCError, match="^the transformer backend does not record the MALA acceptance"):
        run(transformer, causal_lm(), SGLDConfig(chains=CHAINS, steps=STEPS, batch_size=M, mala=True))
    with pytest.raises(FastLLCError, match="^chain_loss='published'"):
        run(transformer, causal_lm(), SGLDConfig(chains=CHAINS, steps=STEPS, batch_size=M, chain_loss="published"))


def test_the_callers_model_is_left_as_it_was():
    model = causal_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(transformer, model, config("orthogonal", flat_parameters(model)[2].numel()))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kernels,attention", [("native", 0.1), ("aten", 0.1), ("native", 0.0)],
                         ids=["native", "aten", "native-fused-attention"])
def test_dropout_in_training_mode_is_the_modules_with_the_same_masks(kernels, attention):
    """GPT-2 in training mode (dropout 0.1 after the embedding, on the attention's probabilities, after both output
    projections): the written pass's loss and gradient equal the module's own in training mode when the module's
    nn.Dropout layers apply the masks the pass drew (replayed per chain, in the module's call order), to a few ulps.
    The fused attention has no dropout: with attention dropout the pass takes ATen's attention."""
    model = lm.CausalLM(gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=attention, attn_implementation="eager")).train()
    names, shapes, w_star = flat_parameters(model)
    chains, m, length = 2, 3, 9
    weights = w_star + 0.05 * torch.randn(chains, w_star.numel(), generator=torch.Generator().manual_seed(4))
    toks = tokens(chains * m, length=length, seed=5).view(chains, m, -1)
    targets = toks[:, :, 1:].clone()
    stacked = [torch.stack([unflatten(w, names, shapes)[name] for w in weights]) for name in names]
    built = engine.build(model, names)
    assert built.dropout == engine.Dropout(0.1, attention, 0.1) and engine.unsupported(model, lm.next_token_loss) is None
    if kernels == "aten":
        built.kernels = None
    built.masks = {}
    grads = [torch.empty_like(w) for w in stacked]
    ours = built.losses_and_gradients(stacked, grads, toks, targets, engine.Workspace())
    ours_grad = torch.cat([g.reshape(chains, -1) for g in grads], dim=1)
    masks = built.masks
    assert 0.85 < float((masks["embedded"] > 0).float().mean()) < 0.95  # about 10% dropped
    heads, D = model.model.config.n_head, model.model.config.n_embd
    for c in range(chains):
        replay = {"transformer.drop": masks["embedded"][c].view(m, length, D)}
        for layer in range(2):
            replay[f"transformer.h.{layer}.attn.resid_dropout"] = masks[f"{layer}.attention_out"][c].view(m, length, D)
            replay[f"transformer.h.{layer}.mlp.dropout"] = masks[f"{layer}.mlp_out"][c].view(m, length, D)
        # the eager attention calls F.dropout on its probabilities (not its attn_dropout module), layer by layer
        probabilities = [masks[f"{layer}.attention"].view(chains, m, heads, length, length)[c] if attention else
                         torch.ones(m, heads, length, length) for layer in range(2)]
        w = weights[c].clone().requires_grad_()
        with replayed(model, replay), replayed_functional(probabilities):
            loss = lm.next_token_loss(torch.func.functional_call(model, unflatten(w, names, shapes), (toks[c],)),
                                      targets[c])
        (grad,) = torch.autograd.grad(loss, w)
        assert conformance.relative_error(ours[c:c + 1], loss.detach().view(1)) <= LOSS_ULPS
        assert float((ours_grad[c] - grad).abs().max() / grad.abs().max()) <= LOSS_ULPS


class replayed:
    """nn.Dropout modules of ``model`` (by name) multiplying by the given masks (already scaled) instead of drawing."""

    def __init__(self, model, masks: dict):
        self.modules = {name: module for name, module in model.model.named_modules() if name in masks}
        assert set(self.modules) == set(masks)
        self.masks = masks

    def __enter__(self):
        for name, module in self.modules.items():
            module.forward = lambda x, mask=self.masks[name]: x * mask
        return self

    def __exit__(self, *exc):
        for module in self.modules.values():
            del module.forward


class replayed_functional:
    """F.dropout multiplying by the given masks in call order (the attention's probabilities, layer by layer)."""

    def __init__(self, masks: list):
        self.masks = list(masks)

    def __enter__(self):
        self.original = F.dropout
        torch.nn.functional.dropout = lambda x, p=0.5, training=True, inplace=False: x * self.masks.pop(0)
        return self

    def __exit__(self, *exc):
        torch.nn.functional.dropout = self.original
        assert not self.masks, "every mask replayed"


def test_dropout_of_other_families_or_activations_is_refused_in_one_line():
    model = lm.CausalLM(gpt2(resid_pdrop=0.1, activation_function="relu")).train()
    reason = engine.unsupported(model, lm.next_token_loss)
    assert "dropout is on" in reason and "gpt2 with relu" in reason and "\n" not in reason
    assert engine.unsupported(lm.CausalLM(gpt2(resid_pdrop=0.1, activation_function="relu")).eval(),
                              lm.next_token_loss) is None
    padded = lm.CausalLM(gpt2(resid_pdrop=0.1)).train()  # a padding row: the written pass does not run it
    padded.model.transformer.wte.padding_idx = 0
    assert "padding row" in engine.unsupported(padded, lm.next_token_loss)
