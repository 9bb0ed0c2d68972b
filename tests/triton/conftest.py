"""Kernel tests run under the Triton interpreter on CPU (CI has no GPU); the root
conftest sets ``TRITON_INTERPRET`` before anything imports triton.

``CLQ_TRITON_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU instead
(benchmarks/run_gpu.sh does).
"""

from __future__ import annotations

import os

import pytest

ON_GPU = os.environ.get("CLQ_TRITON_TEST_DEVICE", "cpu") == "cuda"


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: CPU tensors under the interpreter, else the GPU."""
    return "cuda" if ON_GPU else "cpu"
