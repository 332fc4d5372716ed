import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread():
    """Small models and small inputs: one thread is as fast, and immune to thread oversubscription on a busy box.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def diffusers():
    """The diffusers module, for the comparisons with diffusers' own models and schedulers (a dev dependency):
    a test that takes it is skipped where diffusers is not installed."""
    return pytest.importorskip("diffusers")


@pytest.fixture
def gaussian():
    """Gaussian data for the oracle tests (tests/oracles.py): the mean mu (D,) and 32 starting noises x_T (32, D),
    float64, from seed 0."""
    from oracles import gaussian_data

    return gaussian_data()
