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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test of a module that draws fresh random inputs (a module-level RUN_SEED) reports the seed, whatever
    failed (an accuracy bound, a shape, an exception), so MEGALITE_TEST_SEED=N replays it."""
    outcome = yield
    report = outcome.get_result()
    run_seed = getattr(getattr(item, "module", None), "RUN_SEED", None)
    if report.failed and run_seed is not None:
        fixed = getattr(item.module, "FIXED_SEED", None)
        text = f"MEGALITE_TEST_SEED={run_seed} replays this run's random inputs"
        report.sections.append(("random seed", text + (f" (fixed-seed cases: {fixed})" if fixed is not None else "")))
