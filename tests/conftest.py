import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
