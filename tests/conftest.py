"""Test setup: Triton kernels run under the CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels, hence before any
``adclr`` import: this file is loaded by pytest first.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, replayable failures."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield
