import os

# Triton fixes interpret-vs-compile when `triton` itself is first imported (its own @jit
# helpers such as tl.zeros are built then), and torch, diffusers or the kernel modules may
# import it while other test folders are collected. So the interpreter (CI has no GPU) is
# chosen here, in the root conftest, before anything else is imported.
# ``CLQ_TRITON_TEST_DEVICE=cuda`` runs the kernel tests compiled on a GPU instead.
if os.environ.get("CLQ_TRITON_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker is a process with torch's default of one thread per core;
# N workers would then run N x cores threads and spin against each other. Share the cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
