"""The reference sampler against the SGLD formula written out by hand (float64), and against the math."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import ModularMLP, SGLDConfig, estimate, make_task
from fastllc.backends import reference
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters, loss_and_gradient_at_start, orthogonal_direction


def half_mse(outputs, targets):
    return 0.5 * (outputs.squeeze(-1) - targets).pow(2).mean()


def regression_problem(n=40, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.randn(d, generator=gen) + 0.3 * torch.randn(n, generator=gen)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen))  # not the minimum: the gradient matters
    return model, x, y


def injected(chains, steps, n, m, d, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return InjectedRandomness(torch.randint(n, (chains, steps, m), generator=gen),
                              scale * torch.randn(chains, steps, d, generator=gen))


def in_float64(model, x, y):
    """(w*, X, y, the unit ∇L_n(w*)) of the regression problem in float64, for hand computations."""
    w_star = model.weight.detach().double().reshape(-1)
    x64, y64 = x.double(), y.double()
    full_grad = -x64.T @ (y64 - x64 @ w_star) / len(y64)
    return w_star, x64, y64, full_grad / full_grad.norm()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_step_matches_the_formula(orthogonal):
    """w ← w − (ε/2)[γ(w − w*) + nβ ∇L_m(w)] + √ε ξ, with ∇L_m = −Xᵀ(y − Xw)/m, written out in float64."""
    model, x, y = regression_problem()
    config = SGLDConfig(chains=2, steps=6, epsilon=[1e-3, 3e-3], gamma=[5.0, 0.5], nbeta=[7.0, 11.0],
                        batch_size=8, orthogonal=orthogonal)
    rand = injected(2, 6, 40, 8, 3)
    out = reference.sample(model, x, y, half_mse, config, randomness=rand)

    w_star, x64, y64, g = in_float64(model, x, y)
    for c, (eps, gam, nb) in enumerate([(1e-3, 5.0, 7.0), (3e-3, 0.5, 11.0)]):
        w = w_star.clone()
        for t in range(6):
            idx, xi = rand.indices[c, t], rand.noise[c, t].double()
            xb, yb = x64[idx], y64[idx]
            residual = yb - xb @ w
            assert out.loss_trace[c, t].item() == pytest.approx(0.5 * residual.pow(2).mean().item(), rel=1e-5)
            increment = -(eps / 2) * (gam * (w - w_star) + nb * (-xb.T @ residual / len(yb))) + math.sqrt(eps) * xi
            if orthogonal:
                increment -= (increment @ g) * g
            w = w + increment
        # float32 sampler vs float64 hand computation: six steps of O(1) values, ~1e-7 relative per op
        torch.testing.assert_close(out.final_params[c].double(), w, rtol=1e-5, atol=1e-6)
    assert out.init_loss == pytest.approx(0.5 * (y64 - x64 @ w_star).pow(2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_rmsprop_step_matches_the_formula(orthogonal):
    """RMSProp-SGLD (SGLDConfig's docstring), written out in float64 with V_0 = 0:
    V ← αV + (1 − α)g², P = 1/(√V + δ), w ← w − (ε/2)P[γ(w − w*) + nβ g] + √ε √P ξ, g = ∇L_m = −Xᵀ(y − Xw)/m."""
    model, x, y = regression_problem()
    alpha, delta = 0.8, 0.05  # not the defaults, so that a default hard-wired anywhere shows
    config = SGLDConfig(chains=2, steps=6, epsilon=[1e-2, 3e-2], gamma=[5.0, 0.5], nbeta=[7.0, 11.0],
                        batch_size=8, orthogonal=orthogonal, sampler="rmsprop_sgld", rmsprop_alpha=alpha,
                        rmsprop_eps=delta)
    rand = injected(2, 6, 40, 8, 3)
    out = reference.sample(model, x, y, half_mse, config, randomness=rand)

    w_star, x64, y64, g = in_float64(model, x, y)
    for c, (eps, gam, nb) in enumerate([(1e-2, 5.0, 7.0), (3e-2, 0.5, 11.0)]):
        w, square_avg = w_star.clone(), torch.zeros(3, dtype=torch.float64)
        for t in range(6):
            idx, xi = rand.indices[c, t], rand.noise[c, t].double()
            xb, yb = x64[idx], y64[idx]
            residual = yb - xb @ w
            assert out.loss_trace[c, t].item() == pytest.approx(0.5 * residual.pow(2).mean().item(), rel=1e-5)
            grad = -xb.T @ residual / len(yb)
            square_avg = alpha * square_avg + (1 - alpha) * grad**2
            precondition = 1 / (square_avg.sqrt() + delta)
            increment = -(eps / 2) * precondition * (gam * (w - w_star) + nb * grad) + (eps * precondition).sqrt() * xi
            if orthogonal:
                increment -= (increment @ g) * g
            w = w + increment
        # float32 sampler vs float64 hand computation: six steps of O(1) values, ~1e-7 relative per op
        torch.testing.assert_close(out.final_params[c].double(), w, rtol=1e-5, atol=1e-6)
        assert (w - w_star).abs().max() > 1e-2  # the chain moved: the comparison is not of w* with itself


def test_without_noise_it_is_gradient_descent_on_the_localized_objective():
    """ξ = 0 ⇒ w ← w − (ε/2)∇[γ/2‖w − w*‖² + nβ L_m(w)], checked with autograd on that objective."""
    task = make_task(7, "add", seed=0)
    model = ModularMLP(7, 5, 13)
    x, y = task.train_data()
    steps, m, eps, gam, nb = 20, 16, 1e-2, 5.0, 3.0
    rand = injected(1, steps, len(y), m, sum(p.numel() for p in model.parameters()), scale=0.0)
    out = reference.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=steps, epsilon=eps,
                           gamma=gam, nbeta=nb, batch_size=m), randomness=rand)
    star = [p.detach().clone() for p in model.parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for t in range(steps):
        idx = rand.indices[0, t]
        functional = dict(zip([n for n, _ in model.named_parameters()], params))
        loss = F.cross_entropy(torch.func.functional_call(model, functional, (x[idx],)), y[idx])
        objective = gam / 2 * sum((p - s).pow(2).sum() for p, s in zip(params, star)) + nb * loss
        grads = torch.autograd.grad(objective, params)
        params = [(p - eps / 2 * g).detach().requires_grad_() for p, g in zip(params, grads)]
    expected = torch.cat([p.detach().reshape(-1) for p in params])
    # same float32 arithmetic in a different order over 20 steps: a few ulps of O(1) weights
    torch.testing.assert_close(out.final_params[0], expected, rtol=1e-5, atol=1e-6)


def test_chains_with_their_own_settings_match_single_chain_runs():
    model, x, y = regression_problem()
    rand = injected(3, 10, 40, 8, 3)
    batch = reference.sample(model, x, y, half_mse, SGLDConfig(chains=3, steps=10, epsilon=[1e-3, 2e-3, 4e-3],
                             gamma=[1.0, 2.0, 3.0], nbeta=5.0, batch_size=8), randomness=rand)
    single = reference.sample(model, x, y, half_mse, SGLDConfig(chains=1, steps=10, epsilon=2e-3, gamma=2.0,
                              nbeta=5.0, batch_size=8),
                              randomness=InjectedRandomness(rand.indices[1:2], rand.noise[1:2]))
    assert torch.equal(batch.final_params[1], single.final_params[0])
    assert torch.equal(batch.loss_trace[1], single.loss_trace[0])


def test_seeded_runs_repeat_and_chain_streams_do_not_depend_on_the_chain_count():
    model, x, y = regression_problem()
    four = reference.sample(model, x, y, half_mse, SGLDConfig(chains=4, steps=40, batch_size=8, seed=9))
    two = reference.sample(model, x, y, half_mse, SGLDConfig(chains=2, steps=40, batch_size=8, seed=9))
    assert torch.equal(four.loss_trace[:2], two.loss_trace)
    other = reference.sample(model, x, y, half_mse, SGLDConfig(chains=2, steps=40, batch_size=8, seed=10))
    assert not torch.equal(other.loss_trace, two.loss_trace)


def test_orthogonal_restriction_keeps_the_walk_orthogonal_to_the_initial_gradient():
    task = make_task(7, "add", seed=0)
    model = ModularMLP(7, 5, 13)  # at initialisation: far from a minimum, the gradient is large
    x, y = task.train_data()
    _, gradient = loss_and_gradient_at_start(model, x, y, F.cross_entropy)
    g = orthogonal_direction(gradient).double()
    w_star = flat_parameters(model)[2].double()
    out = reference.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=2, steps=2000, orthogonal=True, seed=1))
    for w in out.final_params.double():
        displacement = w - w_star
        # each step projects in float32 (unit-roundoff 6e-8); 2000 steps of rounding in w leave |d·g| ≲ 1e-5 |d|
        assert abs(displacement @ g) < 1e-4 * displacement.norm()
        assert displacement.norm() > 0.1  # and the chain did move
    free = reference.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=2000, seed=1))
    assert abs((free.final_params[0].double() - w_star) @ g) > 1e-2  # without it, the walk follows g


def test_linear_regression_has_llc_d_over_2():
    """A regular model: λ = d/2. Settings chosen so the biases are small (see the comments)."""
    n, d = 2000, 6
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.randn(d, generator=gen) + torch.randn(n, generator=gen)  # unit noise: half_mse is the NLL
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():  # w* must be the minimum of L_n: the least-squares solution
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()).solution.float().reshape(1, d))
    # nβ = n/log n ≈ 263; ε·nβ ≈ 0.03 keeps the discretisation bias < 1% and mixing ~ 80 steps;
    # m = 500 makes minibatch-gradient noise < 1% of the injected noise; γ/nβ ≈ 2% localisation bias.
    result = estimate(model, (x, y), half_mse, chains=4, steps=4000, epsilon=1e-4, batch_size=500,
                      backend="reference", seed=0)
    assert result.healthy_chains == 4
    assert result.llc_mean == pytest.approx(d / 2, rel=0.15)


def test_a_diverging_chain_is_flagged_not_averaged():
    model, x, y = regression_problem()
    with pytest.warns(RuntimeWarning, match="1 of 2 chains"):
        result = estimate(model, (x, y), half_mse, chains=2, steps=300, epsilon=[1e-4, 50.0], nbeta=50.0,
                          batch_size=8, backend="reference")
    assert result.healthy == [True, False]
    assert result.llc_per_chain[1] is None
    assert result.llc_mean == pytest.approx(result.llc_per_chain[0])
    assert math.isfinite(result.llc_mean)
