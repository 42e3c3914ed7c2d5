"""Export a PyTorch Adam/AdamW optimizer state of a PEFT model to entropy_probe's
``optimizer.safetensors`` (docs/checkpoints.md).

The file holds, for every trainable parameter that has optimizer state,

    <registry name>.exp_avg      first moment m, the parameter's shape
    <registry name>.exp_avg_sq   second moment v, the parameter's shape
    <registry name>.step         the step count, as PyTorch keeps it (a 0-d tensor)

and ``__metadata__`` with ``lr``, ``beta1``, ``beta2``, ``eps`` and
``weight_decay`` as decimal strings (``repr(float)``). The registry name of a
parameter is the key PEFT writes for it in ``adapter_model.safetensors``
(``get_peft_model_state_dict``): the ``named_parameters()`` name with the
adapter name taken out, e.g.

    base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight
        -> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
    base_model.model.lm_head.modules_to_save.default.weight
        -> base_model.model.lm_head.weight

The mapping is built from the names and then checked: one-to-one, every name
a key of the adapter's state dict, and each adapter tensor equal to the
parameter it names.

This is ``entropy_probe.export_optimizer_state`` of the Python package;
``tools/export_optimizer_state.py`` loads this file directly, so it also works
without the package installed. In a training script (preferred: pass the
optimizer itself, so parameters are matched by identity whatever the param
groups look like):

    from entropy_probe import export_optimizer_state    # or, from tools/: from export_optimizer_state import ...
    model.save_pretrained(out_dir)                       # adapter files
    export_optimizer_state(optimizer, model, f"{out_dir}/optimizer.safetensors")

A ``state_dict()`` works too; then the optimizer's parameter indices must be
the order of ``[p for n, p in model.named_parameters() if p.requires_grad]``
(what ``torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)``
gives).

From the command line, for a saved state dict (``torch.save(opt.state_dict(),
...)``, e.g. a Hugging Face Trainer checkpoint's ``optimizer.pt``):

    python tools/export_optimizer_state.py --adapter CHECKPOINT_DIR \\
        [--base-model BASE_DIR] [--optimizer CHECKPOINT_DIR/optimizer.pt] \\
        [--out CHECKPOINT_DIR/optimizer.safetensors]

The CLI rebuilds the PEFT model from the base model's config.json and the
adapter (weights are only needed to check the mapping; with --no-weights it
uses the config alone).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Iterable, Mapping

import torch

METADATA_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def unwrap(model):
    """The module that performs the forward pass (``model.module`` of a DDP/DataParallel wrapper)."""
    return model.module if hasattr(model, "module") else model


def _adapter_names(model) -> list[str]:
    cfg = getattr(model, "peft_config", None)
    return list(cfg.keys()) if isinstance(cfg, Mapping) else []


def registry_name(param_name: str, adapter_names: Iterable[str]) -> str:
    """The adapter-file key of a ``named_parameters()`` name (PEFT strips the adapter name)."""
    name = param_name
    for a in adapter_names:
        name = name.replace(f".modules_to_save.{a}.", ".")
        name = name.replace(f".{a}.", ".")
        if name.endswith(f".{a}"):
            name = name[: -len(a) - 1]
    return name


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``[(name, p) for name, p in model.named_parameters() if p.requires_grad]`` of the unwrapped model."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def registry_names(model, *, check_adapter_state: bool = True) -> list[str]:
    """Registry names of the trainable parameters, in ``named_parameters()`` order.

    For a PEFT model these are the keys of ``get_peft_model_state_dict(model)``;
    the mapping is checked to be one-to-one and, with ``check_adapter_state``,
    each adapter tensor must equal the parameter it was mapped from.
    """
    m = unwrap(model)
    trainables = trainable_parameters(m)
    if not trainables:
        raise ValueError("export_optimizer_state: the model has no trainable parameters (requires_grad == True)")
    adapters = _adapter_names(m)
    names = [registry_name(n, adapters) for n, _ in trainables]
    seen: dict[str, str] = {}
    for (orig, _), new in zip(trainables, names):
        if new in seen:
            raise ValueError(f"export_optimizer_state: parameters '{seen[new]}' and '{orig}' both map to '{new}'")
        seen[new] = orig
    if adapters and check_adapter_state:
        from peft import get_peft_model_state_dict

        active = getattr(m, "active_adapter", adapters[0])
        if isinstance(active, (list, tuple)):
            active = active[0]
        adapter_sd = get_peft_model_state_dict(m, adapter_name=active)
        missing = [n for n in names if n not in adapter_sd]
        if missing:
            raise ValueError(
                "export_optimizer_state: trainable parameters without an adapter-file key (is something trainable "
                f"that PEFT does not save?): {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"adapter keys look like {list(adapter_sd)[:3]}")
        for (orig, p), new in zip(trainables, names):
            t = adapter_sd[new]
            if tuple(t.shape) != tuple(p.shape) or not torch.equal(t.detach().to(p.dtype).cpu(), p.detach().cpu()):
                raise ValueError(f"export_optimizer_state: adapter tensor '{new}' differs from parameter '{orig}'")
        extra = sorted(set(adapter_sd) - set(names))
        if extra:
            print(f"export_optimizer_state: note: adapter keys that are not trainable (no optimizer state): {extra}",
                  file=sys.stderr)
    return names


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _hyper(groups: list[dict]) -> dict[str, float]:
    def of(g):
        b1, b2 = g["betas"]
        return {"lr": _as_float(g["lr"]), "beta1": _as_float(b1), "beta2": _as_float(b2), "eps": _as_float(g["eps"]),
                "weight_decay": _as_float(g.get("weight_decay", 0.0))}

    groups = [g for g in groups if len(g["params"]) > 0] or groups[:1]  # e.g. the Trainer's empty no-decay group
    hs = [of(g) for g in groups]
    for i, h in enumerate(hs[1:], start=1):
        if h != hs[0]:
            raise ValueError(
                "export_optimizer_state: param groups 0 and {} have different hyperparameters ({} vs {}); the file "
                "holds one set".format(i, hs[0], h))
    if any(g.get("amsgrad", False) for g in groups):
        raise ValueError("export_optimizer_state: amsgrad is not supported (the preconditioner uses exp_avg_sq)")
    for k, v in hs[0].items():
        if not math.isfinite(v):
            raise ValueError(f"export_optimizer_state: {k} = {v} is not finite")
    return hs[0]


def optimizer_tensors(optimizer_or_state: Any, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``optimizer.safetensors``, without writing them.

    ``optimizer_or_state`` is a ``torch.optim.Optimizer`` (parameters matched by
    identity) or its ``state_dict()`` (parameter index i = i-th trainable parameter).
    """
    m = unwrap(model)
    trainables = trainable_parameters(m)
    names = registry_names(m)
    if isinstance(optimizer_or_state, torch.optim.Optimizer):
        opt = optimizer_or_state
        sd = opt.state_dict()
        index_of = {id(p): i for i, (_, p) in enumerate(trainables)}
        order: list[int] = []  # state-dict index -> trainable index
        for g in opt.param_groups:
            for p in g["params"]:
                if id(p) not in index_of:
                    raise ValueError("export_optimizer_state: the optimizer holds a parameter that is not a trainable "
                                     "parameter of the model")
                order.append(index_of[id(p)])
    else:
        sd = optimizer_or_state
        n_opt = sum(len(g["params"]) for g in sd["param_groups"])
        if n_opt != len(trainables):
            raise ValueError(f"export_optimizer_state: the optimizer has {n_opt} parameters, the model "
                             f"{len(trainables)} trainable ones; pass the optimizer object instead of its state_dict")
        order = list(range(n_opt))
    if len(set(order)) != len(order):
        raise ValueError("export_optimizer_state: a parameter appears twice in the optimizer")
    flat_idx = [i for g in sd["param_groups"] for i in g["params"]]
    meta = {k: repr(v) for k, v in _hyper(sd["param_groups"]).items()}
    out: dict[str, torch.Tensor] = {}
    for pos, sd_index in enumerate(flat_idx):
        st = sd["state"].get(sd_index)
        if not st:
            continue  # no state yet (never stepped): the probe uses the identity for it, with a warning
        t = order[pos]
        name, p = names[t], trainables[t][1]
        for k in ("exp_avg", "exp_avg_sq"):
            if k not in st:
                raise ValueError(f"export_optimizer_state: state of '{name}' has no '{k}' (not an Adam state?)")
            v = st[k]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"export_optimizer_state: '{name}.{k}' has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            out[f"{name}.{k}"] = v.detach().cpu().contiguous().clone()
        step = st.get("step", 0)
        step_t = step.detach().cpu().clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step),
                                                                                                dtype=torch.float64)
        out[f"{name}.step"] = step_t.contiguous()
    return out, meta


def export_optimizer_state(optimizer_or_state: Any, model, path: str | os.PathLike) -> dict[str, str]:
    """Writes ``optimizer.safetensors`` for ``model`` (a PEFT model, or any module) to ``path``.

    Returns the metadata written.
    """
    from safetensors.torch import save_file

    tensors, meta = optimizer_tensors(optimizer_or_state, model)
    save_file(tensors, str(path), metadata=meta)
    return meta


# ---- command line -------------------------------------------------------------------


def _load_peft_model(adapter_dir: str, base_dir: str | None, with_weights: bool):
    import json

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if base_dir is None:
        if os.path.exists(os.path.join(adapter_dir, "config.json")):
            base_dir = adapter_dir
        else:
            with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
                base_dir = json.load(f).get("base_model_name_or_path")
            if not base_dir:
                raise SystemExit("export_optimizer_state: no --base-model and the adapter names none")
    config = AutoConfig.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_config(config)
    if with_weights:
        from safetensors.torch import load_file

        files = [f for f in os.listdir(base_dir) if f.startswith("model") and f.endswith(".safetensors")]
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(files):
            sd.update(load_file(os.path.join(base_dir, f)))
        base.load_state_dict(sd, strict=False)
        base.tie_weights()
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert a PyTorch Adam/AdamW optimizer state_dict of a PEFT model into entropy_probe's "
        "optimizer.safetensors (keys '<adapter key>.exp_avg|exp_avg_sq|step', metadata lr, beta1, beta2, eps, "
        "weight_decay).")
    ap.add_argument("--adapter", required=True, help="directory with adapter_config.json and adapter_model.safetensors")
    ap.add_argument("--base-model", help="directory with the base model's config.json (and model*.safetensors); "
                    "default: --adapter if it has config.json, else the adapter's base_model_name_or_path")
    ap.add_argument("--optimizer", help="torch.save'd optimizer.state_dict() (default: ADAPTER/optimizer.pt)")
    ap.add_argument("--out", help="output file (default: ADAPTER/optimizer.safetensors)")
    ap.add_argument("--no-weights", action="store_true",
                    help="build the model from config.json alone (skips the adapter-tensor equality check's base)")
    args = ap.parse_args(argv)
    opt_path = args.optimizer or os.path.join(args.adapter, "optimizer.pt")
    out = args.out or os.path.join(args.adapter, "optimizer.safetensors")
    model = _load_peft_model(args.adapter, args.base_model, not args.no_weights)
    state = torch.load(opt_path, map_location="cpu", weights_only=True)
    meta = export_optimizer_state(state, model, out)
    n = len(trainable_parameters(model))
    print(f"wrote {out}: {n} trainable parameters, metadata {meta}")
    return 0

