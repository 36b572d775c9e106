"""The flat parameter layout is defined once, by ``model.param_shapes``: the Triton kernel's offsets are derived
from it (``kernels.mlp_sgld.layout_constants``, checked here without importing Triton's kernels), and the C++
kernel's own (``make_shape`` in ``mlp_sgld_cpu.cpp``) and the engine's are checked against it by what they
compute: one step of pure drift is −drift·∇L_m, compared with autograd's gradient parameter by parameter."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastllc import ModularMLP, SGLDConfig, make_task
from fastllc.backends import backend_module
from fastllc.model import param_shapes
from fastllc.sampling import InjectedRandomness


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_one_drift_step_moves_each_parameter_by_its_own_gradient(backend):
    """p, e, h all different, so a block at a wrong offset or with a wrong shape cannot line up. γ = 0 and the
    injected noise is zero: w₁ − w* = −(ε·nβ/2)·∇L_m(w*) exactly in exact arithmetic; fp32 rounding of a
    gradient of order 0.1 and of the weights leaves ~1e-6 of the step (1e-3 of its scale: the tolerance)."""
    torch.manual_seed(0)
    p, e, h, m = 11, 5, 7, 16
    model = ModularMLP(p, e, h)
    x, y = make_task(p, "add").train_data()
    d = sum(math.prod(s) for s in param_shapes(p, e, h).values())
    minibatch = torch.randint(len(y), (1, 1, m), generator=torch.Generator().manual_seed(1))
    randomness = InjectedRandomness(minibatch, torch.zeros(1, 1, d))
    epsilon, nbeta = 1e-2, 100.0
    config = SGLDConfig(chains=1, steps=1, batch_size=m, epsilon=epsilon, gamma=0.0, nbeta=nbeta)
    samples = backend_module(backend).sample(model, x, y, F.cross_entropy, config, randomness=randomness)
    step = (samples.final_params[0] - torch.cat([t.detach().reshape(-1) for t in model.parameters()]))
    loss = F.cross_entropy(model(x[minibatch[0, 0]]), y[minibatch[0, 0]])
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    offset = 0
    for (name, shape), gradient in zip(param_shapes(p, e, h).items(), gradients):
        block = step[offset : offset + math.prod(shape)].view(shape)
        scale = (epsilon * nbeta / 2) * gradient.abs().max()
        torch.testing.assert_close(block, -(epsilon * nbeta / 2) * gradient, rtol=0, atol=1e-3 * float(scale),
                                   msg=lambda text: f"{name}: {text}")
        offset += math.prod(shape)
    assert offset == d == step.numel()


def test_the_triton_offsets_are_param_shapes_cumulative_sizes():
    import ast
    import inspect

    from fastllc.kernels import mlp_sgld  # noqa: F401  (imports Triton; defines nothing interpreted-specific)
    p, e, h = 11, 5, 7
    sizes = [math.prod(s) for s in param_shapes(p, e, h).values()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert mlp_sgld.layout_constants(p, e, h) == dict(OFF_L=starts[1], OFF_BL=starts[2], OFF_R=starts[3],
                                                       OFF_BR=starts[4], OFF_U=starts[5], D=sum(sizes))
    kernel_source = inspect.getsource(mlp_sgld)
    tree = ast.parse(kernel_source)
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in ([node.target] if isinstance(node, ast.AnnAssign) else node.targets) if isinstance(t, ast.Name)}
    assert not assigned & {"OFF_L", "OFF_BL", "OFF_R", "OFF_BR", "OFF_U", "D"}  # no second definition in the kernel
