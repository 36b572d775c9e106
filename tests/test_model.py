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
