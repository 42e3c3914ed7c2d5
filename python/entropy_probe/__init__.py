"""entropy_probe from Python: sample, score and probe a Hugging Face checkpoint
(GPT-2 or Qwen2 + PEFT LoRA adapter + Adam state) with the C++ library.

    ckpt = entropy_probe.Checkpoint("runs/step_0100", dtype="f64")
    E = ckpt.sample(prompts, G=4, max_new_tokens=64, seed=1)
    E["advantages"] = entropy_probe.grpo_advantages(rewards)        # rewards [B, G]
    result = ckpt.run(E, "runs/step_0100/U.safetensors", ground_truth="adam")
    result["deltaH1"], result["SE_deltaH1"], result["deltaH_true_tok"]

Errors are InputError (bad data; a ValueError), UsageError (a bad argument;
a ValueError) or Error (RuntimeError), with the library's message. Progress and
the library's log go to the logger "entropy_probe". See docs/python.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Union

import numpy as np

from . import _core
from ._core import Error, InputError, UsageError

__all__ = [
    "Checkpoint", "grpo_advantages", "load_batch", "save_batch", "export_optimizer_state", "has_cuda", "Error",
    "InputError", "UsageError", "BATCH_KEYS"
]

_logger = logging.getLogger("entropy_probe")

# The batch-file keys (docs/checkpoints.md): name -> (integer?, required?).
BATCH_KEYS = {
    "sequences": (True, True),
    "attention_mask": (True, True),
    "prompt_lens": (True, True),
    "advantages": (False, True),
    "max_lengths": (False, False),
    "rewards": (False, False),
    "position_ids": (True, False),
}

# Checkpoint.run's options: `entropy-probe run`'s (examples/cli/run_command.hpp)
# under the same names with underscores, without --e-batch/--u-batch (the
# arguments), --dtype/--device (the Checkpoint's), --json (the result is
# returned) and --log-level (logging's).
RUN_OPTIONS = ("lr", "weighting", "mb_size", "max_memory", "variance", "ground_truth", "direction", "influence",
               "influence_csv", "influence_matrix", "influence_matrix_csv", "influence_truth", "influence_truth_seq",
               "lr_sweep", "control_variates", "is", "clip_c", "temperature", "alpha_route")
# The command's flags (`--influence`): True passes the flag, False leaves it out.
RUN_FLAGS = ("influence", "influence_matrix", "control_variates")

Batch = Union[str, os.PathLike, Mapping[str, Any]]


def _array(x: Any, name: str, key: str) -> np.ndarray:
    """numpy arrays as they are, anything with __dlpack__ (torch, jax, cupy on the CPU) through DLPack."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (RuntimeError, TypeError, BufferError) as e:
            raise InputError(f"{name}: '{key}' cannot be read through DLPack ({e}); pass a CPU array") from e
    return np.asarray(x)


def _to_core_batch(batch: Batch, name: str) -> "_core._Batch":
    if isinstance(batch, _core._Batch):
        return batch
    if isinstance(batch, (str, os.PathLike)):
        _sync_log_level()
        return _core._Batch.load(os.fspath(batch))
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name}: expected a batch dict or a batch-file path, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise InputError(f"{name}: unknown key(s) {unknown}; a batch holds {list(BATCH_KEYS)}")
    arrays = {}
    for key, (integer, required) in BATCH_KEYS.items():
        if key not in batch or batch[key] is None:
            if required:
                raise InputError(f"{name}: missing '{key}' (a batch holds sequences [B,G,T], attention_mask "
                                 "[B,G,T], prompt_lens [B] and advantages [B,G])")
            arrays[key] = None
            continue
        a = _array(batch[key], name, key)
        if integer and a.dtype.kind not in "iub":
            raise InputError(f"{name}: '{key}' has dtype {a.dtype}, expected an integer type")
        if not integer and a.dtype.kind not in ("f" if key == "advantages" else "fiub"):
            raise InputError(f"{name}: '{key}' has dtype {a.dtype}, expected a floating-point type")
        if integer and a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"{name}: '{key}' holds values beyond int64")
        arrays[key] = np.ascontiguousarray(a, dtype=np.int64 if integer else np.float64)
    return _core._Batch.from_arrays(name, **arrays)


def load_batch(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """A batch file as a dict of numpy arrays (integers int64, floats float64)."""
    return _to_core_batch(path, os.fspath(path)).arrays()


def save_batch(batch: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Writes a batch dict in the batch-file format (what load_batch and `entropy-probe run` read)."""
    _to_core_batch(batch, os.fspath(path)).save(os.fspath(path))


def grpo_advantages(rewards: Any, scale_by_std: bool = False, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages of rewards [B, G]: reward minus its group's mean (divided by the group's
    standard deviation + eps with scale_by_std)."""
    r = _array(rewards, "grpo_advantages", "rewards")
    if r.dtype.kind not in "fiub":
        raise UsageError(f"grpo_advantages: rewards have dtype {r.dtype}, expected numbers")
    return _core.grpo_advantages(np.ascontiguousarray(r, dtype=np.float64), scale_by_std, eps)


def has_cuda() -> bool:
    """Whether this build of the package runs Checkpoint(..., device="cuda") (built with
    ENTROPY_PROBE_CUDA=ON; a GPU is still needed at run time)."""
    return bool(_core._has_cuda)


def _sync_log_level() -> None:
    """The library formats only what the logger "entropy_probe" would emit."""
    _core._set_log_level(_logger.getEffectiveLevel())


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _cli_option_value(key: str, value: Any) -> str:
    """An option's value as the command's argument; the command checks it (range, choice) and names it."""
    bad = lambda want: UsageError(f"Checkpoint.run: {key} = {value!r}; expected {want}")
    if key in ("influence_csv", "influence_matrix_csv"):
        if not isinstance(value, (str, os.PathLike)):
            raise bad("a file name")
        return os.fspath(value)
    if key in ("mb_size", "influence_truth", "max_memory"):
        if _is_int(value):
            return str(int(value))
        if (key, value) == ("mb_size", "auto") or (key == "max_memory" and isinstance(value, str)):
            return value  # 'auto'; a size such as '6G'
        raise bad({"mb_size": "an integer or 'auto'", "influence_truth": "an integer count K",
                   "max_memory": "a number of bytes or a size such as '6G'"}[key])
    if key == "influence_truth_seq":
        # (prompt, completion) pairs -> "U:G,U:G,..."
        sequence = lambda x: isinstance(x, Iterable) and not isinstance(x, (str, bytes))
        pairs = [tuple(p) if sequence(p) else p for p in value] if sequence(value) else []
        if not pairs or not all(isinstance(p, tuple) and len(p) == 2 and all(map(_is_int, p)) for p in pairs):
            raise bad("a non-empty list of (prompt, completion) pairs of integers")
        return ",".join(f"{int(u)}:{int(g)}" for u, g in pairs)
    if key == "lr_sweep":
        if isinstance(value, str):
            return value  # the command's grid START:STOP:N
        rates = list(value) if isinstance(value, Iterable) else None
        if not rates or not all(map(_is_number, rates)):
            raise bad("a non-empty list of learning rates or a grid 'START:STOP:N'")
        return ",".join(repr(float(x)) for x in rates)
    if isinstance(value, (bool, np.bool_)):
        raise bad("a number" if key in ("lr", "clip_c", "temperature") else "a string")
    if _is_number(value):
        return repr(float(value))  # round-trips exactly through the command's parser
    if not isinstance(value, str):
        raise bad("a number" if key in ("lr", "clip_c", "temperature") else "a string")
    return value


def _python_names(message: str) -> str:
    """The command's words for the package's: '--mb-size' -> 'mb_size'."""
    message = message.replace("entropy-probe run:", "Checkpoint.run:")
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


class Checkpoint:
    """A Hugging Face checkpoint directory (config.json, model*.safetensors, optionally the PEFT adapter
    and optimizer.safetensors), loaded once in dtype "f32" or "f64"."""

    def __init__(self, path: Union[str, os.PathLike], dtype: str = "f32", device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise UsageError(f"Checkpoint: device must be 'cpu' or 'cuda', got {device!r}")
        if dtype not in ("f32", "f64"):
            raise UsageError(f"Checkpoint: dtype must be 'f32' or 'f64', got {dtype!r}")
        _sync_log_level()
        # device "cuda": a CUDA build of the package (has_cuda()) on a machine with a GPU, else an error
        self._core = _core._Checkpoint(os.fspath(path), dtype, device)
        self.path, self.dtype, self.device = os.fspath(path), dtype, device

    @property
    def model_type(self) -> str:
        return self._core.model_type

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    def run(self, E: Batch, U: Batch, **options: Any) -> dict:
        """The offline entropy probe on batches E and U (dicts or batch-file paths), with the options of
        `entropy-probe run` under their names with underscores (RUN_OPTIONS; docs/python.md): lr,
        weighting, mb_size, max_memory, variance, ground_truth, direction, is, clip_c, temperature,
        alpha_route; the flags influence, influence_matrix, control_variates (True/False); influence_truth=K,
        influence_truth_seq=[(prompt, completion), ...], lr_sweep=[eta, ...] (or "START:STOP:N");
        influence_csv / influence_matrix_csv (file names the CSVs are written to). Returns the result with
        the keys of `entropy-probe run --json`."""
        args = [self.path]
        for flag, batch, name in (("--e-batch", E, "E batch"), ("--u-batch", U, "U batch")):
            b = _to_core_batch(batch, name)
            args += [flag, b.name]
            if flag == "--e-batch":
                e_core = b
            else:
                u_core = b
        for key, value in options.items():
            if key not in RUN_OPTIONS:
                raise TypeError(f"Checkpoint.run: unknown option {key!r}; the options are {', '.join(RUN_OPTIONS)}")
            if key == "ground_truth" and value is None:
                value = "none"
            if value is None:
                continue
            if key in RUN_FLAGS:
                if not isinstance(value, (bool, np.bool_)):
                    raise UsageError(f"Checkpoint.run: {key} = {value!r}; expected True or False")
                if value:
                    args.append("--" + key.replace("_", "-"))
                continue
            args += ["--" + key.replace("_", "-"), _cli_option_value(key, value)]
        _sync_log_level()
        try:
            return json.loads(self._core.run(e_core, u_core, args))
        except UsageError as e:
            raise UsageError(_python_names(str(e))) from None

    def sample(self, prompts: Iterable[Iterable[int]], G: int, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, stop_tokens: Iterable[int] = (), seed: int = 0) -> dict:
        """G responses per prompt (lists of token ids) from the checkpoint's policy, reproducible from the
        seed, as a batch dict (prompt at positions [0, prompt_lens[b]), response after it, then padding;
        advantages zero: set them with grpo_advantages once the responses are scored). top_k (0: off), then
        top_p (1: off) on the renormalized rest, as transformers' generate; any stop token ends a response
        and is kept."""
        stop = [int(t) for t in stop_tokens]
        rows = [[int(t) for t in p] for p in prompts]
        _sync_log_level()
        return self._core.sample(rows, int(G), int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                                 stop, int(seed)).arrays()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, dtype={self.dtype!r}, device={self.device!r}: {self.model_type})"


def export_optimizer_state(optimizer: Any, peft_model: Any, path: Union[str, os.PathLike]) -> dict[str, str]:
    """Writes optimizer.safetensors for a PEFT model's Adam/AdamW state (needs torch and safetensors);
    see entropy_probe.optimizer_state and docs/checkpoints.md."""
    from .optimizer_state import export_optimizer_state as export

    return export(optimizer, peft_model, path)
