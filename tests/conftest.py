"""Test-wide settings. The Triton interpreter must be chosen before triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402 - the environment above must be set before anything imports triton


@pytest.fixture
def triton_backend():
    """Run the test with the Triton backend and fresh launch counters (kernel and model tests)."""
    import megalite.kernels as K

    K.set_backend("triton")
    K.reset_kernel_calls()
    yield
    K.set_backend("auto")
