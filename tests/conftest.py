"""Shared test set-up: real data from ../shared/datasets (or $FM_RAY_DATA), a repo-local cache, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FM_RAY_DATA", str((ROOT.parent / "shared" / "datasets").resolve()))
os.environ.setdefault("FM_RAY_CACHE", str(ROOT / ".cache" / "fm_ray"))
os.environ["FM_RAY_OFFLINE"] = "1"  # a missing dataset must fail fast, never hang on a download


@pytest.fixture(scope="session")
def fmnist():
    from fm_ray.config import DataConfig
    from fm_ray.data import load_dataset

    return load_dataset(DataConfig(dataset="fashion_mnist"))
