#!/usr/bin/env python3
"""The matrix-product floor of the probe's sums (sum X on E + sum Y on U) on a Qwen2 checkpoint:
the time of the forward + backward matrix products alone, timed with torch.mm / torch.bmm
(PyTorch's BLAS, MKL on x86) in float32, for the 2 threads both sides of the comparisons use.

By default the products run on one thread and the floor is that time / 2 (perfect scaling over
the 2 threads): a lower bound, and one a loaded machine does not inflate (on a busy machine a
2-thread product waits for its second thread to be scheduled, tens of ms a call). --threads 2
times them on 2 threads as they are.

The products are those of one forward and one backward (input gradients, LoRA gradients; the
base weights and the head are frozen, so no weight gradients for them) per batch:

    per layer, per projection W [out, in] with LoRA (A [r, in], B [out, r]), on N rows:
        forward   x W^T, x A^T, u B^T                  (u = x A^T)
        backward  dy W, dy B, gu A, gu^T x, dy^T u      (dx, gu, dA, dB; no dx for layer 0's
                                                        q, k, v, whose input is the frozen embedding)
    per layer, attention per (sequence, head), T x T x head_dim each: forward Q K^T, P V;
        backward dO V^T, P^T dO, dS K, dS^T Q; half of each counted (causal)
    the head on the m scored rows: forward h E^T [m, V], backward dz E

N is the number of real (unpadded) positions; the last layer's output projection and MLP, like
the head, run on the scored rows only (what the probe computes, docs/performance.md). Rows are
timed in blocks of at most --rows (1024) so that the head's [rows, V] products fit in memory;
each distinct shape is timed after a warm-up, at least --repeats calls and 50 ms or 50 calls,
and its fastest call is counted (a floor; on a loaded machine the median measures the scheduler).

    PYTHON bench/sums_floor.py --checkpoint DIR [--E FILE --U FILE] [--json OUT]

bench/test_sums_floor.py checks the products' count against PyTorch's FLOP counter.

Prints one JSON line: floor_s (E and U together, for 2 threads), timed_s (as timed), threads,
flop, gflop_per_s (at floor_s), and per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

THREADS = 2
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def batch_rows(path: str):
    """(real positions, scored positions, sequences, T) of a batch file (docs/checkpoints.md)."""
    from safetensors.torch import load_file

    b = load_file(path)
    mask, plen = b["attention_mask"], b["prompt_lens"]
    B, G, T = mask.shape
    m = mask.reshape(B * G, T)
    t = __import__("torch").arange(1, T)
    scored = (t[None, :] >= plen.repeat_interleave(G)[:, None]) & (m[:, 1:] == 1)
    return int(m.sum()), int(scored.sum()), B * G, T


def gemm_list(cfg: dict, r: int, N: int, m: int, R: int, T: int, causal: bool = True):
    """(kind, shape, count, flop, grow) of the forward + backward products of one batch. causal:
    count half of the attention products (the tiles above the diagonal are skipped); False
    counts them whole, as PyTorch's eager attention computes them."""
    d, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = cfg.get("head_dim") or d // hq
    dims = {"q": (d, hq * dh), "k": (d, hkv * dh), "v": (d, hkv * dh), "o": (hq * dh, d), "gate": (d, inter),
            "up": (d, inter), "down": (inter, d)}
    out = []

    def mm(a, k, n, grow=0):  # [a, k] x [k, n]; shape[grow] is the dimension of the positions
        out.append(("mm", (a, k, n), 1, 2.0 * a * k * n, grow))

    for layer in range(L):
        for p in PROJECTIONS:
            rows = m if layer == L - 1 and p in ("o", "gate", "up", "down") else N
            i, o = dims[p]
            mm(rows, i, o)  # x W^T
            mm(rows, i, r)  # x A^T
            mm(rows, r, o)  # u B^T
            if layer > 0 or p not in ("q", "k", "v"):  # layer 0's q, k, v read the frozen embedding: no dx
                mm(rows, o, i)  # dy W
                mm(rows, r, i)  # gu A
            mm(rows, o, r)  # dy B
            mm(r, rows, i, grow=1)  # gu^T x
            mm(o, rows, r, grow=1)  # dy^T u
        # causal attention: per sequence, hq heads of [T, dh] x [dh, T] (2: Q K^T, dO V^T) and
        # [T, T] x [T, dh] (4: P V, P^T dO, dS K, dS^T Q), half of each above the diagonal
        half = 0.5 if causal else 1.0
        out.append(("bmm", (hq, T, dh, T), R * 2 * half, 2.0 * hq * T * dh * T * R * 2 * half, None))
        out.append(("bmm", (hq, T, T, dh), R * 4 * half, 2.0 * hq * T * T * dh * R * 4 * half, None))
    mm(m, d, cfg["vocab_size"])  # logits
    mm(m, cfg["vocab_size"], d)  # their gradient into the hidden state
    return out


def blocked(entries, block: int):
    """Each mm with its positions' dimension split into blocks of at most `block`: (kind, shape, count)."""
    for kind, shape, count, _, grow in entries:
        if kind != "mm":
            yield kind, shape, count
            continue
        full, rest = divmod(shape[grow], block)
        for cnt, s in ((full, block), (1, rest)):
            if cnt and s:
                sh = list(shape)
                sh[grow] = s
                yield kind, tuple(sh), count * cnt


def time_shape(torch, kind, shape, repeats: int) -> float:
    if kind == "mm":
        a, k, n = shape
        x, y = torch.randn(a, k), torch.randn(k, n)
        f = lambda: torch.mm(x, y)  # noqa: E731
    else:
        h, a, k, n = shape
        x, y = torch.randn(h, a, k), torch.randn(h, k, n)
        f = lambda: torch.bmm(x, y)  # noqa: E731
    f()
    ts, spent = [], 0.0
    while len(ts) < repeats or (spent < 0.05 and len(ts) < 50):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
        spent += ts[-1]
    return min(ts)  # a floor: the fastest call, the one least disturbed by other processes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", required=True, help="Qwen2 checkpoint directory (config.json, adapter_config.json)")
    ap.add_argument("--E", help="E batch (default CHECKPOINT/E.safetensors)")
    ap.add_argument("--U", help="U batch (default CHECKPOINT/U.safetensors)")
    ap.add_argument("--rows", type=int, default=1024, help="rows per timed product block")
    ap.add_argument("--repeats", type=int, default=3,
                    help="at least this many timed calls per distinct shape (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1, choices=[1, THREADS],
                    help="time on 1 thread and divide by 2 (default), or on 2 threads as they are")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    scale = args.threads / THREADS  # 1 thread: perfect scaling over THREADS
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(args.checkpoint, "adapter_config.json")) as f:
        acfg = json.load(f)
    if cfg.get("model_type") != "qwen2":
        sys.exit(f"sums_floor.py: {args.checkpoint}/config.json: model_type '{cfg.get('model_type')}' "
                 "(only qwen2 is modelled)")
    if sorted(f"{p}_proj" for p in PROJECTIONS) != sorted(acfg["target_modules"]):
        sys.exit(f"sums_floor.py: {args.checkpoint}/adapter_config.json: target_modules {acfg['target_modules']} "
                 "(only LoRA on every projection is modelled)")
    cache: dict = {}
    res = {"backend": f"torch {torch.__version__} mm/bmm, float32", "threads": args.threads, "batches": {}}
    total_s = total_flop = 0.0
    for name, path in (("E", args.E or os.path.join(args.checkpoint, "E.safetensors")),
                       ("U", args.U or os.path.join(args.checkpoint, "U.safetensors"))):
        N, m, R, T = batch_rows(path)
        entries = gemm_list(cfg, int(acfg["r"]), N, m, R, T)
        flop = sum(e[3] for e in entries)
        secs = 0.0
        for kind, shape, count in blocked(entries, args.rows):
            if (kind, shape) not in cache:
                cache[(kind, shape)] = time_shape(torch, kind, shape, args.repeats)
            secs += cache[(kind, shape)] * count
        res["batches"][name] = {"real_rows": N, "scored_rows": m, "sequences": R, "T": T, "timed_s": secs,
                                "floor_s": secs * scale, "flop": flop}
        total_s += secs
        total_flop += flop
    res.update(floor_s=total_s * scale, timed_s=total_s, flop=total_flop,
               gflop_per_s=total_flop / (total_s * scale) / 1e9, distinct_shapes=len(cache))
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
