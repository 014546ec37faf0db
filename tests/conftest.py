import os
from pathlib import Path

import pytest

os.environ.setdefault("CI", "1")  # quiet progress bars in tests


def _real_root():
    root = os.environ.get("CIFAR10_ROOT")
    if root and (Path(root).expanduser() / "cifar-10-batches-py").is_dir():
        return Path(root).expanduser()
    return None


@pytest.fixture(scope="session")
def cifar():
    """The real CIFAR-10; skips (saying why) when CIFAR10_ROOT does not point at it."""
    root = _real_root()
    if root is None:
        pytest.skip(
            "real CIFAR-10 not available: set CIFAR10_ROOT to a folder holding cifar-10-batches-py/ (see README)"
        )
    from common.data import load_cifar10

    return load_cifar10(root, download=False)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Run caches, exported results and figures of tests go to a temporary folder, never into the repository."""
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FIG_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
