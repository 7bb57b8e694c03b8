"""Shared fixtures and markers.

GPU tests are marked `gpu` and skipped where CUDA is absent; pytest's `-ra` summary lists every skip,
so a skipped test is never read as a pass.
"""

import os

import pytest
import torch

# HF tokenizers warn when a process forks after using their thread pool (our subprocess tests do);
# keep test output readable.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
