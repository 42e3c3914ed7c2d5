"""load_batch / save_batch (the library's batch-file reader and writer) and grpo_advantages."""
import numpy as np
import pytest

import entropy_probe as ep
from conftest import CHECKPOINTS, GOLDEN


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_file_round_trip(name, tmp_path):
    a = ep.load_batch(GOLDEN / name / "E.safetensors")
    assert {"sequences", "attention_mask", "prompt_lens", "advantages"} <= set(a)
    ep.save_batch(a, tmp_path / "E.safetensors")
    b = ep.load_batch(tmp_path / "E.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_optional_keys_and_input_dtypes_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    B, G, T = 2, 3, 5
    batch = {
        "sequences": rng.integers(0, 50, (B, G, T)).astype(np.int32),
        "attention_mask": np.ones((B, G, T), dtype=bool),
        "prompt_lens": np.array([2, 1], dtype=np.uint8),
        "advantages": rng.standard_normal((B, G)).astype(np.float32),
        "max_lengths": np.array([4, 3]),
        "rewards": rng.standard_normal((B, G)),
        "position_ids": np.tile(np.arange(T), (B, G, 1)),
    }
    ep.save_batch(batch, tmp_path / "b.safetensors")
    got = ep.load_batch(tmp_path / "b.safetensors")
    assert set(got) == set(batch)
    for k, v in batch.items():
        assert np.array_equal(got[k], np.asarray(v, dtype=got[k].dtype)), k
        assert got[k].dtype == (np.float64 if k in ("advantages", "max_lengths", "rewards") else np.int64)


def test_grpo_advantages_are_reward_minus_group_mean():
    r = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 6.0]])
    np.testing.assert_array_equal(ep.grpo_advantages(r), r - r.mean(axis=1, keepdims=True))
    scaled = ep.grpo_advantages(r, scale_by_std=True, eps=1e-6)
    np.testing.assert_allclose(scaled, (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True)
                                                                              + 1e-6), rtol=1e-14)
    with pytest.raises(ep.UsageError, match=r"\[B, G\]"):
        ep.grpo_advantages(np.zeros(4))
