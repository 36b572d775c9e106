"""Every backend follows the reference (``fastllc/conformance.py``): one test per backend, variant and device.

The cases come from the registry: every backend but the reference, on every variant its capabilities allow (a
variant it lacks is not generated), on the CPU, and on CUDA where the backend declares it (marked ``gpu``:
skipped without CUDA); each on the first of conformance's workloads it supports (a causal LM needs
transformers, an extra: skipped without it, as Triton's cases are without Triton). ``triton`` runs on the CPU in
Triton's interpreter (TRITON_INTERPRET=1, set before anything imports the kernels, as
tests/test_backend_triton.py does; the shapes are tiny). In a session that imported the kernels interpreted, a
CUDA case of triton runs them interpreted on the GPU's tensors too; the compiled kernel is checked by
``python -m fastllc.selfcheck --gpu`` (tests/test_selfcheck.py runs it).
"""

import importlib.util

import pytest
import torch

from fastllc import conformance
from fastllc.backends import NEEDED_FOR, backend_module, names
from fastllc.sampling import samplers

from conftest import interpreted

TRITON = importlib.util.find_spec("triton") is not None  # looked up, not imported: TRITON_INTERPRET must come first
if TRITON:  # defines the kernels interpreted, unless imported earlier
    interpreted(lambda: importlib.import_module("fastllc.kernels"))


def _cases():
    for device, marks in (("cpu", ()), ("cuda", (pytest.mark.gpu,))):
        for case in conformance.cases(device):
            yield pytest.param(case, id=f"{case.backend}-{case.variant}-{device}", marks=marks)


@pytest.mark.parametrize("case", list(_cases()))
def test_backend_follows_the_reference(case, monkeypatch):
    if case.device not in backend_module(case.backend).DEVICES:  # on the CPU only in an interpreter: Triton's
        if not TRITON:
            pytest.skip("Triton is an extra: pip install -e '.[dev]' (or '.[triton]') to test it")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read again while the interpreter runs
    try:
        outcome = conformance.check(case)
    except conformance.Unavailable as missing:  # a workload of an extra: transformers for a causal LM
        pytest.skip(str(missing))
    assert outcome.passed(), f"{case.name}: {outcome} exceeds τ = {conformance.TOLERANCE[torch.float32]:.3g}"


def test_every_capability_has_a_variant_and_every_backend_is_checked():
    needs = set().union(*(v.needs for v in conformance.VARIANTS.values()))
    assert needs | set(conformance.NOT_COMPARED) == set(NEEDED_FOR) and not needs & set(conformance.NOT_COMPARED)
    assert {v.sampler for v in conformance.VARIANTS.values()} == {None} | (set(samplers.names()) - {"sgld"})
    assert set(conformance.subjects()) == set(names()) - {conformance.REFERENCE}  # the ground truth is not a subject
    cpu = {(c.backend, c.variant) for c in conformance.cases("cpu")}
    assert ("generic", "mala") in cpu and ("native", "stacked_starts") in cpu and ("triton", "restrict") in cpu
    assert ("torch", "rmsprop_sgld_restrict") in cpu and ("generic", "preconditioned_sgld") in cpu  # 'samplers'
    assert ("native", "rmsprop_sgld") not in cpu and ("torch", "mala") not in cpu  # not declared: not generated
    assert {c.backend for c in conformance.cases("cuda")} == {"generic", "torch", "triton"}  # those declaring CUDA
    kinds = {name: conformance.workload(name, "cpu") for name in ("generic", "native", "torch", "triton")}
    assert kinds == {"generic": "any_module", "native": "study_mlp", "torch": "study_mlp", "triton": "study_mlp"}


def test_the_tolerance_is_two_ulps_a_step():
    assert conformance.TOLERANCE[torch.float32] == conformance.tolerance() == 2 * 8 * 2.0**-23
    assert conformance.tolerance(torch.float32, steps=20) == pytest.approx(4.77e-6, rel=1e-3)


def test_a_wrong_term_fails_the_check(monkeypatch):
    """The check is not vacuous: a backend whose γ is silently off by 10% (its update otherwise the reference's)
    fails by far more than τ; a backend moving a weight outside its mask breaks a rule without tolerance."""
    reference = backend_module("reference")

    def off_by_a_tenth(model, inputs, targets, loss_fn, config, *, device="cpu", **kw):
        settings = config.to_dict() | {"gamma": [1.1 * g for g in conformance.PER_CHAIN["gamma"]]}
        return reference.sample(model, inputs, targets, loss_fn, type(config)(**settings), **kw)

    monkeypatch.setattr(backend_module("torch"), "sample", off_by_a_tenth)
    assert conformance.check(conformance.Case("torch", "sgld")).error > 100 * conformance.TOLERANCE[torch.float32]

    def leaky(model, inputs, targets, loss_fn, config, *, device="cpu", restrict=None, **kw):
        return reference.sample(model, inputs, targets, loss_fn, config, **kw)  # the mask ignored

    monkeypatch.setattr(backend_module("torch"), "sample", leaky)
    with pytest.raises(conformance.Nonconformance, match="outside the restriction"):
        conformance.check(conformance.Case("torch", "restrict"))
