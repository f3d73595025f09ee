"""Layer tests run on tiny tensors: one intra-op thread avoids OpenMP synchronisation costs that
dominate such ops on a busy 2-core machine (seen: a 48-element softmax taking 10 ms with 2 threads)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
