#!/usr/bin/env python3
"""Sampling throughput: `entropy-probe sample` (the KV-cached sampler) against
transformers' `generate` on the same checkpoint, float32 on the CPU with 2
threads, in tokens per second of generated tokens.

Both sides sample G responses for each of B random prompts of P tokens, all
of M new tokens (no stop token; generate with min_new_tokens = M), with the
LoRA adapter unmerged (PeftModel, sdpa attention: generate as a user runs
it). Each measurement is a fresh process; the sides are interleaved,
alternating which goes first; the median over rounds is reported. The C++
number is the one the command prints (sampling only, not loading); the
PyTorch one times generate() after one warm-up call.

Checkpoints: --checkpoint DIR, a Qwen2 checkpoint directory with its adapter,
e.g. bench/compare_pytorch.py --make-bench-checkpoint DIR (small) or
bench/memory_compare.py --make-only --cases qwen05b (the Qwen2.5-0.5B shape).

    PYTHON bench/sample_compare.py --checkpoint /tmp/bench_ckpt \\
        --cli build/examples/entropy-probe [--B 4 --G 4 --P 32 --M 64] [--rounds 3] [--json OUT]

PYTHON: the peer venv's interpreter (bench/compare_pytorch.py). Peak memory of each process is
its max RSS from os.wait4, as in bench/compare_pytorch.py.

Target (issue 17): at least 2x generate's tokens/s at the 0.5B shape.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compare_pytorch import THREADS, load_torch_model, run_measured  # noqa: E402


def write_prompts(path: str, B: int, P: int, vocab: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(B):
            f.write(json.dumps([rng.randrange(2, vocab) for _ in range(P)]) + "\n")


def torch_worker(args) -> None:
    """generate() over the prompts file; prints one JSON line with tokens/s."""
    torch, model = load_torch_model(args.checkpoint, attn="sdpa")
    with open(args.prompts) as f:
        prompts = [json.loads(line) for line in f]
    ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, max_new_tokens=args.M, min_new_tokens=args.M, num_return_sequences=args.G,
              temperature=1.0, top_k=0, top_p=1.0, pad_token_id=1, use_cache=True)
    with torch.no_grad():
        torch.manual_seed(0)
        model.generate(input_ids=ids, attention_mask=mask, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        secs = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * out.shape[0]
    print(json.dumps({"tokens": n, "seconds": secs, "tokens_per_s": n / secs}))


def run_cpp(args, env) -> tuple[float, int]:
    """(tokens/s, peak RSS in kB) of one `entropy-probe sample` process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.cli, "sample", args.checkpoint, "--prompts", args.prompts, "--G", str(args.G),
               "--max-new-tokens", str(args.M), "--seed", "1", "--out", os.path.join(tmp, "b.safetensors"),
               "--log-level", "warning"]
        stdout, peak, _ = run_measured(cmd, env, raw=True)  # exits naming the command if it fails
    m = re.search(r"sampled (\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s", stdout)
    if not m or int(m.group(1)) != args.B * args.G * args.M:
        sys.exit(f"unexpected output of {' '.join(cmd)}:\n{stdout}")
    return float(m.group(3)), peak


def run_torch(args, env) -> tuple[float, int]:
    """(tokens/s, peak RSS in kB) of one generate() worker process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--checkpoint", args.checkpoint, "--prompts",
           args.prompts, "--G", str(args.G), "--M", str(args.M)]
    out, peak, _ = run_measured(cmd, env)
    return out["tokens_per_s"], peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--cli", default=os.path.join(os.path.dirname(HERE), "build", "examples", "entropy-probe"))
    ap.add_argument("--B", type=int, default=4, help="prompts")
    ap.add_argument("--G", type=int, default=4, help="responses per prompt")
    ap.add_argument("--P", type=int, default=32, help="prompt length")
    ap.add_argument("--M", type=int, default=64, help="new tokens per response")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the measurements (tokens/s and peak RSS per round) here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        torch_worker(args)
        return 0
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), ENTROPY_PROBE_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        args.prompts = os.path.join(tmp, "prompts.jsonl")
        write_prompts(args.prompts, args.B, args.P, vocab, seed=3)
        cpp, torch, peak = [], [], {"cpp": [], "torch": []}
        for r in range(args.rounds):
            sides = [("cpp", run_cpp, cpp), ("torch", run_torch, torch)]
            for side, fn, acc in (sides if r % 2 == 0 else sides[::-1]):
                rate, kb = fn(args, env)
                acc.append(rate)
                peak[side].append(kb)
    c, t = statistics.median(cpp), statistics.median(torch)
    print(f"sampling {args.B} prompts x G {args.G}, prompt {args.P} tokens, {args.M} new tokens; "
          f"float32, {THREADS} threads, {args.rounds} rounds (median); load {os.getloadavg()[0]:.2f}")
    print(f"  entropy-probe sample  {c:10.1f} tokens/s   (rounds: {', '.join(f'{x:.1f}' for x in cpp)})")
    print(f"  transformers generate {t:10.1f} tokens/s   (rounds: {', '.join(f'{x:.1f}' for x in torch)})")
    print(f"  ratio {c / t:.2f}x (target >= 2x at the 0.5B shape); peak RSS {max(peak['cpp']) / 1024:.0f} MiB "
          f"/ {max(peak['torch']) / 1024:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {"B": args.B, "G": args.G, "P": args.P, "M": args.M}, "cpp_tokens_per_s": cpp,
                       "torch_tokens_per_s": torch, "cpp_peak_rss_kb": peak["cpp"],
                       "torch_peak_rss_kb": peak["torch"], "load_average": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
