import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def timm():
    """The timm package, for the tests that compare with it; only they skip without it."""
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def one_thread():
    """Run on one torch thread. With two threads on two cores, any other busy process stalls
    torch's OpenMP barriers: small training epochs and 10,000-image evaluations slow down
    tenfold (an epoch of 4 steps went from 0.2 s to 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
