"""Learning tests train for many small steps: run them on one intra-op thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One thread sums every reduction in one order whatever the machine's core count, so the measured losses and
    choices are those the thresholds were set on; and on a busy 2-core machine two spinning threads are several
    times slower than one at these sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
