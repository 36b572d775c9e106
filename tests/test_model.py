import torch
import torch.nn.functional as F

from fastllc import ModularMLP
from fastllc.model import param_shapes


def test_parameter_names_and_shapes_are_canonical():
    model = ModularMLP(7, 5, 13)
    shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
    assert list(shapes) == list(param_shapes(7, 5, 13))
    assert shapes == param_shapes(7, 5, 13)


def test_forward_matches_the_written_formula():
    model = ModularMLP(7, 5, 13)
    pairs = torch.tensor([[0, 1], [6, 6], [3, 0]])
    E = model.embed.weight
    pre = E[pairs[:, 0]] @ model.left.weight.T + model.left.bias + E[pairs[:, 1]] @ model.right.weight.T + model.right.bias
    expected = F.gelu(pre) @ model.unembed.weight.T
    torch.testing.assert_close(model(pairs), expected)


def test_scale_input_weights_scales_the_three_input_matrices_in_place():
    from fastllc.model import INPUT_WEIGHTS, scale_input_weights
    model = ModularMLP(7, 5, 13)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert scale_input_weights(model, 0.5) is model
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name] * (0.5 if name in INPUT_WEIGHTS else 1.0), rtol=0, atol=0)
    assert INPUT_WEIGHTS == ("embed.weight", "left.weight", "right.weight")
