"""Test setup: without a GPU the Triton kernels run under the interpreter (small shapes only)."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: runs the Triton kernels (interpreted on CPU)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure) so kernels are checked on new inputs every run."""
    value = int(os.environ.get("ATTN_PATCH_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Recipes called in-process each build an Accelerator; accelerate keeps its state per process and
    refuses a second mixed precision (bf16 recipes after an fp32 one on a GPU), so reset it after
    every test, as a fresh process would be."""
    yield
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with a floor of 1e-2 per element under ||b|| so that an exactly-zero
    reference (e.g. dq when a row sees a single key) does not turn rounding into a huge ratio."""
    a, b = a.double(), b.double()
    floor = 1e-2 * b.numel() ** 0.5
    return ((a - b).norm() / (b.norm() + floor)).item()


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
