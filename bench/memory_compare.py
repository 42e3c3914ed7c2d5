#!/usr/bin/env python3
"""Peak memory and time of `entropy-probe run` against transformers + peft, at real shapes.

Cases (checkpoints as transformers + peft write them: random base weights, LoRA r 16 on every
projection, an Adam state from real AdamW steps, E and U batches with full-length responses):

    qwen05b    the Qwen2.5-0.5B shape (24 layers, width 896, 14/2 heads, intermediate 4864,
               vocabulary 151936, tied embeddings), bf16 base weights; E and U of
               4 prompts x 4 responses x 256 positions; Adam state from one step on 1 x 2 x 64
    small512   Qwen2, 4 layers, width 256, 4/2 heads, vocabulary 8192 (float32 weights);
    small2048  E and U of 2 prompts x 2 responses x T, T = 512 and 2048 (one checkpoint)

Per case, each a fresh process, interleaved (the order alternates by round), float32 and
2 threads on both sides; peak RSS from os.wait4 (ru_maxrss) and wall time:

    probe default       entropy-probe run CKPT --e-batch E --u-batch U  (default options)
    probe conditional   the same with --variance conditional
    PyTorch sums        sum X + sum Y as bench/compare_pytorch.py runs them, sdpa attention,
                        gradients accumulated over microbatches (qwen05b: 2 prompts each, the
                        microbatch the probe's issue measured PyTorch at; small: the whole batch)
    PyTorch alpha       mu_Y, then the alpha trick by double backward, eager attention
                        (qwen05b: 1 prompt per microbatch)

A process whose RSS passes --max-rss-gib is killed (the machine is shared) and shows as
">= limit". The table's targets are issue 15's: the 0.5B whole run (default options) at most
0.5x PyTorch's sum phase; at T = 2048 at most 0.8x PyTorch's sdpa sums; the probe's peak
growing at most 4x from T = 512 to 2048; load time at most PyTorch's.

    PYTHON bench/memory_compare.py --data /tmp/membench \\
        --cli build/examples/entropy-probe [--quick] [--rounds 1] [--json out.json]

Missing checkpoints are generated first (small: under a minute; qwen05b: about a minute and 1.1 GB).
--quick runs the small cases only. PYTHON: the peer venv's interpreter (bench/compare_pytorch.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare_pytorch as cp  # noqa: E402  (the shared checkpoint writer, PyTorch worker and runner)

SMALL = dict(cp.BENCH, max_position_embeddings=4096)
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
               tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643,
               eos_token_id=151643)

# name: checkpoint subdirectory, batch files, PyTorch's prompts per microbatch (sums, alpha)
CASES = {
    "small512": dict(ckpt="small", E="E512.safetensors", U="U512.safetensors", mb_sums=0, mb_alpha=0),
    "small2048": dict(ckpt="small", E="E2048.safetensors", U="U2048.safetensors", mb_sums=0, mb_alpha=0),
    "qwen05b": dict(ckpt="qwen05b", E="E.safetensors", U="U.safetensors", mb_sums=2, mb_alpha=1),
}


def make_data(data: str, names: list[str]) -> None:
    """Writes the checkpoints and batches of the cases `names` that are not there yet."""
    import torch

    small = os.path.join(data, "small")
    files = ["optimizer.safetensors"] + [f"{n}{T}.safetensors" for T in (512, 2048) for n in "EU"]
    wanted = {CASES[n]["ckpt"] for n in names}
    if "small" in wanted and not all(os.path.exists(os.path.join(small, f)) for f in files):
        gen = cp.write_checkpoint(small, SMALL, dict(B=2, G=2, T=128), steps=2)
        for T in (512, 2048):
            for n in "EU":
                cp.write_batch(os.path.join(small, f"{n}{T}.safetensors"), dict(B=2, G=2, T=T),
                               SMALL["vocab_size"], gen, full=True)
        print(f"wrote {small}", flush=True)
    big = os.path.join(data, "qwen05b")
    if "qwen05b" in wanted and not os.path.exists(os.path.join(big, "U.safetensors")):
        gen = cp.write_checkpoint(big, QWEN05B, dict(B=1, G=2, T=64), steps=1, base_dtype=torch.bfloat16)
        for n in "EU":
            cp.write_batch(os.path.join(big, f"{n}.safetensors"), dict(B=4, G=4, T=256), QWEN05B["vocab_size"], gen,
                           full=True)
        print(f"wrote {big}", flush=True)


def commands(args, case: dict) -> dict:
    """The four measured runs of a case: name -> (command, path of the probe's JSON or None)."""
    ckpt = os.path.join(args.data, case["ckpt"])
    E, U = os.path.join(ckpt, case["E"]), os.path.join(ckpt, case["U"])
    probe = [args.cli, "run", ckpt, "--e-batch", E, "--u-batch", U]
    worker = [sys.executable, os.path.join(HERE, "compare_pytorch.py"), "--worker", "--checkpoint", ckpt, "--e-batch",
              E, "--u-batch", U, "--warmup", "0", "--repeats", "1"]
    tmp = args.tmp
    return {
        "probe_default": (probe + ["--json", os.path.join(tmp, "default.json")], os.path.join(tmp, "default.json")),
        "torch_sums": (worker + ["--phase", "sumxy", "--attn", "sdpa", "--mb", str(case["mb_sums"])], None),
        "probe_conditional": (probe + ["--variance", "conditional", "--json", os.path.join(tmp, "cond.json")],
                              os.path.join(tmp, "cond.json")),
        "torch_alpha": (worker + ["--phase", "alpha", "--attn", "eager", "--mb", str(case["mb_alpha"])], None),
    }


def measure(args, names: list[str]) -> dict:
    """case -> run -> list over rounds of {peak_kb, wall_s, killed, out}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cp.THREADS), OPENBLAS_NUM_THREADS=str(cp.THREADS),
               MKL_NUM_THREADS=str(cp.THREADS), ENTROPY_PROBE_NUM_THREADS=str(cp.THREADS), OMP_WAIT_POLICY="PASSIVE")
    limit_kb = int(args.max_rss_gib * 1024 * 1024)
    res = {n: {} for n in names}
    for rnd in range(args.rounds):
        for name in names:
            cmds = commands(args, CASES[name])
            order = list(cmds) if rnd % 2 == 0 else list(reversed(cmds))  # probe first, then PyTorch first
            for run in order:
                cmd, json_path = cmds[run]
                if json_path and os.path.exists(json_path):
                    os.remove(json_path)
                out, peak, wall = cp.run_measured(cmd, env, limit_kb)
                killed = out is None
                if json_path and not killed:
                    with open(json_path) as f:
                        out = json.load(f)
                res[name].setdefault(run, []).append(dict(peak_kb=peak, wall_s=wall, killed=killed, out=out))
                print(f"round {rnd} {name:9s} {run:17s} peak {peak / 1024:8.0f} MiB  wall {wall:7.1f} s"
                      f"{'  KILLED at the RSS limit' if killed else ''}", flush=True)
    return res


def summarize(res: dict) -> list[tuple]:
    """Rows of (work, probe, peer, ratio, target, verdict); values are medians over rounds."""

    def peak(case, run):
        rs = res[case][run]
        return statistics.median(r["peak_kb"] for r in rs) / 2**20, any(r["killed"] for r in rs)

    def phase(case, run, f):
        vals = [f(r["out"]) for r in res[case][run] if not r["killed"]]
        return statistics.median(vals) if vals else None

    probe_sums = lambda o: o["timing"]["sum_X"] + o["timing"]["sum_Y"]  # noqa: E731
    torch_sums = lambda o: o["sum_X"][0] + o["sum_Y"][0]  # noqa: E731
    rows = []

    def row(work, p, q, target=None, unit="GiB"):
        (pv, pk), (qv, qk) = p, q
        fmt_v = lambda v, k: "n/a" if v is None else (f">= {v:.2f}" if k else f"{v:.2f}") + f" {unit}"  # noqa: E731
        ratio = None if pv is None or qv is None else pv / qv
        rs = "n/a" if ratio is None else (f"{ratio:.2f}" if not (pk or qk) else f"~{ratio:.2f} (killed)")
        verdict = "" if target is None or ratio is None or pk or qk else ("met" if ratio <= target else "MISSED")
        if target is not None and pk:
            verdict = "MISSED"
        rows.append((work, fmt_v(pv, pk), fmt_v(qv, qk), rs, "" if target is None else f"<= {target}x", verdict))

    targets = {"qwen05b": 0.5, "small2048": 0.8}
    for case in res:
        row(f"{case}: peak RSS, probe default (whole run) / PyTorch sums (sdpa)", peak(case, "probe_default"),
            peak(case, "torch_sums"), targets.get(case))
        row(f"{case}: peak RSS, probe --variance conditional / PyTorch sums", peak(case, "probe_conditional"),
            peak(case, "torch_sums"))
        row(f"{case}: peak RSS, probe --variance conditional / PyTorch mu_Y + alpha (eager)",
            peak(case, "probe_conditional"), peak(case, "torch_alpha"))
        row(f"{case}: sum X + sum Y", (phase(case, "probe_default", probe_sums), False),
            (phase(case, "torch_sums", torch_sums), False), unit="s")
        row(f"{case}: alpha trick", (phase(case, "probe_conditional", lambda o: o["timing"]["conditional_variance"]),
                                     False), (phase(case, "torch_alpha", lambda o: o["alpha"][0]), False), unit="s")
        row(f"{case}: load (model, adapter, Adam state, batches)",
            (phase(case, "probe_default", lambda o: o["timing"]["load"]), False),
            (phase(case, "torch_sums", lambda o: o["load_s"]), False), 1.0, unit="s")
        w = lambda run: statistics.median(r["wall_s"] for r in res[case][run])  # noqa: E731
        row(f"{case}: wall, whole process: probe default / PyTorch sums", (w("probe_default"), False),
            (w("torch_sums"), False), unit="s")
    if "small512" in res and "small2048" in res:
        g = {run: peak("small2048", run)[0] / peak("small512", run)[0] for run in ("probe_default", "torch_sums")}
        killed = peak("small2048", "probe_default")[1]
        rows.append(("small: peak RSS growth T 512 -> 2048, probe default / PyTorch sums",
                     f"{g['probe_default']:.2f}x", f"{g['torch_sums']:.2f}x", "", "<= 4x (probe)",
                     "MISSED" if killed or g["probe_default"] > 4 else "met"))
    return rows


def cross_check(runs: dict) -> str:
    """bars_dot (sums) and the per-prompt alpha-trick values s_b, probe against PyTorch
    (relative differences; float32 on both sides)."""
    first = lambda run: next((r["out"] for r in runs[run] if not r["killed"]), None)  # noqa: E731
    p, q, pc, qa = first("probe_default"), first("torch_sums"), first("probe_conditional"), first("torch_alpha")
    parts = []
    if p and q:
        parts.append(f"bars_dot probe {p['bars_dot']:.6e} PyTorch {q['bars_dot']:.6e} "
                     f"(rel {abs(p['bars_dot'] - q['bars_dot']) / abs(q['bars_dot']):.1e})")
    if pc and qa:
        err = max(abs(a - b) for a, b in zip(pc["s_values"], qa["s_values"])) / max(abs(b) for b in qa["s_values"])
        parts.append(f"s_values max rel {err:.1e}")
    return "; ".join(parts) or "n/a (killed runs)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", required=True, help="directory of the generated checkpoints (made when missing)")
    ap.add_argument("--cli", default=os.path.join(cp.REPO, "build", "examples", "entropy-probe"),
                    help="the entropy-probe binary")
    ap.add_argument("--quick", action="store_true", help="the small model's cases only (T = 512 and 2048)")
    ap.add_argument("--cases", help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians over them")
    ap.add_argument("--max-rss-gib", type=float, help="kill a run whose RSS passes this (default: 3/4 of the "
                    "memory available at the start, so that the machine's other users keep theirs)")
    ap.add_argument("--make-only", action="store_true", help="generate the checkpoints (of the cases chosen) and exit")
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args(argv)
    if args.max_rss_gib is None:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
        args.max_rss_gib = 0.75 * avail_kb / 2**20
    names = args.cases.split(",") if args.cases else (["small512", "small2048"] if args.quick else list(CASES))
    for n in names:
        if n not in CASES:
            ap.error(f"--cases: unknown case '{n}' (one of {', '.join(CASES)})")
    make_data(args.data, names)
    if args.make_only:
        return 0
    if not os.access(args.cli, os.X_OK):
        ap.error(f"--cli {args.cli}: not an executable (build the target entropy-probe)")
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        res = measure(args, names)
    rows = summarize(res)
    print()
    print(f"{args.rounds} interleaved round(s); float32, {cp.THREADS} threads; probe {args.cli}; "
          f"RSS limit {args.max_rss_gib:.1f} GiB; load average at the end {os.getloadavg()[0]:.1f}")
    head = ("work", "probe", "PyTorch", "ratio", "target", "")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r)))
    for case in res:  # the same work on both sides: the probe's results against PyTorch's
        print(f"cross-check {case}: {cross_check(res[case])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": res, "rows": rows, "load_average": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
