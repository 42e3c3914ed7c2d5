"""Sample, score and probe a checkpoint from Python: predicted against true entropy change, and the samples
that drive it.

usage: python examples/python/offline_probe.py CHECKPOINT_DIR [TOKENIZER]   (docs/python.md)
CHECKPOINT_DIR as in docs/checkpoints.md; TOKENIZER (default CHECKPOINT_DIR) for transformers.
"""
import sys

import numpy as np
from transformers import AutoTokenizer

import entropy_probe

capitals = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa"}  # 8 prompts: control variates need 7+
prompts = [f"Q: Which city is the capital of {country}?\nA:" for country in capitals]


def reward(b: int, response: str) -> float:  # your reward function
    return float(list(capitals.values())[b] in response)


ckpt_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else ckpt_dir)
ckpt = entropy_probe.Checkpoint(ckpt_dir, dtype="f32")
stop = [tok.eos_token_id] if tok.eos_token_id is not None else []


def scored_batch(seed: int) -> dict:
    batch = ckpt.sample([tok(p)["input_ids"] for p in prompts], G=8, max_new_tokens=24, stop_tokens=stop, seed=seed)
    rewards = np.array([[reward(b, tok.decode(row[p:][mask[p:] == 1], skip_special_tokens=True))
                         for row, mask in zip(batch["sequences"][b], batch["attention_mask"][b])]
                        for b, p in enumerate(batch["prompt_lens"])])
    batch["rewards"], batch["advantages"] = rewards, entropy_probe.grpo_advantages(rewards)
    return batch


# E and U: independent samples; direction="both" adds the real AdamW step, which the influences split up.
r = ckpt.run(scored_batch(seed=1), scored_batch(seed=2), ground_truth="adam", direction="both", influence=True,
             control_variates=True)
adamw, cv = r["directions"]["adamw"], r["control_variates"]
print(f"predicted entropy change: {adamw['deltaH1']:+.3e} along the AdamW step; along eta mu_Y {cv['deltaH1_plain']:+.3e}"
      f" +- {cv['SE_plain']:.1e}, with control variates {cv['deltaH1']:+.3e} +- {cv['SE']:.1e}")
print(f"true entropy change (one Adam step): {r['deltaH_true_tok']:+.3e}  (ESS {r['ESS']:.1f} of {r['B_E'] * 8})")
print(f"top samples (momentum {adamw['momentum_share']:+.2e}, weight decay {adamw['decay_share']:+.2e}):")
for s in sorted(r["influence"], key=lambda s: -abs(s["influence"]))[:5]:
    print(f"  prompt {s['prompt']} completion {s['completion']}: {s['influence']:+.3e} (reward {s['reward']:.0f})")
