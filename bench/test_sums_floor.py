#!/usr/bin/env python3
"""bench/sums_floor.py's list of products against PyTorch's own count: torch's FlopCounterMode
over one forward + backward of the sum X loss in transformers + peft (eager attention) on an
unpadded batch. PyTorch computes every position (the head and the last layer on all of them)
and the whole T x T attention products, so the list is built with N = m = R T and causal=False;
the FLOP totals must then be equal, forward and backward each.

    PYTHON bench/test_sums_floor.py      (or pytest bench/test_sums_floor.py)
"""
from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare_pytorch as cp  # noqa: E402
import sums_floor  # noqa: E402

TINY = dict(cp.BENCH, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)


def test_floor_products_match_torch_flop_count():
    import torch
    from make_golden import lmax_of, seq_logprobs, x_losses
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as d:
        gen = cp.write_checkpoint(d, TINY, dict(B=1, G=2, T=72), steps=1)
        B, G, T = 2, 3, 40
        batch = cp.random_batch(torch, B, G, T, TINY["vocab_size"], gen, full=True)
        _, model = cp.load_torch_model(d, attn="eager")
        r = model.peft_config["default"].r
    counter = FlopCounterMode(display=False)
    with counter:
        S, L = seq_logprobs(model, batch)
        x_losses(S, L, lmax_of(batch, L), "dr_grpo").sum().backward()
    torch_flop = counter.get_total_flops()
    entries = sums_floor.gemm_list(TINY, r, B * G * T, B * G * T, B * G, T, causal=False)
    ours = sum(e[3] for e in entries)
    assert ours == torch_flop, f"sums_floor counts {ours:.0f} FLOP, PyTorch {torch_flop:.0f}"
    print(f"ok: {ours:.0f} FLOP on both sides")


if __name__ == "__main__":
    test_floor_products_match_torch_flop_count()
