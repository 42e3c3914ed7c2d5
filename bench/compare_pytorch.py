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

PyTorch side: transformers + peft as a user runs them (default attention
implementation, no golden patches). C++ side: the probe_compare binary
(bench/probe_compare.cpp, target in bench/CMakeLists.txt). Every measurement is
a fresh process (one warm-up round, then timed rounds); sides are interleaved,
alternating which goes first; medians over rounds; peak memory is the
process's max RSS from os.wait4 (getrusage of that child), also shown as the
increase over the RSS right after loading (the Python interpreter and torch
libraries alone take a few hundred MB).

Benchmark checkpoint (docs/performance.md; ~26 MB, not committed):
Qwen2-shaped, 4 layers, width 256 (4 heads of 64, 2 KV heads), intermediate
1024, vocab 8192, tied embeddings, LoRA r 16 (alpha 32) on q,k,v,o,gate,up,
down; two real AdamW steps on a GRPO-style loss so LoRA B and the Adam state
are real; E and U: B 8 prompts, G 4, T 96, random tokens with left-padded
prompts (16-32 tokens) and right-padded responses.

    /opt/golden-venv/bin/python bench/compare_pytorch.py --make-bench-checkpoint /tmp/bench_ckpt
    /opt/golden-venv/bin/python bench/compare_pytorch.py --checkpoint /tmp/bench_ckpt \\
        --cpp build/bench/probe_compare [--rounds 5] [--json results.json]

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


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _torch():
    import torch

    torch.set_num_threads(THREADS)
    return torch


# ---- the benchmark checkpoint ---------------------------------------------------------------


def random_batch(torch, B, G, T, vocab, gen):
    """Random tokens in the batch layout: prompts of 16-32 tokens with up to 3 left-padding
    positions inside the prompt region, responses of 32..T-p tokens, right padding."""
    seq = torch.randint(2, vocab, (B, G, T), generator=gen)
    mask = torch.zeros((B, G, T), dtype=torch.int64)
    plen = torch.randint(16, 33, (B,), generator=gen)
    t = torch.arange(T)
    for b in range(B):
        p = int(plen[b])
        lpad = int(torch.randint(0, 4, (1,), generator=gen))
        seq[b, :, :p] = seq[b, 0, :p]  # the group shares its prompt
        for g in range(G):
            n = int(torch.randint(32, T - p + 1, (1,), generator=gen))
            mask[b, g] = ((t >= lpad) & (t < p + n)).long()
    seq = torch.where(mask > 0, seq, torch.ones_like(seq))  # padding id 1 (also the end-of-text id)
    rewards = torch.randn((B, G), generator=gen)
    return {"sequences": seq, "attention_mask": mask, "prompt_lens": plen.long(),
            "advantages": rewards - rewards.mean(dim=1, keepdim=True), "rewards": rewards}


def make_bench_checkpoint(out: str) -> None:
    torch = _torch()
    from make_golden import lmax_of, seq_logprobs, y_losses
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from export_optimizer_state import export_optimizer_state

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(8)
    base = Qwen2ForCausalLM(Qwen2Config(**BENCH))
    base.save_pretrained(out)
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
    for _ in range(2):  # real steps: LoRA B and the Adam state become non-zero
        b = random_batch(torch, SHAPE["B"], SHAPE["G"], SHAPE["T"], BENCH["vocab_size"], gen)
        S, L = seq_logprobs(model, b)
        loss = -y_losses(S, lmax_of(b, L), b["advantages"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    export_optimizer_state(opt, model, os.path.join(out, "optimizer.safetensors"))
    for name in ("E", "U"):
        save_file(random_batch(torch, SHAPE["B"], SHAPE["G"], SHAPE["T"], BENCH["vocab_size"], gen),
                  os.path.join(out, f"{name}.safetensors"))
    print(f"wrote {out}")


# ---- the PyTorch side (a worker process) -----------------------------------------------------


def load_torch_model(ckpt: str):
    """The checkpoint as a user loads it: the base class from config.json, the base weights,
    then PeftModel.from_pretrained (trainable adapter), float32."""
    torch = _torch()
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, GPT2LMHeadModel, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt)
    # eager attention: PyTorch's CPU scaled_dot_product_attention (transformers' default "sdpa")
    # has no double backward, which the alpha trick needs
    cfg._attn_implementation = "eager"
    cls = GPT2LMHeadModel if cfg.model_type == "gpt2" else Qwen2ForCausalLM
    base = cls(cfg)
    base.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")), strict=False)
    base.tie_weights()
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=True).float()
    model.eval()
    return torch, model


def torch_worker(args) -> None:
    torch, model = load_torch_model(args.checkpoint)
    from make_golden import lmax_of, load_adam, load_batch, seq_logprobs, x_losses, y_losses

    from export_optimizer_state import registry_names

    E = load_batch(os.path.join(args.checkpoint, "E.safetensors"))
    U = load_batch(os.path.join(args.checkpoint, "U.safetensors"))
    state, hyper = load_adam(os.path.join(args.checkpoint, "optimizer.safetensors"))
    names = registry_names(model, check_adapter_state=False)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    lora = [i for i, n in enumerate(names) if "lora_a" in n.lower() or "lora_b" in n.lower()
            or n.endswith("lm_head.weight")]
    rss_load = _rss_kb()
    B_E, B_U = E["sequences"].shape[0], U["sequences"].shape[0]
    b2, eps = hyper["beta2"], hyper["eps"]

    def sum_X():
        for p in params:
            p.grad = None
        S, L = seq_logprobs(model, E)
        (x_losses(S, L, lmax_of(E, L), "dr_grpo").mean() * B_E).backward()  # mean loss x prompt count
        out = [p.grad.detach().clone() / B_E for p in params]
        for p in params:
            p.grad = None
        return out

    def mu_Y():
        for p in params:
            p.grad = None
        S, L = seq_logprobs(model, U)
        (y_losses(S, lmax_of(U, L), U["advantages"].float()).mean() * B_U).backward()
        out = []
        for n, p in zip(names, params):
            st = state[n]
            vhat = st["exp_avg_sq"].float() / (1.0 - b2 ** st["step"])
            out.append(p.grad.detach() / (vhat.sqrt() + eps) / B_U)
        for p in params:
            p.grad = None
        return out

    def alpha(mu):
        S, L = seq_logprobs(model, E)
        a = torch.ones(B_E, requires_grad=True)
        LX = x_losses(S, L, lmax_of(E, L), "dr_grpo")
        gl = torch.autograd.grad((a * LX).sum(), [params[i] for i in lora], create_graph=True)
        contraction = sum((g * mu[i]).sum() for g, i in zip(gl, lora))
        return torch.autograd.grad(contraction, a)[0]

    out = {"rss_after_load_kb": rss_load, "dtype": "float32", "attn_implementation": model.config._attn_implementation}
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


def run_measured(cmd: list[str], env: dict) -> tuple[dict, int]:
    """Runs `cmd`, returns (its JSON output, its peak RSS in kB from wait4)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), int(ru.ru_maxrss)


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
                out, peak = run_measured(cmds[side](ph), env)
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
