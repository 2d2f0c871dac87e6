"""Shared fixtures: the real-data folder (skip cleanly where absent) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $MARLIN_SHARED_DATA), or None when absent."""
    env = os.environ.get("MARLIN_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data (../shared/data) not present")
    return path


@pytest.fixture
def tiny_config():
    from marlin import get_config

    return get_config("marlin_vit_tiny_test")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
