"""Small helpers every notebook uses: seeding and counting parameters."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["set_seed", "count_parameters"]


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so a notebook prints the same numbers every run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (entries of every weight tensor) in `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
