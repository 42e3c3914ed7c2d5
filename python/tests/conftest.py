import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden"
CHECKPOINTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="session")
def cli():
    """`entropy-probe` (ENTROPY_PROBE_CLI, set by scripts/test-python when build/ has it), or None."""
    path = os.environ.get("ENTROPY_PROBE_CLI")
    if path and not os.access(path, os.X_OK):
        pytest.fail(f"ENTROPY_PROBE_CLI={path} is not an executable")
    return path
