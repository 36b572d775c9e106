import importlib.util
import os

import pytest
import torch

from fastllc import TrainConfig, native_build, train


def interpreted(import_):
    """``import_()`` with TRITON_INTERPRET=1 set, the variable restored after: what Triton and ``fastllc.kernels``
    are first imported under, to be defined for Triton's interpreter (tests/test_backend_triton.py and
    tests/test_conformance.py import the kernels this way)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return import_()
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _first_import_of_triton_interpreted() -> None:
    """Triton decides at its first import whether its own helpers (``tl.philox``) are compiled or interpreted,
    and ``transformers`` imports it whenever it builds a model: a test module collected before
    tests/test_backend_triton.py that builds one would leave the kernels no interpreter to run in. So, without
    CUDA, the first import happens here, under TRITON_INTERPRET=1."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    interpreted(lambda: importlib.import_module("triton"))


_first_import_of_triton_interpreted()


def pytest_configure(config):
    """One torch thread for the whole session. The tests' tensors are tiny, and torch's intra-op pool
    sized to the machine's cores fights every other process for them: one reference test took 500 s on a
    loaded 2-core machine against 16 s pinned. Backends that split chains into thread groups still do
    so when a test asks for it (``workers=``); subprocesses that tests start choose their own threads."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with that reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); python -m fastllc.selfcheck --gpu on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A p=5 modular-addition run of 60 batches: enough structure for plumbing tests, trains in a second."""
    return train(TrainConfig(p=5, embed=4, hidden=16, batches=60, checkpoints=3, seed=1),
                 tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def trained_p23(tmp_path_factory):
    """The published p = 23 network: default architecture and training (10,000 batches, ~15 s)."""
    return train(TrainConfig(p=23), tmp_path_factory.mktemp("runs") / "p23")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def real_cxx(monkeypatch):
    """The system's C++ compiler, as fastllc finds it with FASTLLC_CXX unset (``native_build.compiler``), for
    tests that wrap it in a fake one; they skip where there is none (CI machines have g++: the README says so)."""
    monkeypatch.delenv("FASTLLC_CXX", raising=False)
    try:
        return native_build.compiler()
    except native_build.NativeUnavailable:
        pytest.skip("no C++ compiler here")
