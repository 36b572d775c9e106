"""RMSProp-preconditioned SGLD (``SGLDConfig.sampler="rmsprop_sgld"``): its settings, the reference step against
devinterp 1.3.2's own optimizer step by step, and which backends run it (the registry's capability)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import FastLLCError, ModularMLP, SGLDConfig, estimate, make_task
from fastllc.backends import backend_module, reference, resolve_backend, sample, with_capabilities
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters

CPU = torch.device("cpu")


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="sghmc"), "unknown sampler 'sghmc'; choose one of preconditioned_sgld, rmsprop_sgld, sgld"),
    (dict(sampler="rmsprop_sgld", rmsprop_alpha=1.0), "rmsprop_alpha must be in (0, 1), got 1.0"),
    (dict(sampler="rmsprop_sgld", rmsprop_alpha=0.0), "rmsprop_alpha must be in (0, 1), got 0.0"),
    (dict(rmsprop_alpha=float("nan")), "rmsprop_alpha must be in (0, 1), got nan"),
    (dict(sampler="rmsprop_sgld", rmsprop_eps=0.0), "rmsprop_eps must be finite and > 0, got 0.0"),
    (dict(rmsprop_eps=-1e-3), "rmsprop_eps must be finite and > 0, got -0.001"),
    (dict(sampler="rmsprop_sgld", mala=True),
     "mala=True records plain SGLD's acceptance rate; it is not defined for sampler='rmsprop_sgld': "
     "use sampler='sgld' or drop mala"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(FastLLCError) as error:
        SGLDConfig(**settings).validate()
    assert str(error.value) == message


def test_defaults_are_devinterps_and_needs_name_the_capability():
    config = SGLDConfig()
    assert (config.sampler, config.rmsprop_alpha, config.rmsprop_eps) == ("sgld", 0.99, 0.1)  # devinterp's alpha, eps
    assert config.needs() == ()
    assert SGLDConfig(sampler="rmsprop_sgld", mala=False).needs() == ("rmsprop_sgld",)
    assert SGLDConfig(mala=True).needs() == ("mala",)


def test_the_reference_step_is_devinterps_rmsprop_sgld_step_by_step(monkeypatch):
    """devinterp 1.3.2's ``SGMCMC.rmsprop_sgld`` run by hand on a tiny model, its noise recorded as it draws it
    (``torch.normal``), and the same minibatches and noise injected into the reference."""
    pytest.importorskip("devinterp")
    from devinterp.optim.sgmcmc import SGMCMC

    gen = torch.Generator().manual_seed(0)
    n, m, steps = 40, 8, 25
    x, y = torch.randn(n, 3, generator=gen), torch.randint(2, (n,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = copy.deepcopy(model)
    indices = torch.randint(n, (steps, m), generator=gen)
    settings = dict(lr=3e-2, localization=5.0, nbeta=20.0, alpha=0.9, eps=0.05)  # not the defaults: each one matters
    optimizer = SGMCMC.rmsprop_sgld(model.parameters(), **settings)

    drawn, real_normal = [], torch.normal
    monkeypatch.setattr(torch, "normal", lambda *a, **k: drawn.append(real_normal(*a, **k)) or drawn[-1])
    losses = []
    for t in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[indices[t]]), y[indices[t]])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    monkeypatch.undo()
    sizes = [p.numel() for p in model.parameters()]
    assert len(drawn) == steps * len(sizes)  # one draw per parameter per step, in parameters() order
    noise = torch.stack([torch.cat([d.reshape(-1) for d in drawn[t * len(sizes):(t + 1) * len(sizes)]])
                         for t in range(steps)])

    config = SGLDConfig(chains=1, steps=steps, batch_size=m, epsilon=settings["lr"], gamma=settings["localization"],
                        nbeta=settings["nbeta"], sampler="rmsprop_sgld", rmsprop_alpha=settings["alpha"],
                        rmsprop_eps=settings["eps"])
    ours = reference.sample(start, x, y, F.cross_entropy, config,
                            randomness=InjectedRandomness(indices[None], noise[None]))
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # both float32, the same operations in a slightly different order (devinterp adds drift and noise to w in
    # two steps): measured 4e-8 after 25 steps of O(1) weights. A wrong α, δ inside the square root, V started
    # at g², noise scaled by P instead of √P or an unpreconditioned γ term each move the weights by ≥ 1e-2 here.
    torch.testing.assert_close(ours.final_params[0], theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss_trace[0], torch.tensor(losses, dtype=torch.float64), rtol=0, atol=1e-5)
    assert (theirs - flat_parameters(start)[2]).abs().max() > 1e-2  # the chain travelled


def test_auto_picks_a_backend_that_runs_it_and_others_are_refused_in_one_line():
    assert with_capabilities(["rmsprop_sgld"]) == ["torch", "transformer", "generic", "reference"]
    needs = SGLDConfig(sampler="rmsprop_sgld").needs()
    assert resolve_backend("auto", CPU, ModularMLP(5, 4, 16), F.cross_entropy, needs) == "torch"
    batchnorm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()  # generic cannot vmap it
    assert resolve_backend("auto", CPU, batchnorm, F.cross_entropy, needs) == "reference"
    for name in ("native", "triton"):
        with pytest.raises(FastLLCError) as error:
            resolve_backend(name, CPU, ModularMLP(5, 4, 16), F.cross_entropy, needs)
        assert str(error.value) == (f"sampler='rmsprop_sgld' (RMSProp-preconditioned SGLD) needs backend 'torch' or "
                                    f"'generic' or 'reference', not '{name}'")


def test_estimate_and_the_registry_route_it_and_a_direct_call_cannot_ignore_it():
    x, y = make_task(5, "add", seed=0).train_data()
    model = ModularMLP(5, 4, 16)
    config = SGLDConfig(chains=2, steps=5, batch_size=4, sampler="rmsprop_sgld")
    assert estimate(model, (x, y), config=config).backend == "torch"  # the fastest that has it, not native
    assert sample(model, x, y, F.cross_entropy, config).backend == "torch"
    with pytest.raises(FastLLCError, match="^sampler='rmsprop_sgld' .* needs backend 'torch' or 'generic' or "
                                           "'reference', not 'native'$"):
        estimate(model, (x, y), config=config, backend="native")
    # a backend that implements plain SGLD only asks for its coefficients through config.hyperparameters,
    # which refuses another sampler: a direct call never runs SGLD in its place
    with pytest.raises(FastLLCError, match="^this backend implements sampler 'sgld' only, not 'rmsprop_sgld'; "
                                           "use backend='auto', which picks one that has it$"):
        backend_module("native").sample(model, x, y, F.cross_entropy, config)
    from fastllc.backends import sample_starts
    from fastllc.sampling.starts import Start
    stacked = sample_starts([Start(model, x, y)], config)  # checkpoints along training: torch stacks them
    assert stacked[0].backend == "torch"


def test_rmsprop_differs_from_sgld_and_sgld_is_unchanged_by_the_new_fields():
    x, y = make_task(5, "add", seed=0).train_data()
    model = ModularMLP(5, 4, 16)
    plain = SGLDConfig(chains=2, steps=10, batch_size=4, seed=1)
    explicit = SGLDConfig(chains=2, steps=10, batch_size=4, seed=1, sampler="sgld", rmsprop_alpha=0.5, rmsprop_eps=3.0)
    a = reference.sample(model, x, y, F.cross_entropy, plain)
    b = reference.sample(model, x, y, F.cross_entropy, explicit)
    assert torch.equal(a.final_params, b.final_params)  # the RMSProp settings do nothing to plain SGLD
    c = reference.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=2, steps=10, batch_size=4, seed=1,
                                                                  sampler="rmsprop_sgld"))
    assert not torch.allclose(a.final_params, c.final_params)
