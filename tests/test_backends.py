"""The backend registry (fastllc/backends/__init__.py): the contract every backend module keeps, and choosing
a backend by capability, with a one-line error when no backend can do what is asked."""

import copy
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import FastLLCError, ModularMLP, SGLDConfig, estimate, make_task
import fastllc.backends
from fastllc.backends import NEEDED_FOR, auto_order, backend_module, names, resolve_backend, with_capabilities
from fastllc.backends import reference
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import on_device

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _training_batchnorm():
    """A model the generic backend cannot vmap (BatchNorm updating its statistics): only the reference runs it."""
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()


def test_the_registry_finds_every_backend_module_and_orders_them_fastest_first():
    assert names() == ("generic", "native", "reference", "torch", "transformer", "triton")
    assert auto_order() == ["triton", "native", "torch", "transformer", "generic", "reference"]


@pytest.mark.parametrize("name", names())
def test_every_backend_is_one_module_with_the_contract_and_its_own_test_and_bench_files(name):
    module = backend_module(name)
    assert module.__name__ == f"fastllc.backends.{name}" and module.NAME == name
    assert isinstance(module.CAPABILITIES, frozenset) and module.CAPABILITIES <= set(NEEDED_FOR)
    assert isinstance(module.DEVICES, tuple) and set(module.DEVICES) <= {"cpu", "cuda"}
    assert isinstance(module.AUTO_PRIORITY, int)
    for function in ("supports", "require", "sample"):
        assert callable(getattr(module, function)), function
    assert list(inspect.signature(module.require).parameters)[:3] == ["device", "model", "loss_fn"]
    assert hasattr(module, "sample_starts") == ("stacked_starts" in module.CAPABILITIES)
    assert (ROOT / "tests" / f"test_backend_{name}.py").is_file()
    assert (ROOT / "bench" / f"test_bench_{name}.py").is_file()


def test_a_module_named_torch_does_not_hide_the_real_torch():
    backend = importlib.import_module("fastllc.backends.torch")
    assert backend.torch is torch and backend.NAME == "torch"


def study_mlp_backend() -> str:
    """What ``auto`` gives the study's MLP on the CPU: the native kernel where it builds (tests/test_backend_native.py
    checks the fallback without a compiler), else torch."""
    from fastllc.backends import native
    return "native" if native.unavailable_reason() is None else "torch"


def test_auto_picks_the_fastest_backend_that_runs_the_model():
    assert resolve_backend("auto", CPU) == study_mlp_backend()  # no model yet (the CLI): the study's MLP
    assert resolve_backend("auto", CPU, ModularMLP(5, 4, 16), F.cross_entropy) == study_mlp_backend()
    assert resolve_backend("auto", CPU, nn.Linear(3, 2), F.cross_entropy) == "generic"
    assert resolve_backend("auto", CPU, _training_batchnorm(), F.cross_entropy) == "reference"


def test_capabilities_choose_the_backend():
    assert with_capabilities(["mala"]) == ["generic"]
    assert with_capabilities(["stacked_starts"]) == ["triton", "native", "torch"]  # the fastest first
    assert resolve_backend("auto", CPU, ModularMLP(5, 4, 16), F.cross_entropy, needs=("mala",)) == "generic"
    assert (resolve_backend("auto", CPU, ModularMLP(5, 4, 16), F.cross_entropy, needs=("stacked_starts",))
            == study_mlp_backend())
    assert resolve_backend("generic", CPU, nn.Linear(3, 2), F.cross_entropy, needs=("mala",)) == "generic"


@pytest.mark.parametrize("name, model, needs, message", [
    ("auto", _training_batchnorm(), ("mala",),
     "mala=True (the MALA acceptance rate) needs backend 'generic', which cannot run this model (Sequential) "
     "with this loss on cpu"),
    ("torch", ModularMLP(5, 4, 16), ("mala",), "mala=True (the MALA acceptance rate) needs backend 'generic', not 'torch'"),
    ("generic", ModularMLP(5, 4, 16), ("stacked_starts",),  # named: those that run this model here (no CUDA)
     "several starting points in one batch (estimate_checkpoints) needs backend 'native' or 'torch', "
     "not 'generic'"),
    ("auto", nn.Linear(3, 2), ("stacked_starts",),
     "several starting points in one batch (estimate_checkpoints) needs backend 'triton' or 'native' or 'torch', "
     "which cannot "
     "run this model (Linear) with this loss on cpu"),
])
def test_a_capability_no_backend_offers_here_is_a_one_line_error(name, model, needs, message):
    with pytest.raises(FastLLCError) as error:
        resolve_backend(name, CPU, model, F.cross_entropy, needs=needs)
    assert str(error.value) == message


def test_unknown_names_are_refused():
    with pytest.raises(FastLLCError, match="^unknown backend 'fast'; choose one of auto, generic, native, reference, torch, transformer, triton$"):
        resolve_backend("fast", CPU)
    with pytest.raises(ValueError, match="unknown capabilities"):  # a caller's typo
        with_capabilities(["malaa"])


def test_mala_on_a_model_generic_cannot_run_is_refused_before_sampling():
    x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    model = _training_batchnorm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FastLLCError, match="^mala=True .* needs backend 'generic', which cannot run this model"):
        estimate(model, (x, y), chains=2, steps=4, batch_size=4, mala=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing ran, nothing changed


@pytest.mark.parametrize("backend", ["reference", "torch", "generic", "native"])
def test_estimate_leaves_the_callers_model_as_it_was(backend):
    x, y = make_task(5, "add", seed=0).train_data()
    model = ModularMLP(5, 4, 16)
    before = copy.deepcopy(model.state_dict())
    estimate(model, (x, y), backend=backend, chains=2, steps=5, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device == CPU for p in model.parameters())


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_batchnorm_statistics_of_the_callers_model_are_not_updated(backend):
    """A BatchNorm in training mode updates its running statistics in every forward pass: on the backends'
    private copies of the buffers, never on the caller's model (auto picks the reference for it)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    model = _training_batchnorm()
    before = copy.deepcopy(model.state_dict())
    result = estimate(model, (x, y), backend=backend, chains=2, steps=5, batch_size=4)
    assert result.backend == "reference"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_elsewhere_is_copied_to_the_sampling_device_never_moved():
    model = nn.Linear(3, 2)
    assert on_device(model, "cpu") is model  # already there: no copy
    moved = on_device(model, "meta")  # a device every machine has, standing in for CUDA
    assert moved is not model and next(moved.parameters()).device.type == "meta"
    assert next(model.parameters()).device == CPU


def test_sampling_settings_reach_the_backend_that_was_chosen():
    x, y = make_task(5, "add", seed=0).train_data()
    result = estimate(ModularMLP(5, 4, 16), (x, y), chains=2, steps=5, batch_size=4, mala=True)
    assert result.backend == "generic" and 0 < result.mala_acceptance <= 1
    assert estimate(ModularMLP(5, 4, 16), (x, y), config=SGLDConfig(chains=2, steps=5, batch_size=4)).backend == study_mlp_backend()


def test_the_worked_example_in_the_design_notes_is_a_backend_by_adding_its_module(tmp_path, monkeypatch):
    """docs/design.md's example module, dropped into the package (a temporary directory on its path), is a
    backend: named, chosen explicitly, never by auto, and refused a capability it lacks in one line."""
    notes = (ROOT / "docs" / "design.md").read_text()
    code = re.search(r"```python\n# fastllc/backends/example.py\n(.*?)```", notes, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    monkeypatch.setattr(fastllc.backends, "__path__", [*fastllc.backends.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fastllc.backends.example", raising=False)
    try:
        assert "example" in names() and auto_order()[-1] == "example"
        assert resolve_backend("example", CPU) == "example"
        assert resolve_backend("auto", CPU, nn.Linear(3, 2), F.cross_entropy) == "generic"
        x, y = make_task(5, "add", seed=0).train_data()
        model, config = ModularMLP(5, 4, 16), SGLDConfig(chains=2, steps=5, batch_size=4)
        noise = InjectedRandomness.seeded(2, 5, len(y), 4, sum(p.numel() for p in model.parameters()))
        ours = fastllc.backends.sample(model, x, y, F.cross_entropy, config, backend="example", randomness=noise)
        theirs = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise)
        assert ours.backend == "example" and torch.equal(ours.final_params, theirs.final_params)
        with pytest.raises(FastLLCError) as error:
            resolve_backend("example", CPU, needs=("mala",))
        assert str(error.value) == "mala=True (the MALA acceptance rate) needs backend 'generic', not 'example'"
    finally:
        sys.modules.pop("fastllc.backends.example", None)
        if hasattr(fastllc.backends, "example"):
            delattr(fastllc.backends, "example")
