"""Backend ``generic`` (torch.func over any nn.Module): its traced replay in chain groups against the reference on
every variant (``fastllc.conformance``'s checks; tests/test_conformance.py runs them on the default path),
convolutional and transformer models, modules it cannot vmap, the MALA acceptance's formula, data loaders."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastllc import FastLLCError, ModularMLP, SGLDConfig, conformance, estimate, make_task
from fastllc.backends import generic, reference, resolve_backend
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters

P, EMBED, HIDDEN = 7, 5, 13  # awkward, non-power-of-two shapes, as in tests/test_backend_torch.py


def injected(model, chains, steps, n, m, seed=2):
    return InjectedRandomness.seeded(chains, steps, n, m, flat_parameters(model)[2].numel(), seed)


@pytest.mark.parametrize("variant", conformance.variants("generic"))
def test_the_traced_replay_in_chain_groups_follows_the_reference(variant):
    """conformance's checks with the step traced and replayed (short runs are otherwise eager) and the chains
    in two groups of threads."""
    outcome = conformance.check(conformance.Case("generic", variant), trace=True, workers=2)
    assert outcome.passed(), outcome


def test_the_studys_mlp_keeps_its_torchscript_replay(monkeypatch):
    """The traced replay is the generic backend's speed; a torch upgrade that defeats it must show here."""
    kept, real = [], generic._trace
    monkeypatch.setattr(generic, "_trace", lambda *args: kept.append(real(*args)) or kept[-1])
    x, y = make_task(P, "add", seed=0).train_data()
    generic.sample(ModularMLP(P, EMBED, HIDDEN), x, y, F.cross_entropy,
                      SGLDConfig(chains=2, steps=3, batch_size=8), trace=True)
    assert len(kept) == 1 and isinstance(kept[0], torch.jit.ScriptModule)


def test_traced_steps_threads_and_groups_change_nothing():
    x, y = make_task(P, "add", seed=0).train_data()
    model = ModularMLP(P, EMBED, HIDDEN)
    config = SGLDConfig(chains=5, steps=20, batch_size=8, seed=3, orthogonal=True)
    traced = generic.sample(model, x, y, F.cross_entropy, config, trace=True)
    eager = generic.sample(model, x, y, F.cross_entropy, config)  # short runs are not traced
    grouped = generic.sample(model, x, y, F.cross_entropy, config, workers=2)  # groups of 3 and 2 chains
    assert torch.equal(traced.final_params, eager.final_params)  # the replay is the same operations
    # another batch shape may pick another matmul blocking: a few ulps of O(1) weights
    torch.testing.assert_close(grouped.final_params, traced.final_params, rtol=0, atol=1e-6)
    fewer = generic.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=2, steps=20, batch_size=8, seed=3,
                                                                       orthogonal=True))
    torch.testing.assert_close(fewer.final_params, traced.final_params[:2], rtol=0, atol=1e-6)  # counter-based
    ref = reference.sample(model, x, y, F.cross_entropy, config)
    conformance.assert_follows(traced, ref, config.steps)  # the same seeded streams: conformance's tolerance


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.flatten(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, width=16, length=6):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(0.1 * torch.randn(length, width))
        self.block = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.norm, self.unembed = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.unembed(self.norm(self.block(self.embed(tokens) + self.position))[:, -1])


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_convolutional_and_transformer_models_run_with_eight_chains(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        model, x, y = ConvNet(), torch.randn(64, 1, 12, 12, generator=gen), torch.randint(3, (64,), generator=gen)
    else:
        model, x = TinyTransformer(), torch.randint(11, (64, 6), generator=gen)
        y = x.sum(1) % 11
    chains, steps, m = 8, 6, 8
    noise = injected(model, chains, steps, len(y), m)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, epsilon=1e-3, nbeta=20.0)
    fast = generic.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    # batched and single-chain fp32 kernels (convolutions, attention) differ in summation order only
    conformance.assert_follows(fast, ref, steps)
    assert resolve_backend("auto", torch.device("cpu"), model, F.cross_entropy) == "generic"
    result = estimate(model, (x, y), chains=8, steps=20, batch_size=16, epsilon=1e-4, backend="generic")
    assert result.healthy_chains == 8 and math.isfinite(result.llc_mean)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.inner(x))


class ValueBranch(nn.Module):
    """Python control flow on a tensor's value: fine for one chain, impossible under vmap."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_modules_that_cannot_be_vmapped_get_the_documented_message():
    x, y = torch.randn(32, 4), torch.randint(2, (32,))
    config = SGLDConfig(chains=2, steps=3, batch_size=8)
    model = BatchNormNet()
    assert not generic.supports(model, F.cross_entropy)
    with pytest.raises(FastLLCError, match=r"module 'inner\.1' \(BatchNorm1d\).*backend='reference'"):
        generic.sample(model, x, y, F.cross_entropy, config)
    assert estimate(model, (x, y), chains=2, steps=3, batch_size=8).backend == "reference"  # auto falls back
    model.eval()  # running statistics only read: vmappable
    assert generic.sample(model, x, y, F.cross_entropy, config).backend == "generic"

    branching = nn.Sequential(nn.Linear(4, 4), ValueBranch(), nn.Linear(4, 2))
    with pytest.raises(FastLLCError, match=r"module '1' \(ValueBranch\).*torch\.func\.vmap.*backend='reference'"):
        generic.sample(branching, x, y, F.cross_entropy, config)
    assert reference.sample(branching, x, y, F.cross_entropy, config).loss_trace.isfinite().all()


def half_mse(outputs, targets):
    return 0.5 * (outputs.squeeze(-1) - targets).pow(2).mean()


def test_mala_acceptance_matches_the_formula_written_out():
    """α = min(1, exp(U(w) − U(w') + log q(w|w') − log q(w'|w))), U = nβL_m + γ/2‖w − w*‖², q the SGLD proposal."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), torch.randn(40, generator=gen)
    model = nn.Linear(3, 1, bias=False)
    config = SGLDConfig(chains=2, steps=6, epsilon=[1e-2, 1e-1], gamma=2.0, nbeta=30.0, batch_size=8, mala=True)
    noise = injected(model, 2, 6, 40, 8)
    out = generic.sample(model, x, y, half_mse, config, randomness=noise)
    w_star, x64, y64 = model.weight.detach().double().reshape(-1), x.double(), y.double()
    for c, eps in enumerate([1e-2, 1e-1]):
        w, previous = w_star.clone(), None
        for t in range(6):
            xb, yb = x64[noise.indices[c, t]], y64[noise.indices[c, t]]
            residual = yb - xb @ w
            potential = 30.0 * 0.5 * residual.pow(2).mean() + (w - w_star).pow(2).sum()
            grad_u = 30.0 * (-xb.T @ residual / 8) + 2.0 * (w - w_star)
            if previous is not None:
                w0, g0, u0 = previous
                log_q_back = -(w0 - w + eps / 2 * grad_u).pow(2).sum() / (2 * eps)
                log_q_forward = -(w - w0 + eps / 2 * g0).pow(2).sum() / (2 * eps)
                expected = min(1.0, math.exp(u0 - potential + log_q_back - log_q_forward))
                # float32 sampler vs float64: the log-ratio differences are O(1e-6) here
                assert out.mala_acceptance[c, t - 1].item() == pytest.approx(expected, abs=1e-4)
            previous = (w, grad_u, potential)
            w = w - eps / 2 * grad_u + math.sqrt(eps) * noise.noise[c, t].double()
    assert 0 < out.mala_acceptance[1].mean() < out.mala_acceptance[0].mean()  # larger steps are rejected more


def test_estimate_takes_a_dataloader_and_keeps_the_specialised_path():
    x, y = make_task(P, "add", seed=0).train_data()
    model = ModularMLP(P, EMBED, HIDDEN)
    settings = dict(chains=2, steps=30, seed=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    from_loader = estimate(model, loader, backend="generic", **settings)
    from_tensors = estimate(model, (x, y), backend="generic", batch_size=16, **settings)
    assert from_loader.batch_size == 16 and from_loader.llc_mean == from_tensors.llc_mean
    # auto: the study's MLP goes to its backend (native where its kernel builds, else torch)
    assert estimate(model, loader, **settings).backend == resolve_backend("auto", torch.device("cpu"))
    with_mala = estimate(model, loader, mala=True, **settings)
    assert with_mala.backend == "generic" and 0 < with_mala.mala_acceptance <= 1
    with pytest.raises(FastLLCError, match="mala=True"):
        estimate(model, loader, mala=True, backend="torch", **settings)
    with pytest.raises(FastLLCError, match="pair"):
        estimate(model, DataLoader(TensorDataset(x), batch_size=4), **settings)


def test_a_known_loss_at_w_star_makes_no_pass_over_the_data_and_the_gradient_only_when_orthogonal():
    """``init_loss`` given: no forward over all n examples (the language-model path states L_n(w*) over its own
    sequences); without the orthogonal restriction no backward pass at w* either, and L_n(w*) is the same
    number with or without autograd."""
    from fastllc.backends import generic
    torch.manual_seed(0)
    n = 64
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(n, 3), torch.randint(2, (n,))
    sizes = []
    model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    config = SGLDConfig(chains=2, steps=3, batch_size=8)
    given = generic.sample(model, x, y, F.cross_entropy, config, init_loss=0.123, trace=False)
    assert given.init_loss == 0.123 and n not in sizes
    sizes.clear()
    computed = generic.sample(model, x, y, F.cross_entropy, config, trace=False)
    assert sizes.count(n) == 1 and computed.init_loss == F.cross_entropy(model(x), y).item()
