"""Backend ``torch``: its hand-written backward against autograd, its seeded streams, stacked starts and per-chain
masks against its own separate runs, its refusals. That it follows the reference with injected noise, on every
variant its capabilities allow, is tests/test_conformance.py's (``fastllc.conformance``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastllc import FastLLCError, ModularMLP, SGLDConfig, TrainConfig, conformance, estimate_llc, make_task, train
from fastllc.backends import reference
from fastllc.backends import torch as torch_backend
from fastllc.engines.mlp import ChainBatch
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.config import PUBLISHED_LOSS_OFFSET
from fastllc.sampling.starts import Start
from fastllc.sampling.contract import flat_parameters

P, EMBED, HIDDEN = 7, 5, 13  # awkward, non-power-of-two shapes


def perturbed_chains(model, chains, scale=0.3, seed=0):
    """[C, d] starting weights: the model's, moved differently for each chain."""
    gen = torch.Generator().manual_seed(seed)
    w = flat_parameters(model)[2]
    return w + scale * torch.randn(chains, w.numel(), generator=gen)


def test_hand_written_gradient_matches_autograd():
    model = ModularMLP(P, EMBED, HIDDEN)
    names, shapes, _ = flat_parameters(model)
    chains, m = 3, 11
    rows = perturbed_chains(model, chains)
    gen = torch.Generator().manual_seed(1)
    operands, labels = torch.randint(P, (chains, m, 2), generator=gen), torch.randint(P, (chains, m), generator=gen)
    scale = torch.tensor([1.0, -0.5, 2.0]).view(chains, 1, 1)
    batch = ChainBatch(P, EMBED, HIDDEN, rows, m)
    loss_sum = torch.empty(chains)
    batch.loss_and_scaled_grad(operands, labels, scale / m, loss_sum)
    loss = -loss_sum / m
    mine = batch.to_chain_major(batch.G)
    for c in range(chains):
        w = rows[c].clone().requires_grad_(True)
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        expected_loss = F.cross_entropy(torch.func.functional_call(model, params, (operands[c],)), labels[c])
        (expected,) = torch.autograd.grad(expected_loss, w)
        assert loss[c].item() == pytest.approx(expected_loss.item(), rel=1e-6)
        # one fp32 forward/backward, different summation order: a few ulps of O(0.1) gradients
        torch.testing.assert_close(mine[c], scale.flatten()[c] * expected, rtol=1e-5, atol=1e-6)


def test_seeded_streams_match_the_reference_and_ignore_the_chain_count():
    task = make_task(P, "add", seed=0)
    x, y = task.train_data()
    model = ModularMLP(P, EMBED, HIDDEN)
    config = SGLDConfig(chains=4, steps=30, batch_size=8, seed=7)
    four = torch_backend.sample(model, x, y, F.cross_entropy, config)
    eight = torch_backend.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=8, steps=30, batch_size=8, seed=7))
    ref = reference.sample(model, x, y, F.cross_entropy, config)
    torch.testing.assert_close(eight.final_params[:4], four.final_params, rtol=0, atol=1e-6)
    conformance.assert_follows(four, ref, steps=30)  # the same draws: conformance's tolerance for 30 steps


def test_stacked_starting_points_equal_separate_runs():
    task = make_task(P, "add", seed=0)
    x, y = task.train_data()
    first, second = ModularMLP(P, EMBED, HIDDEN), ModularMLP(P, EMBED, HIDDEN)
    d, steps, m = flat_parameters(first)[2].numel(), 40, 8
    noise = InjectedRandomness.seeded(4, steps, len(y), m, d, seed=4)
    config = SGLDConfig(chains=2, steps=steps, batch_size=m, orthogonal=True)
    together = torch_backend.sample_starts([Start(first, x, y), Start(second, x, y)], config,
                                     randomness=noise)
    # the second start's chains are global chains 2 and 3: alone, they read the same rows of noise
    alone = torch_backend.sample(second, x, y, F.cross_entropy, config,
                           randomness=InjectedRandomness(noise.indices[2:], noise.noise[2:]))
    torch.testing.assert_close(together[1].final_params, alone.final_params, rtol=0, atol=1e-6)
    torch.testing.assert_close(together[1].loss_trace, alone.loss_trace, rtol=0, atol=1e-6)
    assert together[1].init_loss == pytest.approx(F.cross_entropy(second(x), y).item(), rel=1e-6)  # its own L_n(w*)
    assert together[0].init_loss != together[1].init_loss
    assert together[0].chains_in_batch == 4


def test_diverging_chain_is_flagged():
    task = make_task(P, "add", seed=0)
    x, y = task.train_data()
    samples = torch_backend.sample(ModularMLP(P, EMBED, HIDDEN), x, y, F.cross_entropy,
                             SGLDConfig(chains=2, steps=200, epsilon=[1e-4, 30.0], nbeta=100.0, batch_size=8))
    config = SGLDConfig(chains=2, steps=200)
    with pytest.warns(RuntimeWarning, match="1 of 2 chains"):
        result = estimate_llc(samples, config)
    assert result.healthy == [True, False]
    assert math.isfinite(result.llc_mean)


def test_other_models_are_refused_with_a_clear_message():
    with pytest.raises(FastLLCError, match="ModularMLP with cross-entropy"):
        torch_backend.sample(torch.nn.Linear(2, 2), torch.randn(4, 2), torch.zeros(4, dtype=torch.long),
                       F.cross_entropy, SGLDConfig(chains=1, steps=1))


@pytest.mark.slow
def test_llc_agrees_with_the_reference_on_a_trained_model(tmp_path):
    run = train(TrainConfig(p=13, batches=3000, checkpoints=1, seed=0), tmp_path / "p13")
    model, (x, y) = run.load_model(), run.task().train_data()
    ref = estimate_llc(reference.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=4, steps=1500, seed=1)),
                       SGLDConfig(chains=4, steps=1500))
    fast = estimate_llc(torch_backend.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=16, steps=1500, seed=2)),
                        SGLDConfig(chains=16, steps=1500))
    # independent randomness: the two means differ by sampling error only (4 standard errors of the difference)
    assert abs(fast.llc_mean - ref.llc_mean) < 4 * math.hypot(fast.llc_se, ref.llc_se)
    assert fast.llc_mean > 0


@pytest.mark.gpu
def test_same_code_runs_on_cuda():
    task = make_task(P, "add", seed=0)
    x, y = task.train_data()
    model = ModularMLP(P, EMBED, HIDDEN)
    config = SGLDConfig(chains=3, steps=20, batch_size=8)
    cpu = torch_backend.sample(model, x, y, F.cross_entropy, config)
    gpu = torch_backend.sample(model, x, y, F.cross_entropy, config, device="cuda")
    torch.testing.assert_close(gpu.final_params, cpu.final_params, rtol=0, atol=1e-5)


def test_estimate_checkpoints_runs_every_checkpoint_in_one_batch(tiny_run):
    from fastllc import estimate_checkpoints
    results = estimate_checkpoints(tiny_run, config=SGLDConfig(chains=2, steps=30), backend="torch")
    assert len(results) == len(tiny_run.steps)
    assert all(r.chains == 2 and r.backend == "torch" for r in results)
    assert results[0].init_loss > results[-1].init_loss  # initialisation has higher loss than trained weights


def test_loss_stays_exact_when_a_label_probability_underflows():
    """A chain far from home can have logit gaps > 87 (softmax underflows to 0 in fp32): its loss must be
    the true, finite cross-entropy, not inf and not a clamped value."""
    model = ModularMLP(P, EMBED, HIDDEN)
    with torch.no_grad():
        model.unembed.weight.mul_(2000.0)
    m = 11
    gen = torch.Generator().manual_seed(4)
    operands, labels = torch.randint(P, (1, m, 2), generator=gen), torch.randint(P, (1, m), generator=gen)
    batch = ChainBatch(P, EMBED, HIDDEN, flat_parameters(model)[2].unsqueeze(0), m)
    loss_sum = torch.empty(1)
    batch.loss_and_scaled_grad(operands, labels, torch.full((1, 1, 1), 1.0 / m), loss_sum)
    expected = F.cross_entropy(model(operands[0]), labels[0])
    logits = model(operands[0])
    assert (torch.softmax(logits, -1).gather(-1, labels[0].unsqueeze(-1)) < 1e-30).any()  # the case at hand
    assert math.isfinite(loss_sum.item()) and expected.item() > 100
    assert -loss_sum.item() / m == pytest.approx(expected.item(), rel=1e-5)


def confident_model(scale=20.0):
    """The MLP with its output weights scaled up: confident logits, and at w* some train examples have
    p_y < 1e-6, where the published loss −log(p_y + 1e-6) and cross-entropy part."""
    torch.manual_seed(0)
    model = ModularMLP(P, EMBED, HIDDEN)
    with torch.no_grad():
        model.unembed.weight.mul_(scale)
    return model


def test_published_loss_gradient_matches_autograd():
    """The per-example scaling p_y/(p_y + δ) of the logit gradient, against autograd of the published loss."""
    from fastllc.sampling.contract import published_cross_entropy
    model = confident_model()
    names, shapes, w = flat_parameters(model)
    m = 11
    gen = torch.Generator().manual_seed(1)
    operands, labels = torch.randint(P, (1, m, 2), generator=gen), torch.randint(P, (1, m), generator=gen)
    batch = ChainBatch(P, EMBED, HIDDEN, w.unsqueeze(0), m, loss_offset=PUBLISHED_LOSS_OFFSET)
    loss_sum = torch.empty(1)
    batch.loss_and_scaled_grad(operands, labels, torch.full((1, 1, 1), 1.0 / m), loss_sum)
    weights = w.clone().requires_grad_(True)
    params, offset = {}, 0
    for name, shape in zip(names, shapes):
        params[name] = weights[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    expected = published_cross_entropy(torch.func.functional_call(model, params, (operands[0],)), labels[0])
    (gradient,) = torch.autograd.grad(expected, weights)
    assert expected.item() > 1.0  # confident and often wrong: the cap matters here
    assert -loss_sum.item() / m == pytest.approx(expected.item(), rel=1e-6)
    # one fp32 forward/backward, other summation order: a few ulps of the largest gradients (O(10) here)
    torch.testing.assert_close(batch.to_chain_major(batch.G)[0], gradient, rtol=1e-5, atol=1e-5)


def restricted_setting():
    x, y = make_task(P, "add", seed=0).train_data()
    torch.manual_seed(1)
    model = ModularMLP(P, EMBED, HIDDEN)
    from fastllc.sampling.restrict import selection_mask
    keep = selection_mask(model, ["left.*", {"unembed.weight": torch.arange(P * HIDDEN).view(P, HIDDEN) % 3 == 0}])
    return model, x, y, keep


def test_per_chain_masks_equal_separate_runs():
    model, x, y, keep = restricted_setting()
    d, chains, steps, m = keep.numel(), 3, 30, 8
    rows = torch.stack([keep, ~keep, torch.arange(d) < 20])  # one selection per chain
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, d, seed=7)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, orthogonal=True, epsilon=[1e-3, 2e-3, 5e-4])
    together = torch_backend.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=rows)
    one = SGLDConfig(**{**config.to_dict(), "chains": 1, "epsilon": 0.0})
    for c in range(chains):
        alone = torch_backend.sample(
            model, x, y, F.cross_entropy, SGLDConfig(**{**one.to_dict(), "epsilon": config.epsilon[c]}),
            randomness=InjectedRandomness(noise.indices[c : c + 1], noise.noise[c : c + 1]), restrict=rows[c])
        # the same chain alone: the same operations on a batch of one (batched matmuls may sum in another
        # order: fp32 rounding over 30 steps, as test_seeded_streams_match_the_reference_and_ignore_the_chain_count)
        torch.testing.assert_close(together.final_params[c], alone.final_params[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(together.loss_trace[c], alone.loss_trace[0], rtol=0, atol=1e-6)
        w_star = flat_parameters(model)[2]
        assert torch.equal(together.final_params[c, ~rows[c]], w_star[~rows[c]])


D = 7 * 5 + 2 * (13 * 5 + 13) + 7 * 13  # restricted_setting's model: E, L, b_L, R, b_R, U
SHAPES = f"shape ({D},) or (2, {D}) over the flat weights"


@pytest.mark.parametrize("mask,message", [
    (torch.ones(3, D, dtype=torch.bool),
     f"restrict must reach the backend as a bool tensor of {SHAPES}, got (3, {D}) "
     "(fastllc.sampling.restrict.selection_mask)"),
    (torch.ones(2, D, dtype=torch.int64),
     f"restrict must reach the backend as a bool tensor of {SHAPES}, got torch.int64 (2, {D}) "
     "(fastllc.sampling.restrict.selection_mask)"),
    ("second row empty", "restrict selects no weights for chain 1; select at least one weight, or drop restrict"),
    (torch.zeros(D, dtype=torch.bool), "restrict selects no weights; select at least one weight, or drop restrict"),
])
def test_bad_masks_are_one_line_errors_before_any_chain_runs(mask, message, monkeypatch):
    model, x, y, keep = restricted_setting()
    assert keep.numel() == D
    if isinstance(mask, str):
        mask = torch.stack([keep, torch.zeros_like(keep)])
    monkeypatch.setattr(torch_backend, "_run_chains", lambda *a, **k: pytest.fail("a chain ran"))
    with pytest.raises(FastLLCError) as error:
        torch_backend.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=2, steps=3), restrict=mask)
    assert str(error.value) == message


def test_estimate_runs_restricted_published_rmsprop_chains_on_the_torch_backend():
    """Through the public API: the registry hands ``backend="torch"`` all three (its capabilities)."""
    from fastllc import estimate
    model, x, y, _ = restricted_setting()
    result = estimate(model, (x, y), backend="torch", restrict=["left.*", "unembed.weight"], chains=2, steps=20,
                      batch_size=8, chain_loss="published", sampler="rmsprop_sgld", orthogonal=True)
    assert result.backend == "torch" and result.sampled_weights == HIDDEN * EMBED + HIDDEN + P * HIDDEN  # L, b_L, U
    assert math.isfinite(result.llc_mean)
