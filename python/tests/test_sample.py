"""Checkpoint.sample: the library's sampler, reproducible from the seed, batches the probe accepts."""
import numpy as np
import pytest

import entropy_probe as ep
from conftest import GOLDEN

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


@pytest.fixture(scope="module", params=["gpt2_lora", "qwen2_lora"])
def ckpt(request):
    return ep.Checkpoint(GOLDEN / request.param, dtype="f64")


def test_reproducible_from_seed(ckpt):
    a = ckpt.sample(PROMPTS, G=3, max_new_tokens=5, seed=11)
    b = ckpt.sample(PROMPTS, G=3, max_new_tokens=5, seed=11)
    c = ckpt.sample(PROMPTS, G=3, max_new_tokens=5, seed=12)
    assert set(a) == {"sequences", "attention_mask", "prompt_lens", "advantages"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["sequences"], c["sequences"])
    assert a["sequences"].shape == (3, 3, 4 + 5)
    np.testing.assert_array_equal(a["prompt_lens"], [3, 2, 4])
    for b_, p in enumerate(PROMPTS):
        assert (a["sequences"][b_, :, :len(p)] == p).all()
    assert (a["sequences"] < ckpt.vocab_size).all()


def test_stop_tokens_end_the_response(ckpt):
    full = ckpt.sample(PROMPTS, G=4, max_new_tokens=6, seed=5)
    # The first tokens of rows (0, 0) and (1, 0): every row draws its first token before any can stop,
    # so with these as stop tokens both rows end after one token.
    stop = [int(full["sequences"][0, 0, 3]), int(full["sequences"][1, 0, 2])]
    s = ckpt.sample(PROMPTS, G=4, max_new_tokens=6, seed=5, stop_tokens=stop)
    ended = 0
    for b, p in enumerate(PROMPTS):
        for g in range(4):
            resp = s["sequences"][b, g, len(p):][s["attention_mask"][b, g, len(p):] == 1]
            hits = np.flatnonzero(np.isin(resp, stop))
            if hits.size:
                assert list(hits) == [resp.size - 1]  # kept, and nothing after it
                ended += 1
            else:
                assert resp.size == 6
    assert s["attention_mask"][0, 0, 4:].sum() == 0 and s["attention_mask"][1, 0, 3:].sum() == 0
    assert ended >= 2


def test_sampled_batches_are_valid_for_the_probe(ckpt, tmp_path):
    E = ckpt.sample(PROMPTS, G=4, max_new_tokens=4, seed=1)
    U = ckpt.sample(PROMPTS[:2], G=4, max_new_tokens=4, seed=2)
    for batch in (E, U):
        rewards = (batch["sequences"] % 3 == 0).sum(axis=2).astype(float)  # a stand-in reward
        batch["rewards"], batch["advantages"] = rewards, ep.grpo_advantages(rewards)
    r = ckpt.run(E, U, ground_truth="adam")
    assert (r["B_E"], r["B_U"]) == (3, 2)
    assert np.isfinite([r["deltaH1"], r["SE_deltaH1"], r["deltaH_true_tok"]]).all()
    ep.save_batch(E, tmp_path / "E.safetensors")  # and as a file, for `entropy-probe run`
    assert ckpt.run(tmp_path / "E.safetensors", U, ground_truth="adam")["deltaH1"] == r["deltaH1"]


def test_top_k_1_and_a_tiny_top_p_are_greedy(ckpt):
    greedy = [ckpt.sample(PROMPTS, G=3, max_new_tokens=4, top_k=1, seed=s)["sequences"] for s in (1, 2)]
    assert np.array_equal(greedy[0], greedy[1])
    assert (greedy[0] == greedy[0][:, :1]).all()  # every response of a prompt alike
    nucleus = ckpt.sample(PROMPTS, G=3, max_new_tokens=4, top_p=1e-9, seed=3)["sequences"]
    assert np.array_equal(nucleus, greedy[0])
    wide = ckpt.sample(PROMPTS, G=3, max_new_tokens=4, top_k=ckpt.vocab_size, top_p=1.0, seed=3)["sequences"]
    assert np.array_equal(wide, ckpt.sample(PROMPTS, G=3, max_new_tokens=4, seed=3)["sequences"])


def test_bad_prompts_are_errors(ckpt):
    with pytest.raises(ep.UsageError, match="outside the vocabulary"):
        ckpt.sample([[ckpt.vocab_size]], G=2, max_new_tokens=2)
    with pytest.raises(ep.UsageError, match=r"stop_tokens\[1\] = -1 is outside the vocabulary"):
        ckpt.sample(PROMPTS, G=2, max_new_tokens=2, stop_tokens=[0, -1])
    with pytest.raises(ep.UsageError, match="top_p = 1.5 must be in"):
        ckpt.sample(PROMPTS, G=2, max_new_tokens=2, top_p=1.5)
    with pytest.raises(ep.UsageError, match="prompt 1 is empty"):
        ckpt.sample([[1], []], G=2, max_new_tokens=2)
