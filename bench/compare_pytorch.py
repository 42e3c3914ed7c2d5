#!/usr/bin/env python3
"""entropy_probe (C++) against the PyTorch way of running the same probe phases.

Both sides load the same Hugging Face checkpoint directory (base model, PEFT
LoRA adapter, optimizer.safetensors) and the same E / U batch files, in
float32 on the CPU with 2 threads, and time:

    sum X   sum over E prompts of X_b = grad LX[b]          (docs/math.md)
    sum Y   sum over U prompts of grad LY[u], Adam-preconditioned, / B_U
    alpha   the alpha trick: s_b = X_b . mu_Y over the LoRA view. PyTorch: the
            original's double backward (per-prompt losses weighted by alpha,
            autograd.grad with create_graph=True, contraction with mu_Y, grad by
            alpha). C++: forward-mode JVP (bench/probe_compare.cpp).

PyTorch side: transformers + peft as a user runs them (from_pretrained, eager
attention, no golden patches); the worker also takes other batch files, sdpa
attention and microbatches (gradients accumulated), which bench/memory_compare.py
uses. C++ side: the probe_compare binary
(bench/probe_compare.cpp, target in bench/CMakeLists.txt). Every measurement is
a fresh process (one warm-up round, then timed rounds); sides are interleaved,
alternating which goes first; medians over rounds; peak memory is the
process's max RSS from os.wait4 (getrusage of that child), also shown as the
increase over the RSS right after loading (the Python interpreter and torch
libraries alone take a few hundred MB).

Benchmark checkpoint (~26 MB, not committed):
Qwen2-shaped, 4 layers, width 256 (4 heads of 64, 2 KV heads), intermediate
1024, vocab 8192, tied embeddings, LoRA r 16 (alpha 32) on q,k,v,o,gate,up,
down; two real AdamW steps on a GRPO-style loss so LoRA B and the Adam state
are real; E and U: B 8 prompts, G 4, T 96, random tokens with left-padded
prompts (16-32 tokens) and right-padded responses.

    PYTHON bench/compare_pytorch.py --make-bench-checkpoint /tmp/bench_ckpt
    PYTHON bench/compare_pytorch.py --checkpoint /tmp/bench_ckpt \\
        --cpp build/bench/probe_compare [--rounds 5] [--json results.json]

PYTHON is the peer's interpreter (a venv with torch, transformers, peft, safetensors, numpy):
bench/compare-all makes one (build/peer-venv) and runs this script with it; the workers run
under the same interpreter (sys.executable).

Targets (printed with the ratios): C++ sum X + sum Y <= 0.7x PyTorch, alpha
trick <= 0.4x, peak memory <= 0.5x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))

THREADS = 2
BENCH = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_theta=1000000.0, bos_token_id=1, eos_token_id=1)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SHAPE = dict(B=8, G=4, T=96)


def _rss_kb(pid: int | str = "self") -> int:
    """VmRSS of a process in kB (-1 when it has none left)."""
    try:
        f = open(f"/proc/{pid}/status")
    except OSError:
        return -1
    with f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


# ---- the benchmark checkpoint ---------------------------------------------------------------


def random_batch(torch, B, G, T, vocab, gen, full=False):
    """Random tokens in the batch layout: prompts of 16-32 tokens with up to 3 left-padding
    positions inside the prompt region, responses of 32..T-p tokens, right padding. full: no
    padding, every response runs to T (the worst case for memory)."""
    seq = torch.randint(2, vocab, (B, G, T), generator=gen)
    mask = torch.zeros((B, G, T), dtype=torch.int64)
    plen = torch.randint(16, 33, (B,), generator=gen)
    t = torch.arange(T)
    for b in range(B):
        p = int(plen[b])
        lpad = 0 if full else int(torch.randint(0, 4, (1,), generator=gen))
        seq[b, :, :p] = seq[b, 0, :p]  # the group shares its prompt
        for g in range(G):
            n = T - p if full else int(torch.randint(32, T - p + 1, (1,), generator=gen))
            mask[b, g] = ((t >= lpad) & (t < p + n)).long()
    seq = torch.where(mask > 0, seq, torch.ones_like(seq))  # padding id 1 (also the end-of-text id)
    rewards = torch.randn((B, G), generator=gen)
    return {"sequences": seq, "attention_mask": mask, "prompt_lens": plen.long(),
            "advantages": rewards - rewards.mean(dim=1, keepdim=True), "rewards": rewards}


def write_checkpoint(out: str, model_cfg: dict, adam_shape: dict, steps: int = 2, base_dtype=None, seed: int = 7):
    """A Qwen2 checkpoint directory as transformers + peft write it: random base weights
    (save_pretrained, in base_dtype when given, e.g. torch.bfloat16), LoRA (LORA) with `steps`
    real AdamW steps on random batches of adam_shape (B, G, T) so LoRA B and the Adam state are
    real, and optimizer.safetensors (tools/export_optimizer_state.py). Returns the generator
    the batches continue from."""
    torch = _torch()
    from make_golden import lmax_of, seq_logprobs, y_losses
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from export_optimizer_state import export_optimizer_state

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base = Qwen2ForCausalLM(Qwen2Config(**model_cfg))
    if base_dtype is not None:  # the adapter is trained on the weights as saved (rounded)
        base = base.to(base_dtype)
    base.save_pretrained(out)
    base = base.float()
    # config.json in the layout of the Qwen2 checkpoints on the Hub (top-level rope_theta);
    # transformers >= 5 writes it inside "rope_parameters"
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = rp["rope_theta"], None
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
    model = get_peft_model(base, LoraConfig(**LORA))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):  # real steps: LoRA B and the Adam state become non-zero
        b = random_batch(torch, adam_shape["B"], adam_shape["G"], adam_shape["T"], model_cfg["vocab_size"], gen)
        S, L = seq_logprobs(model, b)
        loss = -y_losses(S, lmax_of(b, L), b["advantages"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    export_optimizer_state(opt, model, os.path.join(out, "optimizer.safetensors"))
    return gen


def write_batch(path: str, shape: dict, vocab: int, gen, full: bool = False) -> None:
    """An E or U batch file (docs/checkpoints.md) of random_batch(shape)."""
    from safetensors.torch import save_file

    save_file(random_batch(_torch(), shape["B"], shape["G"], shape["T"], vocab, gen, full), path)


def make_bench_checkpoint(out: str) -> None:
    gen = write_checkpoint(out, BENCH, SHAPE)
    for name in ("E", "U"):
        write_batch(os.path.join(out, f"{name}.safetensors"), SHAPE, BENCH["vocab_size"], gen)
    print(f"wrote {out}")


# ---- the PyTorch side (a worker process) -----------------------------------------------------


def load_torch_model(ckpt: str, attn: str = "eager"):
    """The checkpoint as a user loads it: AutoModelForCausalLM.from_pretrained (float32, the
    given attention implementation), then PeftModel.from_pretrained (trainable adapter). attn:
    PyTorch's CPU scaled_dot_product_attention (transformers' default "sdpa") has no double
    backward, which the alpha trick needs: "eager" there."""
    torch = _torch()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=attn)
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=True).float()
    model.eval()
    return torch, model


def microbatches(batch: dict, mb: int):
    """The batch in slices of mb prompts (0: the whole batch); every field is indexed by prompt."""
    B = batch["sequences"].shape[0]
    step = mb if mb > 0 else B
    for i in range(0, B, step):
        yield {k: v[i:i + step] for k, v in batch.items()}


def torch_worker(args) -> None:
    import peft  # noqa: F401  (imports are not load time: the probe's binary has none)
    import transformers  # noqa: F401
    from make_golden import lmax_of, load_adam, load_batch, seq_logprobs, x_losses, y_losses

    from export_optimizer_state import registry_names

    t_load = time.perf_counter()
    torch, model = load_torch_model(args.checkpoint, args.attn)

    E = load_batch(args.e_batch or os.path.join(args.checkpoint, "E.safetensors"))
    U = load_batch(args.u_batch or os.path.join(args.checkpoint, "U.safetensors"))
    state, hyper = load_adam(os.path.join(args.checkpoint, "optimizer.safetensors"))
    load_s = time.perf_counter() - t_load
    names = registry_names(model, check_adapter_state=False)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    lora = [i for i, n in enumerate(names) if "lora_a" in n.lower() or "lora_b" in n.lower()
            or n.endswith("lm_head.weight")]
    rss_load = _rss_kb()
    B_E, B_U = E["sequences"].shape[0], U["sequences"].shape[0]
    b2, eps = hyper["beta2"], hyper["eps"]
    mb = args.mb

    # Gradients accumulate over microbatches of args.mb prompts: the sum of the per-prompt
    # losses, divided by the prompt count at the end.
    def sum_X():
        for p in params:
            p.grad = None
        for e in microbatches(E, mb):
            S, L = seq_logprobs(model, e)
            x_losses(S, L, lmax_of(e, L), "dr_grpo").sum().backward()
        out = [p.grad.detach().clone() / B_E for p in params]
        for p in params:
            p.grad = None
        return out

    def mu_Y():
        for p in params:
            p.grad = None
        for u in microbatches(U, mb):
            S, L = seq_logprobs(model, u)
            y_losses(S, lmax_of(u, L), u["advantages"].float()).sum().backward()
        out = []
        for n, p in zip(names, params):
            st = state[n]
            vhat = st["exp_avg_sq"].float() / (1.0 - b2 ** st["step"])
            out.append(p.grad.detach() / (vhat.sqrt() + eps) / B_U)
        for p in params:
            p.grad = None
        return out

    def alpha(mu):
        s = []
        for e in microbatches(E, mb):
            S, L = seq_logprobs(model, e)
            a = torch.ones(e["sequences"].shape[0], requires_grad=True)
            LX = x_losses(S, L, lmax_of(e, L), "dr_grpo")
            gl = torch.autograd.grad((a * LX).sum(), [params[i] for i in lora], create_graph=True)
            contraction = sum((g * mu[i]).sum() for g, i in zip(gl, lora))
            s.append(torch.autograd.grad(contraction, a)[0])
        return torch.cat(s)

    out = {"rss_after_load_kb": rss_load, "load_s": load_s, "dtype": "float32",
           "attn_implementation": model.config._attn_implementation, "mb": mb}
    do_sum, do_alpha = args.phase in ("sumxy", "all"), args.phase in ("alpha", "all")
    mu = None if do_sum else mu_Y()
    t_x, t_y, t_a, c_x, c_y, c_a = [], [], [], [], [], []
    clk, cpu = time.perf_counter, time.process_time
    for rnd in range(args.warmup + args.repeats):
        timed = rnd >= args.warmup
        if do_sum:
            t0, p0 = clk(), cpu()
            mx = sum_X()
            t1, p1 = clk(), cpu()
            mu = mu_Y()
            t2, p2 = clk(), cpu()
            out["bars_dot"] = float(sum((a.double() * b.double()).sum() for a, b in zip(mx, mu)))
            if timed:
                t_x.append(t1 - t0)
                t_y.append(t2 - t1)
                c_x.append(p1 - p0)
                c_y.append(p2 - p1)
        if do_alpha:
            t0, p0 = clk(), cpu()
            s = alpha(mu)
            t1, p1 = clk(), cpu()
            out["s_values"] = s.double().tolist()
            if timed:
                t_a.append(t1 - t0)
                c_a.append(p1 - p0)
    if do_sum:
        out["sum_X"], out["sum_Y"], out["cpu_sum_X"], out["cpu_sum_Y"] = t_x, t_y, c_x, c_y
    if do_alpha:
        out["alpha"], out["cpu_alpha"] = t_a, c_a
    print(json.dumps(out))


# ---- the orchestrator -----------------------------------------------------------------------------


def run_measured(cmd: list[str], env: dict, max_rss_kb: int = 0,
                 raw: bool = False) -> tuple[dict | str | None, int, float]:
    """Runs `cmd` as a fresh process; returns (its last JSON line on stdout, or with raw its whole
    stdout, its peak RSS in kB from wait4, its wall time in s). With max_rss_kb, a process whose
    RSS passes it is killed (the shared machine is protected) and the output is None; the peak is
    then at least the limit."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        killed = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            if max_rss_kb and not killed and _rss_kb(p.pid) > max_rss_kb:
                p.kill()
                killed = True
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if killed:
            return None, int(ru.ru_maxrss), wall
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.read().decode()[-3000:]}")
        text = out.read().decode()
        if raw:
            return text, int(ru.ru_maxrss), wall
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        return (json.loads(lines[-1]) if lines else {}), int(ru.ru_maxrss), wall


def compare(args) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE")
    cmds = {
        "pytorch": lambda ph: [sys.executable, os.path.abspath(__file__), "--worker", "--checkpoint", args.checkpoint,
                               "--phase", ph, "--warmup", "1", "--repeats", str(args.inner)],
        "cpp": lambda ph: [args.cpp, args.checkpoint, "--phase", ph, "--warmup", "1", "--repeats", str(args.inner)],
    }
    if args.taskset:
        cmds = {k: (lambda f: lambda ph: ["taskset", "-c", args.taskset] + f(ph))(f) for k, f in cmds.items()}
    res = {side: {ph: [] for ph in ("sumxy", "alpha")} for side in cmds}
    for rnd in range(args.rounds):
        order = ["pytorch", "cpp"] if rnd % 2 == 0 else ["cpp", "pytorch"]
        for ph in ("sumxy", "alpha"):
            for side in order:
                out, peak, _ = run_measured(cmds[side](ph), env)
                out["peak_rss_kb_wait4"] = peak
                res[side][ph].append(out)
                t = out.get("alpha") if ph == "alpha" else [a + b for a, b in zip(out["sum_X"], out["sum_Y"])]
                print(f"round {rnd} {ph:5s} {side:7s} {statistics.median(t):7.3f} s  peak {peak / 1024:7.1f} MiB",
                      flush=True)

    def med(side, ph, key):
        vals = []
        for o in res[side][ph]:
            vals.extend(o[key])
        return statistics.median(vals)

    summary = {}
    for side in cmds:
        s = {"sum_X": med(side, "sumxy", "sum_X"), "sum_Y": med(side, "sumxy", "sum_Y"),
             "alpha": med(side, "alpha", "alpha")}
        s["sum_XY"] = statistics.median([a + b for o in res[side]["sumxy"] for a, b in zip(o["sum_X"], o["sum_Y"])])
        s["cpu_sum_XY"] = statistics.median([a + b for o in res[side]["sumxy"]
                                             for a, b in zip(o["cpu_sum_X"], o["cpu_sum_Y"])])
        s["cpu_alpha"] = med(side, "alpha", "cpu_alpha")
        for ph in ("sumxy", "alpha"):
            s[f"peak_rss_mib_{ph}"] = max(o["peak_rss_kb_wait4"] for o in res[side][ph]) / 1024
            s[f"peak_over_load_mib_{ph}"] = max(o["peak_rss_kb_wait4"] - o["rss_after_load_kb"]
                                                for o in res[side][ph]) / 1024
        summary[side] = s
    py, cc = summary["pytorch"], summary["cpp"]
    bd_py, bd_cc = res["pytorch"]["sumxy"][-1]["bars_dot"], res["cpp"]["sumxy"][-1]["bars_dot"]
    s_py, s_cc = res["pytorch"]["alpha"][-1]["s_values"], res["cpp"]["alpha"][-1]["s_values"]
    s_err = max(abs(a - b) for a, b in zip(s_py, s_cc)) / max(abs(a) for a in s_py)
    ratios = {
        "sum_XY": cc["sum_XY"] / py["sum_XY"],
        "alpha": cc["alpha"] / py["alpha"],
        "cpu_sum_XY": cc["cpu_sum_XY"] / py["cpu_sum_XY"],
        "cpu_alpha": cc["cpu_alpha"] / py["cpu_alpha"],
        "peak_rss_sumxy": cc["peak_rss_mib_sumxy"] / py["peak_rss_mib_sumxy"],
        "peak_rss_alpha": cc["peak_rss_mib_alpha"] / py["peak_rss_mib_alpha"],
        "peak_over_load_sumxy": cc["peak_over_load_mib_sumxy"] / py["peak_over_load_mib_sumxy"],
        "peak_over_load_alpha": cc["peak_over_load_mib_alpha"] / py["peak_over_load_mib_alpha"],
    }
    targets = {"sum_XY": 0.7, "alpha": 0.4, "peak_rss_sumxy": 0.5, "peak_rss_alpha": 0.5}
    print()
    print(f"checkpoint {args.checkpoint}; {args.rounds} interleaved rounds x {args.inner} timed repeat(s); "
          f"{THREADS} threads{' on CPUs ' + args.taskset if args.taskset else ''}; float32; "
          f"PyTorch attention: {res['pytorch']['sumxy'][0]['attn_implementation']}; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'':28s} {'PyTorch':>10s} {'C++':>10s} {'C++/PyTorch':>12s} {'target':>8s}")
    rows = [("sum X (s)", "sum_X", None), ("sum Y (s)", "sum_Y", None), ("sum X + sum Y (s)", "sum_XY", "sum_XY"),
            ("alpha trick (s)", "alpha", "alpha"),
            ("CPU s, sum X + sum Y", "cpu_sum_XY", None), ("CPU s, alpha trick", "cpu_alpha", None),
            ("peak RSS, sums (MiB)", "peak_rss_mib_sumxy", "peak_rss_sumxy"),
            ("peak RSS, alpha (MiB)", "peak_rss_mib_alpha", "peak_rss_alpha"),
            ("peak - load RSS, sums (MiB)", "peak_over_load_mib_sumxy", "peak_over_load_sumxy"),
            ("peak - load RSS, alpha (MiB)", "peak_over_load_mib_alpha", "peak_over_load_alpha")]
    for label, key, rk in rows:
        r = cc[key] / py[key]
        tgt = targets.get(rk)
        mark = "" if tgt is None else (f"<= {tgt}  " + ("ok" if r <= tgt else "MISSED"))
        print(f"{label:28s} {py[key]:10.3f} {cc[key]:10.3f} {r:12.3f} {mark}")
    print(f"cross-check: bars_dot PyTorch {bd_py:.6e} C++ {bd_cc:.6e} (rel {abs(bd_py - bd_cc) / abs(bd_py):.1e}); "
          f"s_values max rel {s_err:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "ratios": ratios, "targets": targets, "runs": res}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--make-bench-checkpoint", metavar="DIR", help="write the benchmark checkpoint to DIR and exit")
    ap.add_argument("--checkpoint", help="checkpoint directory (with E.safetensors, U.safetensors)")
    ap.add_argument("--cpp", default=os.path.join(REPO, "build", "bench", "probe_compare"),
                    help="the probe_compare binary (a target of bench/CMakeLists.txt)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (a fresh process per side and phase)")
    ap.add_argument("--inner", type=int, default=1, help="timed repeats per process (after one warm-up)")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--taskset", metavar="CPUS", help="pin both sides to these CPUs (taskset -c CPUS), e.g. 0,1")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="all", choices=["sumxy", "alpha", "all"], help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--e-batch", help=argparse.SUPPRESS)  # default CHECKPOINT/E.safetensors
    ap.add_argument("--u-batch", help=argparse.SUPPRESS)
    ap.add_argument("--attn", default="eager", help=argparse.SUPPRESS)  # transformers' attn_implementation
    ap.add_argument("--mb", type=int, default=0, help=argparse.SUPPRESS)  # prompts per microbatch, 0 = all
    args = ap.parse_args(argv)
    if args.make_bench_checkpoint:
        make_bench_checkpoint(args.make_bench_checkpoint)
        return 0
    if not args.checkpoint:
        ap.error("--checkpoint is required (or --make-bench-checkpoint DIR)")
    if args.worker:
        torch_worker(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
