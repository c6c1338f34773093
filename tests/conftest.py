"""Shared fixtures (the helpers they use are in helpers.py)."""
import os

import pytest
import torch

from helpers import write_dataset

# At most 2 threads (the machine's cores), fewer when OMP_NUM_THREADS asks for fewer (a test run
# sharing the machine with other work).
torch.set_num_threads(min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """1 torch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): on a
    shared 2-core machine, 2 OpenMP threads competing with other processes made a training step
    10-20x slower (measured 2-5 s vs 0.2-0.3 s); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """8 training images of 128x128 with 1-3 objects each, registered as ``solo_tiny_train``."""
    write_dataset(tmp_path_factory.mktemp("tiny"), "solo_tiny_train", 8, seed=0)
    return "solo_tiny_train"
