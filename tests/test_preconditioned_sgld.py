"""SGLD with a fixed preconditioner given by the user (``sampling/samplers/preconditioned_sgld.py``): the
third sampler, added as a module and this test, with no change to any backend."""

import pytest
import torch
import torch.nn.functional as F

from fastllc import FastLLCError, ModularMLP, SGLDConfig, make_task
from fastllc.backends import backend_module, resolve_backend, sample
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters
from fastllc.sampling.samplers.preconditioned_sgld import PreconditionedSGLD

CPU = torch.device("cpu")


def _workload():
    torch.manual_seed(0)
    model = ModularMLP(7, 4, 8)
    x, y = make_task(7, "add").train_data()
    return model, x, y


def test_a_constant_preconditioner_c_is_sgld_with_step_c_times_epsilon():
    """P = c everywhere: w − (εc/2)[...] + √(εc)·ξ is SGLD at ε' = εc. The same draws on the reference; the
    two compute the same numbers in another grouping (fp32: 1e-6 of weights of order 1)."""
    model, x, y = _workload()
    d = flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(2, 30, len(y), 8, d, seed=3)
    settings = dict(chains=2, steps=30, batch_size=8, gamma=5.0, nbeta=20.0, orthogonal=True)
    ours = sample(model, x, y, F.cross_entropy, SGLDConfig(**settings, epsilon=1e-3,
                  sampler=PreconditionedSGLD(torch.full((d,), 2.5))), backend="reference", randomness=noise)
    sgld = sample(model, x, y, F.cross_entropy, SGLDConfig(**settings, epsilon=2.5e-3), backend="reference",
                  randomness=noise)
    torch.testing.assert_close(ours.final_params, sgld.final_params, rtol=1e-6, atol=1e-6)
    assert (ours.final_params - flat_parameters(model)[2]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["torch", "generic"])
def test_the_batched_backends_run_it_as_the_reference_does(backend):
    """Per-weight P (0.5 .. 2), per-chain ε, the orthogonal restriction; the same injected draws. Tolerance as
    the backends' own SGLD checks: fp32 trajectories of 40 steps agree to 1e-4 absolute."""
    model, x, y = _workload()
    d = flat_parameters(model)[2].numel()
    config = SGLDConfig(chains=3, steps=40, batch_size=8, epsilon=[1e-3, 2e-3, 5e-4], gamma=5.0, nbeta=20.0,
                        orthogonal=True, sampler=PreconditionedSGLD(torch.linspace(0.5, 2.0, d)))
    noise = InjectedRandomness.seeded(3, 40, len(y), 8, d, seed=4)
    ref = sample(model, x, y, F.cross_entropy, config, backend="reference", randomness=noise)
    fast = sample(model, x, y, F.cross_entropy, config, backend=backend, randomness=noise)
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=1e-4)
    assert (ref.final_params - flat_parameters(model)[2]).abs().max() > 1e-2


def test_auto_picks_a_backend_that_runs_every_sampler_and_the_fused_kernels_refuse_it():
    model, _, _ = _workload()
    needs = SGLDConfig(sampler=PreconditionedSGLD(torch.ones(3))).needs()
    assert resolve_backend("auto", CPU, model, F.cross_entropy, needs) == "torch"
    for name in ("native", "triton"):
        assert "samplers" not in backend_module(name).CAPABILITIES
        with pytest.raises(FastLLCError) as error:
            resolve_backend(name, CPU, model, F.cross_entropy, needs)
        assert str(error.value) == ("sampler='preconditioned_sgld' (SGLD with a fixed preconditioner) needs backend "
                                    f"'torch' or 'generic' or 'reference', not '{name}'")


@pytest.mark.parametrize("values, message", [
    (torch.ones(5), "the preconditioner has 5 values for a model with 164 weights: give one per weight "
                    "(named_parameters order)"),
    (torch.zeros(164), "the preconditioner must be finite and > 0 everywhere, one value per weight"),
])
def test_a_wrong_preconditioner_is_a_one_line_error(values, message):
    model, x, y = _workload()
    with pytest.raises(FastLLCError) as error:
        sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=2, sampler=PreconditionedSGLD(values)))
    assert str(error.value) == message


def test_rmsprops_preconditioner_at_w_star_is_accepted_by_parameter_name_and_estimates():
    """P from ``curvature.rmsprop_preconditioner`` (a dict by parameter name) is flattened in order: the same
    run as the flat vector, bit for bit; λ̂ comes out finite and every chain healthy."""
    from fastllc import PreconditionedSGLD as Exported, estimate
    from fastllc.curvature import rmsprop_preconditioner
    model, x, y = _workload()
    by_name = rmsprop_preconditioner(model, (x, y), F.cross_entropy, batch_size=8, delta=0.1)
    flat = torch.cat([v.reshape(-1) for v in by_name.values()])
    assert Exported is PreconditionedSGLD and torch.equal(PreconditionedSGLD(by_name).preconditioner, flat)
    config = SGLDConfig(chains=2, steps=200, batch_size=8, epsilon=1e-4, sampler=PreconditionedSGLD(by_name))
    result = estimate(model, (x, y), F.cross_entropy, config)
    again = estimate(model, (x, y), F.cross_entropy, SGLDConfig(**{**config.__dict__, "sampler": PreconditionedSGLD(flat)}))
    assert result.llc_mean == again.llc_mean and result.healthy_chains == 2
    assert result.to_dict()["sampler"] == "preconditioned_sgld" and result.to_json()  # the record is JSON
