"""Every sampler (``fastllc.sampling.samplers``): its batched update over the parameter-major layout equals its
one-chain increment (the reference's), chain by chain; the registry finds it; records name it."""

import pytest
import torch

from fastllc import FastLLCError, SGLDConfig
from fastllc.sampling import samplers
from fastllc.sampling.layout import ParameterMajor

SHAPES = [(3, 4), (5,), (2, 3)]  # three parameters: the layout's blocks matter
D = sum(torch.Size(s).numel() for s in SHAPES)


def _example(name: str):
    return samplers.sampler_class(name).example(D)


@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("name", samplers.names())
def test_batched_update_equals_the_one_chain_increment_for_every_chain(name, orthogonal):
    """Five steps of three chains with their own (ε, γ, nβ), each from its own w*; the same gradients and
    noise given to both forms. fp32 on both sides, the same operations in another grouping: 1e-6 relative
    (a few ulp of the increments, which are ~1e-2 of the weights)."""
    gen = torch.Generator().manual_seed(0)
    C = 3
    epsilon = torch.tensor([1e-3, 2e-3, 5e-4], dtype=torch.float64)
    gamma = torch.tensor([5.0, 0.0, 100.0], dtype=torch.float64)
    nbeta = torch.tensor([10.0, 30.0, 3.0], dtype=torch.float64)
    sampler = _example(name)
    layout = ParameterMajor(SHAPES, C)
    w_star = torch.randn(C, D, generator=gen)
    W = layout.to_parameter_major(w_star)
    update = sampler.batched(layout, W, epsilon, gamma, nbeta)
    factor = layout.coefficient(sampler.gradient_factor(epsilon, nbeta), W.device)
    direction = torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=1) if orthogonal else None
    chains = [(w_star[c].clone(), sampler.start(w_star[c])) for c in range(C)]
    for _ in range(5):
        grad, noise = torch.randn(C, D, generator=gen), torch.randn(C, D, generator=gen)
        G = layout.to_parameter_major(grad)
        G = G.mul_(factor) if isinstance(factor, float) else G.mul_(factor)
        projection = None if direction is None else (layout.rows(G), layout.rows(layout.to_parameter_major(direction)))
        update(G, layout.to_parameter_major(noise), projection)
        for c, (w, state) in enumerate(chains):
            step, state = sampler.increment(state, w, w_star[c], grad[c], noise[c], float(epsilon[c]),
                                            float(gamma[c]), float(nbeta[c]))
            if direction is not None:
                step = step - (step @ direction[c]) * direction[c]
            chains[c] = (w + step, state)
    batched = layout.to_chain_major(W)
    for c, (w, _) in enumerate(chains):
        torch.testing.assert_close(batched[c], w, rtol=1e-6, atol=1e-6)
    assert (batched - w_star).abs().max() > 1e-2  # not vacuous: the chains moved


def test_the_registry_lists_every_sampler_and_names_only_those_a_name_selects():
    assert set(samplers.names()) >= {"sgld", "rmsprop_sgld", "preconditioned_sgld"}
    assert "preconditioned_sgld" not in samplers.by_name() and {"sgld", "rmsprop_sgld"} <= set(samplers.by_name())
    for name in samplers.names():
        cls = samplers.sampler_class(name)
        assert cls.name == name and cls.title
        assert samplers.sampler_class(name).__module__ == f"fastllc.sampling.samplers.{name}"


def test_a_config_takes_an_object_or_a_name_and_records_its_name_and_settings():
    named = SGLDConfig(sampler="rmsprop_sgld", rmsprop_alpha=0.9).validate()
    assert named.sampler_object() == samplers.sampler_class("rmsprop_sgld")(alpha=0.9, delta=0.1)
    assert named.to_dict()["sampler"] == "rmsprop_sgld" and "sampler_settings" not in named.to_dict()
    given = SGLDConfig(sampler=_example("preconditioned_sgld")).validate()
    record = given.to_dict()
    assert record["sampler"] == "preconditioned_sgld" and given.sampler_name == "preconditioned_sgld"
    assert record["sampler_settings"]["size"] == D and len(record["sampler_settings"]["sha256"]) == 16
    assert given.needs() == ("preconditioned_sgld",)


@pytest.mark.parametrize("sampler, message", [
    ("preconditioned_sgld", "sampler 'preconditioned_sgld' needs its preconditioner: pass "
                            "SGLDConfig(sampler=PreconditionedSGLD(P)) with P > 0, one value per weight"),
    (3, "sampler must be a sampler's name or object, got int"),
])
def test_a_sampler_that_cannot_be_made_is_a_one_line_error(sampler, message):
    with pytest.raises(FastLLCError) as error:
        SGLDConfig(sampler=sampler).validate()
    assert str(error.value) == message
