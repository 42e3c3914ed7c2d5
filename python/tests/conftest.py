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


def eight_prompt_batch(ckpt, seed=5):
    """An E batch sampled from the checkpoint's policy, 8 prompts x 4 responses, with GRPO advantages of
    seeded rewards: the golden E's 4 prompts are too few for the control variates' cross-fitted fit
    (features + 2 = 7 prompts)."""
    import numpy as np

    import entropy_probe as ep

    batch = ckpt.sample([[1 + b, 2 + 2 * b, 3] for b in range(8)], G=4, max_new_tokens=8, seed=seed)
    rewards = np.random.default_rng(seed).normal(size=(8, 4))
    batch["rewards"], batch["advantages"] = rewards, ep.grpo_advantages(rewards)
    return batch
