"""Sample, score and probe a checkpoint from Python: predicted against true entropy change.

usage: python examples/python/offline_probe.py CHECKPOINT_DIR [TOKENIZER]   (docs/python.md)
CHECKPOINT_DIR as in docs/checkpoints.md; TOKENIZER (default CHECKPOINT_DIR) for transformers.
"""
import sys

import numpy as np
from transformers import AutoTokenizer

import entropy_probe


def reward(prompt: str, response: str) -> float:  # your reward function
    return float("Paris" in response)


ckpt_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else ckpt_dir)
ckpt = entropy_probe.Checkpoint(ckpt_dir, dtype="f32")
prompts = ["The capital of France is", "Q: Which city is the capital of France?\nA:", "France's capital city,"]
stop = [tok.eos_token_id] if tok.eos_token_id is not None else []


def scored_batch(seed: int) -> dict:
    batch = ckpt.sample([tok(p)["input_ids"] for p in prompts], G=8, max_new_tokens=24, stop_tokens=stop, seed=seed)
    rewards = np.array([[reward(prompts[b], tok.decode(row[p:][mask[p:] == 1], skip_special_tokens=True))
                         for row, mask in zip(batch["sequences"][b], batch["attention_mask"][b])]
                        for b, p in enumerate(batch["prompt_lens"])])
    batch["rewards"], batch["advantages"] = rewards, entropy_probe.grpo_advantages(rewards)
    return batch


r = ckpt.run(scored_batch(seed=1), scored_batch(seed=2), ground_truth="adam")  # E and U: independent samples
print(f"predicted entropy change (deltaH1): {r['deltaH1']:+.3e} +- {r['SE_deltaH1']:.1e}")
print(f"true entropy change (one Adam step): {r['deltaH_true_tok']:+.3e}  (ESS {r['ESS']:.1f} of {r['B_E'] * 8})")
