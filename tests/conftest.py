import os
import warnings

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    warnings.warn("TRITON_INTERPRET=1 is not set: the Triton kernel tests are skipped on this "
                  "CPU-only machine (it must be set before Python starts)")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="programs per differential-fuzzer test (tests/models/test_fuzz.py), "
                          "drawn afresh; default: the fixed CI set")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def backend(monkeypatch):
    """Run the test body with CNNFUSE_BACKEND set to the given value."""
    def use(name: str):
        monkeypatch.setenv("CNNFUSE_BACKEND", name)
    return use
