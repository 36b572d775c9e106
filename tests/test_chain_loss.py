"""``SGLDConfig.chain_loss``: the published study's chain loss −mean log(softmax(z)_y + 1e-6) beside exact
cross-entropy: its value and gradient against the formula, L_n(w*) exact in both, the backends that follow it
(capability ``published_chain_loss``), and its one-line errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import FastLLCError, SGLDConfig
from fastllc.backends import backend_module, resolve_backend, sample
from fastllc.sampling.config import PUBLISHED_LOSS_OFFSET
from fastllc.sampling.contract import chain_loss_fn, published_cross_entropy

CPU = torch.device("cpu")


def test_published_loss_is_the_formula_and_caps_underflowed_examples():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 60.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([2, 0])  # the second example has p_y = e^-60 ≈ 1e-26: far below the offset
    loss = published_cross_entropy(logits, targets)
    p_y = torch.softmax(logits.detach(), -1)[torch.arange(2), targets]
    assert loss.item() == pytest.approx(-torch.log(p_y + PUBLISHED_LOSS_OFFSET).mean().item(), rel=1e-12)
    assert -torch.log(p_y[1] + PUBLISHED_LOSS_OFFSET) < 13.82  # capped at −log 1e-6 = 13.8155, exact CE would be 60
    loss.backward()
    # d/dz of −log(p_y + δ) = (p_y/(p_y + δ))·(softmax(z) − onehot(y)): exact CE's gradient, scaled per example
    onehot = F.one_hot(targets, 3).double()
    scale = (p_y / (p_y + PUBLISHED_LOSS_OFFSET))[:, None]
    expected = scale * (torch.softmax(logits.detach(), -1) - onehot) / 2
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.CrossEntropyLoss(label_smoothing=0.1),
                                     nn.CrossEntropyLoss(reduction="sum")])
def test_published_loss_needs_plain_cross_entropy(loss_fn):
    with pytest.raises(FastLLCError, match="chain_loss='published' is the study's"):
        chain_loss_fn(loss_fn, SGLDConfig(chain_loss="published"))
    assert chain_loss_fn(nn.CrossEntropyLoss(), SGLDConfig(chain_loss="published")) is published_cross_entropy
    assert chain_loss_fn(loss_fn, SGLDConfig()) is loss_fn


def test_unknown_chain_loss_is_a_one_line_error_and_needs_names_the_capability():
    with pytest.raises(FastLLCError) as error:
        SGLDConfig(chain_loss="smoothed").validate()
    assert str(error.value) == "unknown chain_loss 'smoothed'; choose one of exact, published"
    assert SGLDConfig(chain_loss="published").needs() == ("published_chain_loss",)
    assert SGLDConfig().needs() == ()


def _classifier():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 4, generator=gen), torch.randint(5, (48,), generator=gen)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        model[2].weight.mul_(8.0)  # confident logits: some minibatch p_y fall below 1e-6, where the losses differ
    return model, x, y


def test_reference_records_the_published_loss_and_generic_follows_it():
    model, x, y = _classifier()
    config = SGLDConfig(chains=3, steps=12, epsilon=1e-3, nbeta=30.0, batch_size=16, chain_loss="published", seed=5)
    ref = sample(model, x, y, F.cross_entropy, config, backend="reference", device=CPU)
    exact = sample(model, x, y, F.cross_entropy, SGLDConfig(**{**config.to_dict(), "chain_loss": "exact"}),
                   backend="reference", device=CPU)
    assert ref.init_loss == exact.init_loss  # L_n(w*) is exact cross-entropy in both
    assert ref.loss_trace[:, 0].lt(exact.loss_trace[:, 0]).any()  # step 0: same weights, the published loss is capped
    assert ref.loss_trace[:, 0].le(exact.loss_trace[:, 0]).all()  # −log(p + δ) ≤ −log p, always
    gen = sample(model, x, y, F.cross_entropy, config, backend="generic", device=CPU)
    # float32 chains on the same streams: the generic batched step equals the reference's to fp32 rounding
    # accumulated over 12 steps (the bound test_backend_generic uses for its exact-loss comparison)
    torch.testing.assert_close(gen.loss_trace, ref.loss_trace, rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.final_params, ref.final_params, rtol=0, atol=1e-5)


def test_backends_without_the_capability_are_not_chosen():
    config = SGLDConfig(chain_loss="published")
    model, _, _ = _classifier()
    name = resolve_backend("auto", CPU, model, F.cross_entropy, needs=config.needs())
    assert "published_chain_loss" in backend_module(name).CAPABILITIES
