#!/usr/bin/env python3
"""PyTorch eager reference timings for the CUDA benchmark (tests/cuda/gpu_check.sh runs it).

Times the probe's phases the way the Python original computes them, with
transformers + peft on the same GPU, model shape and batch shape as
cuda_bench (tests/cuda/cuda_bench.cu):

  sum_X, sum_Y   per microbatch one forward (SDPA attention), the phase's
                 weighted loss, one backward, LoRA gradients added into buffers
  alpha          the alpha trick by double backward: weights alpha_b = 1 on the
                 per-prompt losses, VJP into the LoRA parameters with
                 create_graph=True, contraction with mu_Y, gradient in alpha.
                 Eager attention: PyTorch's fused SDPA kernels have no double
                 backward.

Storage is float32; --precisions fp32,tf32 runs the products in full fp32
and/or TF32 (torch.set_float32_matmul_precision). With --cpp-json (cuda_bench
--json output) it prints the ratio table, per precision:
C++ time / PyTorch time per phase, with the targets of issue 5
(sum X + sum Y <= 0.8, alpha trick <= 0.5).

usage: compare_torch_cuda.py [--small] [--prompts B] [--responses G] [--tokens T]
                             [--prompt-len P] [--mb M] [--layers L]
                             [--precisions fp32,tf32] [--cpp-json FILE] [--json OUT]
"""
import argparse
import json
import statistics
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--responses", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--mb", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per phase; the median is reported")
    ap.add_argument("--cpp-json", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    o = dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936, rank=16,
             prompts=8, responses=8, tokens=512, prompt_len=64, mb=1)
    if a.small:  # the same as cuda_bench --small
        o.update(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=1024, vocab=8192,
                 prompts=4, responses=4, tokens=128, prompt_len=16, mb=2)
    for k in ("prompts", "responses", "tokens", "prompt_len", "mb", "layers"):
        if getattr(a, k) is not None:
            o[k] = getattr(a, k)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    o["repeats"] = a.repeats
    return a, o


def make_batch(o, n_prompts, seed, device):
    """Prompt of P tokens shared by a group, response b*G+g of length
    (T-P) - ((b*G+g)*37 mod ((T-P)/4 + 1)), right padding (as cuda_bench)."""
    g = torch.Generator().manual_seed(seed)
    G, T, P, V = o["responses"], o["tokens"], o["prompt_len"], o["vocab"]
    room = T - P
    seq = torch.zeros(n_prompts, G, T, dtype=torch.long)
    mask = torch.zeros(n_prompts, G, T, dtype=torch.long)
    for p in range(n_prompts):
        prompt = torch.randint(0, V, (P,), generator=g)
        for r in range(G):
            L = room - ((p * G + r) * 37 % (room // 4 + 1))
            seq[p, r, :P] = prompt
            seq[p, r, P:P + L] = torch.randint(0, V, (L,), generator=g)
            mask[p, r, :P + L] = 1
    adv = torch.randn(n_prompts, G, generator=g, dtype=torch.float64)
    return seq.to(device), mask.to(device), adv.to(device)


def build_model(o, device):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=o["vocab"], hidden_size=o["hidden"], intermediate_size=o["intermediate"],
              num_hidden_layers=o["layers"], num_attention_heads=o["heads"], num_key_value_heads=o["kv_heads"],
              tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=max(4096, o["tokens"]), use_cache=False)
    try:
        cfg = Qwen2Config(attn_implementation="sdpa", **kw)
    except TypeError:
        cfg = Qwen2Config(**kw)
        cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model = model.float()
    peft_cfg = LoraConfig(r=o["rank"], lora_alpha=2 * o["rank"], target_modules=TARGETS, lora_dropout=0.0,
                          bias="none")
    model = get_peft_model(model, peft_cfg)
    with torch.no_grad():  # a trained adapter: B != 0, every LoRA gradient live (as in cuda_bench)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.uniform_(-0.25, 0.25)
    return model


def set_attention(model, impl):
    base = model.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        try:
            base.set_attn_implementation(impl)
        except Exception:  # older API or refused: the config switch below still applies
            pass
    base.config._attn_implementation = impl
    return base.config._attn_implementation


def seq_logprob(model, ids, mask, plen):
    """S[r] = sum over generated t of log_softmax(z[r, t-1])[ids[r, t]], and L[r]."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    T = ids.shape[1]
    gen = mask[:, 1:].bool() & (torch.arange(1, T, device=ids.device)[None, :] >= plen)
    return (logp * gen).sum(-1), gen.sum(-1)


def x_weights(S, L, G):
    """dr_grpo: W = -(1/G) (Sw - LOO(Sw)), Sw = S / Lmax per prompt."""
    S = S.detach().double().view(-1, G)
    lmax = L.view(-1, G).max(-1, keepdim=True).values.clamp(min=1).double()
    sw = S / lmax
    loo = (sw.sum(-1, keepdim=True) - sw) / max(G - 1, 1) if G > 1 else torch.zeros_like(sw)
    return (-(sw - loo) / G).float()


def y_weights(L, adv, G):
    lmax = L.view(-1, G).max(-1, keepdim=True).values.clamp(min=1).double()
    return (adv / lmax / G).float()


def sync():
    torch.cuda.synchronize()


def phase_sum(model, params, batch, o, which, n_mb=None):
    seq, mask, adv = batch
    G, T, P = o["responses"], o["tokens"], o["prompt_len"]
    bufs = [torch.zeros_like(p) for p in params]
    n = seq.shape[0] if n_mb is None else min(seq.shape[0], n_mb * o["mb"])
    for b0 in range(0, n, o["mb"]):
        b1 = min(n, b0 + o["mb"])
        ids, m = seq[b0:b1].reshape(-1, T), mask[b0:b1].reshape(-1, T)
        S, L = seq_logprob(model, ids, m, P)
        W = x_weights(S, L, G) if which == "X" else y_weights(L, adv[b0:b1], G)
        (W.reshape(-1) * S).sum().backward()
        for buf, p in zip(bufs, params):
            if p.grad is not None:
                buf += p.grad
                p.grad = None
    return bufs


def phase_alpha(model, params, mu_y, batch, o, n_mb=None):
    seq, mask, _ = batch
    G, T, P = o["responses"], o["tokens"], o["prompt_len"]
    s = []
    n = seq.shape[0] if n_mb is None else min(seq.shape[0], n_mb * o["mb"])
    for b0 in range(0, n, o["mb"]):
        b1 = min(n, b0 + o["mb"])
        ids, m = seq[b0:b1].reshape(-1, T), mask[b0:b1].reshape(-1, T)
        alpha = torch.ones(b1 - b0, device=ids.device, requires_grad=True)
        S, L = seq_logprob(model, ids, m, P)
        LX = (x_weights(S, L, G) * S.view(-1, G)).sum(-1)
        grads = torch.autograd.grad((alpha * LX).sum(), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, mu_y))
        s.append(torch.autograd.grad(dot, alpha)[0].detach())
        del grads, dot
    return torch.cat(s)


def timed(fn):
    sync()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def run_precision(model, params, E, U, o, precision):
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
    res = {"precision": precision, "phases": {}, "peak_gib": {}, "notes": []}
    set_attention(model, "sdpa")
    # warm-up: one microbatch of each summed phase
    phase_sum(model, params, E, o, "X", n_mb=1)
    phase_sum(model, params, U, o, "Y", n_mb=1)
    res["samples"] = {}

    def measure(name, fn):  # the median of o["repeats"] timed runs; every sample kept in the JSON
        runs = [timed(fn) for _ in range(o["repeats"])]
        res["samples"][name] = [t for _, t, _ in runs]
        res["phases"][name] = statistics.median(res["samples"][name])
        res["peak_gib"][name] = max(m for _, _, m in runs)
        return runs[-1][0]

    measure("sum_X", lambda: phase_sum(model, params, E, o, "X"))
    sum_y = measure("sum_Y", lambda: phase_sum(model, params, U, o, "Y"))
    bu = U[0].shape[0]
    mu_y = [b / (torch.sqrt(torch.full_like(b, 1e-6) / (1 - 0.999**10)) + 1e-8) / bu for b in sum_y]
    try:
        impl = set_attention(model, "eager")
        res["notes"].append(f"alpha trick with attention '{impl}' (double backward)")
        phase_alpha(model, params, mu_y, E, o, n_mb=1)  # warm-up
        measure("alpha", lambda: phase_alpha(model, params, mu_y, E, o))
    except Exception as e:  # an out-of-memory or a missing double backward: report, keep the rest
        res["notes"].append(f"alpha trick failed: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    finally:
        set_attention(model, "sdpa")
    return res


def ratio_table(torch_res, cpp_file):
    cpp = {}
    try:
        with open(cpp_file) as fh:
            for run in json.load(fh).get("runs", []):
                cpp[run["precision"]] = run
    except (OSError, ValueError) as e:
        print(f"(cannot read {cpp_file}: {e})")
    print("\nratio table: C++ CudaBackend time / PyTorch eager time (lower is better)")
    print(f"{'precision':<10}{'phase':<24}{'C++ s':>10}{'torch s':>10}{'ratio':>8}  target")
    for r in torch_res:
        j = cpp.get(r["precision"])
        if not j:
            print(f"{r['precision']:<10}(no cuda_bench result)")
            continue
        cp, tp = j["phases"], r["phases"]
        rows = [("sum_X", cp.get("sum_X"), tp.get("sum_X"), ""), ("sum_Y", cp.get("sum_Y"), tp.get("sum_Y"), "")]
        if "sum_X" in cp and "sum_X" in tp:
            rows.append(("sum_X + sum_Y", cp["sum_X"] + cp["sum_Y"], tp["sum_X"] + tp["sum_Y"], "<= 0.8"))
        rows.append(("alpha trick", cp.get("conditional_variance"), tp.get("alpha"), "<= 0.5"))
        for name, c, t, target in rows:
            if c is None or t is None:
                print(f"{r['precision']:<10}{name:<24}{'-' if c is None else f'{c:.3f}':>10}"
                      f"{'-' if t is None else f'{t:.3f}':>10}{'-':>8}  {target}")
                continue
            ratio = c / t
            verdict = ""
            if target:
                verdict = " met" if ratio <= float(target.split()[-1]) else " NOT met"
            print(f"{r['precision']:<10}{name:<24}{c:>10.3f}{t:>10.3f}{ratio:>8.3f}  {target}{verdict}")


def main():
    a, o = parse()
    if not torch.cuda.is_available():
        print("compare_torch_cuda: no CUDA device visible to PyTorch; nothing to time")
        return 0
    dev = torch.device("cuda")
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        print("compare_torch_cuda: peft is not installed")
        return 1
    print(f"PyTorch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}, "
          f"{torch.cuda.get_device_name(0)}")
    print(f"model: {o['layers']} layers, width {o['hidden']}, {o['heads']} heads / {o['kv_heads']} KV heads, "
          f"vocab {o['vocab']}, LoRA r {o['rank']}; batch {o['prompts']} x {o['responses']} x {o['tokens']}, "
          f"microbatches of {o['mb']} prompt(s), float32 storage")
    t0 = time.perf_counter()
    model = build_model(o, dev)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    print(f"model built in {time.perf_counter() - t0:.1f} s; {len(params)} trainable tensors, "
          f"{sum(p.numel() for p in params)} trainable parameters")
    E = make_batch(o, o["prompts"], 1, dev)
    U = make_batch(o, o["prompts"], 2, dev)
    results = []
    for precision in [p.strip() for p in a.precisions.split(",") if p.strip()]:
        r = run_precision(model, params, E, U, o, precision)
        results.append(r)
        print(f"[{precision}] phase times (s): " +
              ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items()) +
              "; peak GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in r["peak_gib"].items()))
        if o["repeats"] > 1:
            print(f"[{precision}] medians of {o['repeats']} runs; samples (s): " +
                  "; ".join(f"{k} " + " ".join(f"{t:.3f}" for t in v) for k, v in r["samples"].items()))
        for n in r["notes"]:
            print(f"[{precision}] {n}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"config": o, "results": results}, fh, indent=2)
    if a.cpp_json:
        ratio_table(results, a.cpp_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
