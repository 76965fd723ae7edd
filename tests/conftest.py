"""Test-wide settings: the hub is never contacted, so offline failures are instant."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting threads stall a shared CPU

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environment_kept():
    """Every test leaves os.environ as it found it: `flows.cli.main` sets Prefect's settings
    there (its console level, say), and a later test's subprocesses would inherit them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# S3 fixtures (a real moto server on 127.0.0.1) for every test file.
pytest_plugins = ["tests.s3server"]
