#!/usr/bin/env python3
"""Golden checkpoints and reference values for entropy_probe's parity tests.

Writes, under tests/data/golden/<name>/, a tiny random Hugging Face model with a
real PEFT LoRA adapter and a real AdamW state (three GRPO-style RL steps on
sampled batches), two batch files, and the probe's quantities computed by an
independent PyTorch reference of docs/math.md in float64:

    config.json, model.safetensors          base model (save_pretrained of the base)
    adapter_config.json, adapter_model.safetensors   PEFT save_pretrained
    optimizer.safetensors                   tools/export_optimizer_state.py
    E.safetensors, U.safetensors            batches (docs/checkpoints.md)
    golden.json                             every probe quantity (float64), including the
                                            adamw direction and the per-sequence influences
    golden_tensors.safetensors              float64: logits_E [B,G,T,V] (zero at
                                            padded query positions), mu_X.<name>,
                                            mu_Y.<name> (registry names)

Checkpoints: gpt2_peft_all_linear, qwen2_peft_regex and qwen2_peft_layers (the PEFT
adapter settings: all-linear, regex targets, exclude_modules, layers_to_transform,
rank/alpha patterns, bias, modules_to_save of embeddings and norms), gpt2_lora (LoRA on
c_attn, c_proj, c_fc; fan_in_fan_out), gpt2_lmhead
(the same plus modules_to_save=["lm_head"]), qwen2_lora (q,k,v,o,gate,up,down;
tied embeddings; the batches carry max_lengths; config.json rewritten to the
transformers < 5 layout with a top-level rope_theta), qwen2_rslora (untied lm_head,
use_rslora; the batches carry position_ids; config.json as transformers 5 writes
it, rope_theta inside rope_parameters). Both Qwen2 models use rope_theta 25000,
which is no library's default. gpt2_variant (n_inner 40, activation_function
"gelu" (erf), scale_attn_by_inverse_layer_idx, layer_norm_epsilon 1e-4), llama_lora (Llama 3.x shapes: GQA, untied, rope
type llama3 in the transformers < 5 layout, rope_scaling; attention_bias and
mlp_bias on), qwen3_lora (q_norm / k_norm, head_dim 16 != hidden / heads, tied,
rope type yarn), mistral_lora (sliding_window 16 >= the batches' 12 tokens,
rope type dynamic with max_position_embeddings 8, so the frequencies scale at
the batches' length 12).

Exact commands (from the repository root; deterministic, needs torch,
transformers, peft, safetensors: tools/peer_venv.py makes or reuses a virtual
environment with them from PyPI and prints its python):

    py=$(python3 tools/peer_venv.py build/peer-venv)
    "$py" tools/make_golden.py --out tests/data/golden

Options: --only NAME (one checkpoint), --check (recompute into a temporary
directory and compare with the committed golden.json files).

Reproducible: every tensor and number is the same on every run (seeded; CPU
float64). Byte for byte, only the order of the __metadata__ keys of
optimizer.safetensors can differ (the safetensors writer keeps them in a hash
map); the script re-executes itself with PYTHONHASHSEED=0 so that PEFT's
target_modules (a set) is written in a fixed order.

Reference numerics (what the float64 golden needs; see patch_transformers()):
  * attention: transformers' eager attention (attn_implementation="eager") with
    its module-level function replaced by one that keeps the query dtype
    (Qwen2's eager softmax is forced to float32), turns the additive mask into a
    boolean one and gives fully masked query rows (left padding) zero weights
    instead of NaN;
  * decoder rotary (Qwen2, Llama, Mistral, Qwen3): Hugging Face builds inv_freq
    and the angles in float32; the patched forward computes cos/sin in float64
    and casts, as the C++ library's table does. Scaled rope types call
    transformers' own ROPE_INIT_FUNCTIONS with the module's torch.float /
    torch.float32 read as float64. Dynamic scaling is recomputed per forward
    from max(position_ids) + 1 (transformers keeps the largest length seen;
    every forward of the golden computation has the same length);
  * decoder RMSNorm: Hugging Face upcasts to float32 (a downcast for float64); the
    patched forward normalises in max(input dtype, float32).
In float32 (the RL steps) the patched functions compute what the originals do.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_optimizer_state import export_optimizer_state, registry_names  # noqa: E402

torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- numerics patches ------------------------------------------------------------------


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention in the query's dtype; a fully masked query row gets zero weights (no NaN)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        b, h, s, d = key.shape
        key = key[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
        value = value[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:  # additive: 0 where allowed, the dtype's minimum where masked
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        allowed = allowed[..., : key.shape[-2]].expand_as(scores)
        any_allowed = allowed.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_allowed, 0.0)
        probs = torch.softmax(scores, dim=-1) * any_allowed
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class _TorchF64(types.ModuleType):
    """torch, with torch.float and torch.float32 read as float64 (for modeling_rope_utils)."""

    def __getattr__(self, name):
        return torch.float64 if name in ("float", "float32") else getattr(torch, name)


def _rope_f64(config, rope_type: str, seq_len: int):
    """inv_freq (float64) and the attention factor of transformers' rope functions."""
    import transformers.modeling_rope_utils as mru

    if rope_type == "default":
        theta = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)), 1.0
    saved = mru.torch
    mru.torch = _TorchF64("torch")
    try:
        inv_freq, factor = mru.ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    finally:
        mru.torch = saved
    assert inv_freq.dtype == torch.float64
    return inv_freq, float(factor)


def _decoder_rotary_forward(self, x, position_ids):
    # Hugging Face computes inv_freq and the angles in float32 (autocast off);
    # the golden needs float64 cos/sin, so they are computed here in float64
    # and cast to x's dtype (the C++ library's table does the same).
    rope_type = self.config.rope_parameters["rope_type"]
    seq_len = int(position_ids.max()) + 1 if "dynamic" in rope_type else None
    inv_freq, factor = _rope_f64(self.config, rope_type, seq_len)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)


def _decoder_rmsnorm_forward(self, hidden_states):
    dtype = hidden_states.dtype
    h = hidden_states.to(torch.promote_types(dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(dtype)


def patch_transformers():
    import transformers.models.gpt2.modeling_gpt2 as mg
    import transformers.models.llama.modeling_llama as ml
    import transformers.models.mistral.modeling_mistral as mm
    import transformers.models.qwen2.modeling_qwen2 as mq
    import transformers.models.qwen3.modeling_qwen3 as mq3

    mg.eager_attention_forward = _eager_attention
    for mod, prefix in ((mq, "Qwen2"), (ml, "Llama"), (mm, "Mistral"), (mq3, "Qwen3")):
        mod.eager_attention_forward = _eager_attention
        getattr(mod, prefix + "RotaryEmbedding").forward = _decoder_rotary_forward
        getattr(mod, prefix + "RMSNorm").forward = _decoder_rmsnorm_forward


# ---- checkpoint specifications -----------------------------------------------------------


@dataclass
class Spec:
    name: str
    family: str  # gpt2 | qwen2 | llama | mistral | qwen3
    model: dict
    lora: dict
    adam: dict  # lr, betas, eps, weight_decay
    seed: int
    vocab: int
    E: dict = field(default_factory=lambda: dict(B=4, G=3, T=12))
    U: dict = field(default_factory=lambda: dict(B=3, G=3, T=12))
    max_lengths: bool = False
    position_ids: bool = False
    legacy_rope_config: bool = False  # config.json with a top-level rope_theta (transformers < 5 layout)
    variants: list = field(default_factory=lambda: [dict(weighting="dr_grpo", temperature=1.0)])


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
QWEN2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gpt2_model_cfg(vocab=64):
    return dict(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def qwen2_model_cfg(vocab=96, tie=True, rope_theta=25000.0):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                rope_theta=rope_theta, bos_token_id=1, eos_token_id=1)


def decoder_model_cfg(vocab=96, tie=False, **kw):
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=1)
    cfg.update(kw)
    return cfg


SPECS = [
    Spec("gpt2_lora", "gpt2", gpt2_model_cfg(64),
         dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
         dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), seed=11, vocab=64,
         variants=[dict(weighting="dr_grpo", temperature=1.0), dict(weighting="per_token_avg", temperature=0.8)]),
    Spec("gpt2_lmhead", "gpt2", gpt2_model_cfg(64),
         dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, modules_to_save=["lm_head"]),
         dict(lr=5e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0), seed=12, vocab=64),
    Spec("qwen2_lora", "qwen2", qwen2_model_cfg(96, tie=True),
         dict(r=4, lora_alpha=8, target_modules=QWEN2_TARGETS),
         dict(lr=1e-2, betas=(0.9, 0.995), eps=1e-7, weight_decay=0.1), seed=13, vocab=96, max_lengths=True,
         legacy_rope_config=True),
    Spec("qwen2_rslora", "qwen2", qwen2_model_cfg(96, tie=False),
         dict(r=4, lora_alpha=8, target_modules=QWEN2_TARGETS, use_rslora=True),
         dict(lr=2e-2, betas=(0.85, 0.98), eps=1e-8, weight_decay=0.05), seed=14, vocab=96, position_ids=True,
         variants=[dict(weighting="dr_grpo", temperature=1.0), dict(weighting="per_token_avg", temperature=1.3)]),
    # Adapter settings as current peft saves them (docs/checkpoints.md, "Adapter settings"); small on purpose.
    Spec("gpt2_peft_all_linear", "gpt2", gpt2_model_cfg(32),
         dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["transformer.h.0.mlp.c_proj"],
              rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 5}, bias="lora_only",
              modules_to_save=["wte", "ln_f"], fan_in_fan_out=True),
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01), seed=15, vocab=32,
         E=dict(B=3, G=2, T=8), U=dict(B=2, G=2, T=8)),
    Spec("qwen2_peft_regex", "qwen2", qwen2_model_cfg(48, tie=True),
         dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
              exclude_modules=r".*\.0\.mlp\.down_proj", bias="all", modules_to_save=["embed_tokens", "norm"]),
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0), seed=16, vocab=48,
         E=dict(B=3, G=2, T=8), U=dict(B=2, G=2, T=8)),
    Spec("qwen2_peft_layers", "qwen2", qwen2_model_cfg(48, tie=False),
         dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1],
              layers_pattern="layers", rank_pattern={"gate_proj": 2}, alpha_pattern={"q_proj": 16}),
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0), seed=17, vocab=48,
         E=dict(B=3, G=2, T=8), U=dict(B=2, G=2, T=8)),
    Spec("gpt2_variant", "gpt2",
         dict(gpt2_model_cfg(64), n_inner=40, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
              layer_norm_epsilon=1e-4),
         dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
         dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), seed=18, vocab=64),
    Spec("llama_lora", "llama",
         decoder_model_cfg(96, tie=False, attention_bias=True, mlp_bias=True,
                           rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=16)),
         dict(r=4, lora_alpha=8, target_modules=QWEN2_TARGETS),
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05), seed=15, vocab=96, legacy_rope_config=True),
    Spec("qwen3_lora", "qwen3",
         decoder_model_cfg(96, tie=True, head_dim=16,
                           rope_parameters=dict(rope_type="yarn", rope_theta=25000.0, factor=4.0,
                                                original_max_position_embeddings=16)),
         dict(r=4, lora_alpha=8, target_modules=QWEN2_TARGETS, use_rslora=True),
         dict(lr=1e-2, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.0), seed=16, vocab=96, position_ids=True),
    Spec("mistral_lora", "mistral",
         decoder_model_cfg(96, tie=False, sliding_window=16, max_position_embeddings=8,
                           rope_parameters=dict(rope_type="dynamic", rope_theta=25000.0, factor=2.0)),
         dict(r=4, lora_alpha=8, target_modules=QWEN2_TARGETS),
         dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), seed=17, vocab=96, max_lengths=True),
]

DECODER_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
                   "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}

PAD_ID = 1  # also the end-of-sequence id: the mask, never the id, decides padding


def build_base(spec: Spec):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(spec.seed)
    if spec.family == "gpt2":
        cfg = GPT2Config(attn_implementation="eager", **spec.model)
        return GPT2LMHeadModel(cfg)
    config_cls, model_cls = (getattr(transformers, n) for n in DECODER_CLASSES[spec.family])
    cfg = config_cls(attn_implementation="eager", **copy.deepcopy(spec.model))
    return model_cls(cfg)


def wrap_lora(base, spec: Spec):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(lora_dropout=0.0, **spec.lora))


# ---- batches ---------------------------------------------------------------------------


def batch_tensors(b: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def sample_batch(model, B, G, T, vocab, gen: torch.Generator, *, max_lengths=False, position_ids=False,
                 adv_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """B prompts x G sampled responses in a [B, G, T] grid: prompts of unequal length with
    left padding inside the prompt region, responses of unequal length sampled from `model`
    (temperature 1), right padding after them. Advantages: rewards minus the group mean."""
    seq = torch.full((B, G, T), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((B, G, T), dtype=torch.int64)
    plen = torch.zeros(B, dtype=torch.int64)
    resp_len = torch.zeros((B, G), dtype=torch.int64)
    for b in range(B):
        p = int(torch.randint(3, T // 2 + 1, (1,), generator=gen))
        lpad = int(torch.randint(0, min(2, p - 2) + 1, (1,), generator=gen))
        prompt = torch.randint(2, vocab, (p - lpad,), generator=gen)
        plen[b] = p
        for g in range(G):
            seq[b, g, lpad:p] = prompt
            mask[b, g, lpad:p] = 1
            resp_len[b, g] = int(torch.randint(1, T - p + 1, (1,), generator=gen))
    rows_seq, rows_mask = seq.view(B * G, T).clone(), mask.view(B * G, T).clone()
    rows_p = plen.repeat_interleave(G)
    rows_len = resp_len.view(-1)
    pos_all = positions_for(rows_mask, position_ids)
    for t in range(int(rows_p.min()), T):
        active = (rows_p <= t) & (t < rows_p + rows_len)
        if not active.any():
            continue
        logits = model(input_ids=rows_seq[:, :t], attention_mask=rows_mask[:, :t], position_ids=pos_all[:, :t]).logits
        probs = torch.softmax(logits[:, -1].double(), dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        rows_seq[active, t] = tok[active]
        rows_mask[active, t] = 1
        pos_all = positions_for(rows_mask, position_ids)
    out = {"sequences": rows_seq.view(B, G, T), "attention_mask": rows_mask.view(B, G, T), "prompt_lens": plen}
    rewards = torch.randn((B, G), generator=gen, dtype=torch.float64)
    out["rewards"] = rewards.to(adv_dtype)
    out["advantages"] = (rewards - rewards.mean(dim=1, keepdim=True)).to(adv_dtype)
    if max_lengths:
        out["max_lengths"] = (T - plen).to(torch.int64)  # the generation budget, >= every response
    if position_ids:
        out["position_ids"] = positions_for(rows_mask, True).view(B, G, T)
    return out


def positions_for(mask_rows: torch.Tensor, from_mask: bool) -> torch.Tensor:
    """Default positions 0..T-1 per row, or (from_mask) the count of real tokens before each
    position (what RL frameworks pass with left padding; padding gets 0)."""
    R, T = mask_rows.shape
    if not from_mask:
        return torch.arange(T).expand(R, T).clone()
    return (mask_rows.cumsum(-1) - 1).clamp(min=0) * (mask_rows > 0)


def load_batch(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ---- the reference math (docs/math.md) ---------------------------------------------------


def seq_logprobs(model, batch: dict, tau: float = 1.0, with_logits: bool = False):
    """S[b,g] = sum_{t in gen(b,g)} log_softmax(z[b,g,t-1]/tau)[seq[b,g,t]], L[b,g] = |gen(b,g)|."""
    seq, mask, plen = batch["sequences"], batch["attention_mask"], batch["prompt_lens"]
    B, G, T = seq.shape
    ids, m = seq.reshape(B * G, T), mask.reshape(B * G, T)
    pos = batch["position_ids"].reshape(B * G, T) if "position_ids" in batch else torch.arange(T).expand(B * G, T)
    logits = model(input_ids=ids, attention_mask=m, position_ids=pos).logits  # [R, T, V]
    logp = torch.log_softmax(logits[:, :-1] / tau, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # scores t = 1..T-1
    t = torch.arange(1, T)
    gen = (t[None, :] >= plen.repeat_interleave(G)[:, None]) & (m[:, 1:] == 1)
    S = torch.where(gen, logp, torch.zeros_like(logp)).sum(-1).view(B, G)
    L = gen.sum(-1).view(B, G).to(logits.dtype)
    return (S, L, logits) if with_logits else (S, L)


def lmax_of(batch: dict, L: torch.Tensor) -> torch.Tensor:
    if "max_lengths" in batch:
        return batch["max_lengths"].to(L.dtype)
    return L.max(dim=1).values.clamp(min=1.0)


def x_losses(S, L, Lmax, weighting: str):
    """LX[b] = -(1/G) sum_g c[b,g] S[b,g], c = stopgrad(Sw - LOO)."""
    G = S.shape[1]
    Sw = S / Lmax[:, None] if weighting == "dr_grpo" else S / L.clamp(min=1.0)
    loo = (Sw.sum(dim=1, keepdim=True) - Sw) / (G - 1) if G > 1 else torch.zeros_like(Sw)
    c = (Sw - loo).detach()
    return -(c * S).sum(dim=1) / G


def y_losses(S, Lmax, A):
    """LY[u] = (1/G) sum_g (A[u,g] / Lmax[u]) S[u,g]."""
    G = S.shape[1]
    return (A / Lmax[:, None] * S).sum(dim=1) / G


class Reference:
    """The PyTorch side of the probe on a float64 PEFT model."""

    def __init__(self, model, names: list[str], state: dict, hyper: dict):
        self.model = model
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.names = names
        assert len(self.params) == len(names)
        lower = [n.lower() for n in names]
        self.lora = [i for i, n in enumerate(names) if "lora_a" in lower[i] or "lora_b" in lower[i]
                     or n.endswith("lm_head.weight")]
        self.state = state  # name -> dict(exp_avg, exp_avg_sq, step) float64
        self.hyper = hyper

    # gradients of a scalar into every registry parameter (zeros where it does not reach)
    def grad(self, loss, retain=True, create_graph=False):
        gs = torch.autograd.grad(loss, self.params, retain_graph=retain, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, self.params)]

    def precondition(self, vec):
        out = []
        b2, eps = self.hyper["beta2"], self.hyper["eps"]
        for n, g in zip(self.names, vec):
            st = self.state.get(n)
            if st is None:
                out.append(g.clone())
                continue
            step = float(st["step"])
            v = st["exp_avg_sq"]
            vhat = v / (1.0 - b2 ** step) if step > 0 else v
            out.append(g / (vhat.sqrt() + eps))
        return out

    @staticmethod
    def dot(a, b, idx=None):
        idx = range(len(a)) if idx is None else idx
        return float(sum((a[i] * b[i]).sum() for i in idx))

    def run(self, E: dict, U: dict, eta: float, weighting: str, tau: float, mb: int = 2) -> dict:
        r: dict[str, Any] = {}
        B_E, B_U = E["sequences"].shape[0], U["sequences"].shape[0]
        # ---- X: per prompt, and the seed's microbatch accumulation (mean loss x count)
        S_E, L_E = seq_logprobs(self.model, E, tau)
        Lmax_E = lmax_of(E, L_E)
        LX = x_losses(S_E, L_E, Lmax_E, weighting)
        X_b = [self.grad(LX[b]) for b in range(B_E)]
        sum_X = [torch.zeros_like(p) for p in self.params]
        for b0 in range(0, B_E, mb):
            sl = {k: v[b0:b0 + mb] for k, v in E.items()}
            S, L = seq_logprobs(self.model, sl, tau)
            g = self.grad(x_losses(S, L, lmax_of(sl, L), weighting).mean(), retain=False)
            n = sl["sequences"].shape[0]
            sum_X = [a + n * gi for a, gi in zip(sum_X, g)]
        mu_X = [s / B_E for s in sum_X]
        check = max(float((m - sum(x[i] for x in X_b) / B_E).abs().max()) for i, m in enumerate(mu_X))
        assert check < 1e-13, f"microbatched mu_X differs from the per-prompt mean by {check}"
        # ---- Y
        S_U, L_U = seq_logprobs(self.model, U, tau)
        Lmax_U = lmax_of(U, L_U)
        A_U = U["advantages"].to(torch.float64)
        LY = y_losses(S_U, Lmax_U, A_U)
        gY_u = [self.grad(LY[u]) for u in range(B_U)]
        sum_Y_raw = [sum(g[i] for g in gY_u) for i in range(len(self.params))]
        mu_Y = [t / B_U for t in self.precondition(sum_Y_raw)]
        Y_u = [self.precondition(g) for g in gY_u]
        r["bars_dot"] = self.dot(mu_X, mu_Y)
        r["deltaH1"] = eta * r["bars_dot"]
        r["mu_X_norm"] = math.sqrt(self.dot(mu_X, mu_X))
        r["mu_Y_norm"] = math.sqrt(self.dot(mu_Y, mu_Y))
        # ---- alpha trick, the seed's way: weight the per-prompt losses by alpha, VJP with
        # create_graph, contract with mu_Y over the LoRA view, differentiate by alpha
        S_E2, L_E2 = seq_logprobs(self.model, E, tau)
        alpha = torch.ones(B_E, dtype=torch.float64, requires_grad=True)
        LXa = x_losses(S_E2, L_E2, lmax_of(E, L_E2), weighting)
        lora_params = [self.params[i] for i in self.lora]
        gl = torch.autograd.grad((alpha * LXa).sum(), lora_params, create_graph=True, allow_unused=True)
        contraction = sum((g * mu_Y[i]).sum() for g, i in zip(gl, self.lora) if g is not None)
        s_values = torch.autograd.grad(contraction, alpha)[0].tolist()
        s_check = [self.dot(x, mu_Y, self.lora) for x in X_b]
        err = max(abs(a - b) for a, b in zip(s_values, s_check)) / max(abs(x) for x in s_check)
        assert err < 1e-10, f"alpha trick and per-prompt contraction differ: {err}"
        r["s_values"] = s_values
        sbar = sum(s_values) / B_E
        var_s = sum((s - sbar) ** 2 for s in s_values) / (B_E - 1)
        r["sbar"], r["var_s"] = sbar, var_s
        r["SE_conditional"] = eta * math.sqrt(var_s / B_E)
        # ---- full SE (delta method)
        xd = [self.dot(x, mu_Y) for x in X_b]
        yd = [self.dot(y, mu_X) for y in Y_u]
        r["x_dot_mu_Y"], r["y_dot_mu_X"] = xd, yd
        r["V_X"] = sum((d - r["bars_dot"]) ** 2 for d in xd) / (B_E * max(B_E - 1, 1))
        r["V_Y"] = sum((d - r["bars_dot"]) ** 2 for d in yd) / (B_U * max(B_U - 1, 1))
        r["SE_deltaH1"] = eta * math.sqrt(r["V_X"] + r["V_Y"])
        r["B_E"], r["B_U"] = B_E, B_U
        r["E"] = {"S": S_E.flatten().tolist(), "L": L_E.flatten().tolist(), "Lmax": Lmax_E.tolist()}
        r["U"] = {"S": S_U.flatten().tolist(), "L": L_U.flatten().tolist(), "Lmax": Lmax_U.tolist()}
        # ---- ground truth
        r["ground_truth"] = {
            "adam": self.ground_truth(E, U, eta, tau, "adam", sum_Y_raw, B_U, mu_Y),
            "precond_sgd": self.ground_truth(E, U, eta, tau, "precond_sgd", sum_Y_raw, B_U, mu_Y),
        }
        # ---- update directions and per-sequence influences (after the ground truth, which
        # restores the parameters, so the keys above do not depend on it)
        r["adamw"], r["influence_precond_sgd"] = self.adamw_and_influences(U, eta, tau, mu_X, B_U)
        self._tensors = {"mu_X": mu_X, "mu_Y": mu_Y}
        return r

    def adamw_and_influences(self, U, eta, tau, mu_X, B_U):
        """The adamw direction and the per-sequence influences the straightforward way: one
        torch.optim.AdamW step from the saved state (parameters restored afterwards) gives
        v = (theta_after - theta_before) / eta and, from the optimizer's updated state, the
        step's shared denominator D; one autograd gradient per update sequence (u, g) gives
        v_(u,g) = ((1 - beta1) / D) W[u,g] grad S[u,g] / B_U (adamw) or P W[u,g] grad S[u,g] / B_U
        (precond_sgd); influence = eta mu_X . v_(u,g)."""
        h = self.hyper
        b1, b2, eps, wd = h["beta1"], h["beta2"], h["eps"], h["weight_decay"]
        S_U, L_U = seq_logprobs(self.model, U, tau)
        B, G = S_U.shape
        W = U["advantages"].to(torch.float64) / lmax_of(U, L_U)[:, None] / G  # the Y loss weights
        # per-sequence gradients first: the step below changes the parameters in place
        seq_grads = [self.grad(W[u, g] * S_U[u, g]) for u in range(B) for g in range(G)]
        snapshot = [p.detach().clone() for p in self.params]
        opt = torch.optim.AdamW(self.params, lr=eta, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
        for n, p in zip(self.names, self.params):
            st = self.state[n]
            opt.state[p] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                            "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
        opt.zero_grad(set_to_none=True)
        (-(W * S_U).sum() / B_U).backward()
        opt.step()
        with torch.no_grad():
            direction = [(p - s) / eta for p, s in zip(self.params, snapshot)]
            scale, momentum, decay = [], [], []
            for n, p, s in zip(self.names, self.params, snapshot):
                st = opt.state[p]
                t = float(st["step"])
                D = (1 - b1 ** t) * (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t) + eps)
                scale.append((1 - b1) / D)
                momentum.append(-b1 * self.state[n]["exp_avg"] / D)
                decay.append(-wd * s)
            for p, s in zip(self.params, snapshot):
                p.copy_(s)
        opt.zero_grad(set_to_none=True)
        out = {"bars_dot": self.dot(mu_X, direction)}
        out["deltaH1"] = eta * out["bars_dot"]
        out["momentum_share"] = eta * self.dot(mu_X, momentum)
        out["decay_share"] = eta * self.dot(mu_X, decay)
        out["influence"] = [eta * self.dot(mu_X, [c * x for c, x in zip(scale, gs)]) / B_U for gs in seq_grads]
        total = sum(out["influence"]) + out["momentum_share"] + out["decay_share"]
        assert abs(total - out["deltaH1"]) <= 1e-10 * abs(out["deltaH1"]), (total, out["deltaH1"])
        precond = [eta * self.dot(mu_X, self.precondition(gs)) / B_U for gs in seq_grads]
        return out, precond

    @torch.no_grad()
    def _S(self, E, tau):
        return seq_logprobs(self.model, E, tau)

    def ground_truth(self, E, U, eta, tau, kind, sum_Y_raw, B_U, mu_Y) -> dict:
        S0, L = self._S(E, tau)
        snapshot = [p.detach().clone() for p in self.params]
        if kind == "adam":
            h = self.hyper
            opt = torch.optim.AdamW(self.params, lr=eta, betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                    weight_decay=h["weight_decay"], foreach=False)
            for n, p in zip(self.names, self.params):
                st = self.state.get(n)
                if st is not None:
                    opt.state[p] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                                    "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
            # the loss -(1/B_U) sum_u LY[u], recomputed as a real autograd backward
            S_U, L_U = seq_logprobs(self.model, U, tau)
            loss = -y_losses(S_U, lmax_of(U, L_U), U["advantages"].to(torch.float64)).sum() / B_U
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, s in zip(self.params, sum_Y_raw):  # the same gradient as the probe's sum Y
                assert torch.allclose(p.grad, -s / B_U, rtol=1e-12, atol=1e-18)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                for p, m in zip(self.params, mu_Y):
                    p.add_(eta * m)
        S1, _ = self._S(E, tau)
        with torch.no_grad():
            for p, s in zip(self.params, snapshot):
                p.copy_(s)
        return snis(S0.flatten(), S1.flatten(), L.flatten())


def snis(S0, S1, L) -> dict:
    N = S0.numel()
    logw = S1 - S0
    w = torch.exp(logw - logw.max())
    H_orig = float(-S0.sum() / N)
    H_upd = float(-(w * S1).sum() / w.sum())
    H_orig_tok = float(-S0.sum() / L.sum().clamp(min=1.0))
    H_upd_tok = float(-(w * S1).sum() / (w * L).sum())
    return {"H_orig": H_orig, "H_upd": H_upd, "deltaH_true": H_upd - H_orig, "H_orig_tok": H_orig_tok,
            "H_upd_tok": H_upd_tok, "deltaH_true_tok": H_upd_tok - H_orig_tok,
            "ESS": float(w.sum() ** 2 / (w * w).sum())}


# ---- building one checkpoint -----------------------------------------------------------------


def rl_steps(model, opt, spec: Spec, gen: torch.Generator, steps: int = 3):
    """Real GRPO-style steps: sample a batch from the current policy, random rewards,
    group-centred advantages, AdamW on -(1/B) sum_u LY[u]."""
    for _ in range(steps):
        model.eval()  # no dropout; gradients still flow
        b = sample_batch(model, 4, 4, 12, spec.vocab, gen)
        S, L = seq_logprobs(model, b)
        loss = -y_losses(S, lmax_of(b, L), b["advantages"].to(S.dtype)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def load_reference_model(spec: Spec, ckpt: str):
    """The checkpoint as the files hold it (base from model.safetensors, the adapter via
    PeftModel.from_pretrained), in float64."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, GPT2LMHeadModel

    cfg = AutoConfig.from_pretrained(ckpt)
    cfg._attn_implementation = "eager"
    if spec.family != "gpt2":  # the file's rope settings, in whichever layout, are what the reference uses
        want = dict(spec.model.get("rope_parameters") or {"rope_type": "default", "rope_theta": spec.model["rope_theta"]})
        got = {k: cfg.rope_parameters.get(k) for k in want}
        assert got == want, (got, want)
    cls = GPT2LMHeadModel if spec.family == "gpt2" else getattr(transformers, DECODER_CLASSES[spec.family][1])
    base = cls(cfg)
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = base.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # a tied lm_head is not in the file
    if missing:
        assert cfg.tie_word_embeddings
        base.tie_weights()
    assert base.config._attn_implementation == "eager"
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=True).double()
    model.eval()
    return model


def load_adam(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    state: dict[str, dict] = {}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            name, field_ = k.rsplit(".", 1)
            state.setdefault(name, {})[field_] = f.get_tensor(k)
    for st in state.values():
        st["exp_avg"] = st["exp_avg"].to(torch.float64)
        st["exp_avg_sq"] = st["exp_avg_sq"].to(torch.float64)
        st["step"] = float(st["step"])
    hyper = {k: float(meta[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}
    return state, hyper


def make_checkpoint(spec: Spec, out_dir: str) -> dict:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    ckpt = os.path.join(out_dir, spec.name)
    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    os.makedirs(ckpt)
    gen = torch.Generator().manual_seed(1000 + spec.seed)

    # 1. base model, saved before the adapter is attached (frozen during training)
    base = build_base(spec)
    base.save_pretrained(ckpt)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(ckpt, extra)):
            os.remove(os.path.join(ckpt, extra))
    if spec.legacy_rope_config:
        # transformers >= 5 writes {"rope_parameters": {"rope_theta", "rope_type"}}; checkpoints
        # written by earlier versions (most on the Hub) have a top-level rope_theta and rope_scaling.
        path = os.path.join(ckpt, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        with open(path, "w") as f:
            json.dump(dict(sorted(cfg.items())), f, indent=2)
            f.write("\n")
    # 2. LoRA + three real RL steps with AdamW
    torch.manual_seed(spec.seed + 100)
    model = wrap_lora(base, spec)
    trainables = [p for _, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainables, lr=spec.adam["lr"], betas=spec.adam["betas"], eps=spec.adam["eps"],
                            weight_decay=spec.adam["weight_decay"])
    rl_steps(model, opt, spec, gen)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.abs().max() > 0, f"{n} is still zero"
    # 3. adapter and optimizer state
    model.save_pretrained(ckpt)
    if os.path.exists(os.path.join(ckpt, "README.md")):
        os.remove(os.path.join(ckpt, "README.md"))  # PEFT's model-card template
    export_optimizer_state(opt.state_dict(), model, os.path.join(ckpt, "optimizer.safetensors"))
    names = registry_names(model)
    assert sorted(names) == sorted(get_peft_model_state_dict(model).keys())
    # 4. E and U batches sampled from the trained policy
    kw = dict(max_lengths=spec.max_lengths, position_ids=spec.position_ids)
    model.eval()
    E = sample_batch(model, spec.E["B"], spec.E["G"], spec.E["T"], spec.vocab, gen, **kw)
    U = sample_batch(model, spec.U["B"], spec.U["G"], spec.U["T"], spec.vocab, gen, **kw)
    save_file(E, os.path.join(ckpt, "E.safetensors"))
    save_file(U, os.path.join(ckpt, "U.safetensors"))
    del model, opt, base

    # 5. the golden values, from the files, in float64
    return compute_golden(spec, ckpt)


def compute_golden(spec: Spec, ckpt: str) -> dict:
    import peft
    import transformers
    from safetensors.torch import load_file, save_file

    model = load_reference_model(spec, ckpt)
    names = registry_names(model)
    adapter_keys = sorted(load_file(os.path.join(ckpt, "adapter_model.safetensors")).keys())
    assert sorted(names) == adapter_keys, (names, adapter_keys)
    state, hyper = load_adam(os.path.join(ckpt, "optimizer.safetensors"))
    assert set(state) == set(names)
    E = load_batch(os.path.join(ckpt, "E.safetensors"))
    U = load_batch(os.path.join(ckpt, "U.safetensors"))
    ref = Reference(model, names, state, hyper)
    eta = hyper["lr"]

    with torch.no_grad():
        S, L, logits = seq_logprobs(model, E, 1.0, with_logits=True)
    B, G, T = E["sequences"].shape
    logits = logits.view(B, G, T, -1) * E["attention_mask"][..., None].to(torch.float64)
    tensors = {"logits_E": logits.contiguous()}

    variants = []
    for i, v in enumerate(spec.variants):
        r = ref.run(E, U, eta, v["weighting"], v["temperature"])
        r = {"config": {**v, "learning_rate": eta, "learning_rate_source": "optimizer", "variance": "full",
                          "is": "snis"},
             **r}
        variants.append(r)
        if i == 0:
            for n, mx, my in zip(names, ref._tensors["mu_X"], ref._tensors["mu_Y"]):
                tensors[f"mu_X.{n}"] = mx.detach().contiguous()
                tensors[f"mu_Y.{n}"] = my.detach().contiguous()
    save_file(tensors, os.path.join(ckpt, "golden_tensors.safetensors"))

    lora = [n for n in names if "lora_a" in n.lower() or "lora_b" in n.lower() or n.endswith("lm_head.weight")]
    golden = {
        "name": spec.name,
        "model_type": spec.family,
        "generated_by": "tools/make_golden.py --out tests/data/golden",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "learning_rate": eta,
        "adam": hyper,
        "registry": {"names": names, "trainable_tensors": len(names), "lora_tensors": len(lora),
                     "trainable_numel": sum(p.numel() for p in ref.params)},
        "logits": {"file": "golden_tensors.safetensors", "key": "logits_E",
                   "max_abs": float(logits.abs().max()), "note": "float64, zero at padded query positions"},
        "variants": variants,
    }
    with open(os.path.join(ckpt, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    return golden


def compare(a: Any, b: Any, path: str = "") -> float:
    """Max relative difference between two golden.json trees (numbers only)."""
    if isinstance(a, dict):
        return max([compare(a[k], b[k], f"{path}.{k}") for k in a if k != "versions"] or [0.0])
    if isinstance(a, list):
        return max([compare(x, y, path) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(a - b) / max(abs(a), abs(b), 1e-300)
    return 0.0 if a == b else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden"))
    ap.add_argument("--only", action="append", help="checkpoint name (repeatable)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and compare with --out")
    args = ap.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0" and argv is None:
        # PEFT keeps target_modules as a set: a fixed hash seed fixes its order in adapter_config.json
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    torch.use_deterministic_algorithms(True)
    patch_transformers()
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            worst = 0.0
            for s in specs:
                g = make_checkpoint(s, tmp)
                with open(os.path.join(args.out, s.name, "golden.json")) as f:
                    d = compare(json.load(f), g)
                print(f"{s.name}: max relative difference {d:.3e}")
                worst = max(worst, d)
            return 0 if worst < 1e-12 else 1
    os.makedirs(args.out, exist_ok=True)
    for s in specs:
        g = make_checkpoint(s, args.out)
        v = g["variants"][0]
        print(f"{s.name}: trainables {g['registry']['trainable_tensors']} (LoRA view {g['registry']['lora_tensors']}), "
              f"bars_dot {v['bars_dot']:.6e}, deltaH1 {v['deltaH1']:.6e}, SE {v['SE_deltaH1']:.3e}, "
              f"deltaH_true_tok(adam) {v['ground_truth']['adam']['deltaH_true_tok']:.6e}, "
              f"ESS(adam) {v['ground_truth']['adam']['ESS']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
