"""Checkpoint.run against `entropy-probe run --json` on the golden checkpoints, in double."""
import json
import logging
import subprocess

import numpy as np
import pytest

import entropy_probe as ep
from conftest import CHECKPOINTS, GOLDEN, eight_prompt_batch

# Both run the same code (examples/cli/run_typed.hpp), compiled separately:
# agreement to 1e-12 relative (measured: bit for bit).
REL = 1e-12
# Without the program: the committed float64 PyTorch values, at the parity
# test's double tolerance (tests/parity/test_parity.cpp).
GOLDEN_REL = 1e-9

OPTION_SETS = [
    {"ground_truth": "adam"},
    {"ground_truth": "precond_sgd", "weighting": "per_token_avg", "temperature": 0.7, "mb_size": 1},
    {"control_variates": True},
]


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(b), 1e-300)


def assert_same(got, want, path=""):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys differ"
        for k in want:
            if path == "" and k == "timing":
                continue
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert close(got, want, REL), f"{path}: {got!r} vs {want!r}"
    else:
        assert got == want, f"{path}: {got!r} vs {want!r}"


def cli_args(options):
    out = []
    for k, v in options.items():
        if isinstance(v, bool):  # a flag
            out += ["--" + k.replace("_", "-")] if v else []
            continue
        if k == "influence_truth_seq":  # [(prompt, completion), ...] -> U:G,U:G
            v = ",".join(f"{u}:{g}" for u, g in v)
        elif k == "lr_sweep":
            v = ",".join(repr(x) for x in v)
        out += ["--" + k.replace("_", "-"), repr(v) if isinstance(v, float) else str(v)]
    return out


def assert_equals_cli(ckpt, name, options, cli, tmp_path, e_batch=None):
    """Checkpoint.run and `entropy-probe run --json` with the same options give the same result."""
    d = GOLDEN / name
    e_batch = str(e_batch or d / "E.safetensors")
    got = ckpt.run(e_batch, str(d / "U.safetensors"), **options)
    if cli is None:
        pytest.skip("no entropy-probe program (ENTROPY_PROBE_CLI): see test_run_equals_golden")
    out = tmp_path / "cli.json"
    subprocess.run([cli, "run", str(d), "--e-batch", e_batch, "--u-batch", str(d / "U.safetensors"), "--dtype",
                    "f64", "--json", str(out)] + cli_args(options),
                   check=True, capture_output=True)
    assert_same(got, json.loads(out.read_text()))
    return got


@pytest.fixture(scope="module")
def checkpoints():
    return {name: ep.Checkpoint(GOLDEN / name, dtype="f64") for name in CHECKPOINTS}


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=["adam", "precond_sgd_per_token_tau_mb", "control_variates"])
def test_run_equals_cli(name, options, checkpoints, cli, tmp_path):
    assert_equals_cli(checkpoints[name], name, options, cli, tmp_path)


# Every option issue 18 added, in one run (test_science_options.py checks what each one adds).
SCIENCE_OPTIONS = {
    "direction": "both",
    "influence": True,
    "influence_matrix": True,
    "influence_truth": 2,
    "influence_truth_seq": [(0, 1), (1, 0)],
    "lr_sweep": [1e-4, 3e-4],
    "control_variates": True,
    "ground_truth": "adam",
}


@pytest.mark.parametrize("name", ["gpt2_lora", "qwen2_lora"])
def test_science_options_equal_cli(name, checkpoints, cli, tmp_path):
    e_batch = tmp_path / "E8.safetensors"
    ep.save_batch(eight_prompt_batch(checkpoints[name]), e_batch)
    got = assert_equals_cli(checkpoints[name], name, SCIENCE_OPTIONS, cli, tmp_path, e_batch)
    for key in ("directions", "influence", "influence_matrix", "control_variates", "lr_sweep"):
        assert key in got, key


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_run_equals_golden(name, checkpoints):
    d = GOLDEN / name
    g = json.loads((d / "golden.json").read_text())
    for v in g["variants"]:
        c = v["config"]
        for kind, truth in v["ground_truth"].items():
            r = checkpoints[name].run(str(d / "E.safetensors"), str(d / "U.safetensors"), weighting=c["weighting"],
                                      temperature=c["temperature"], variance=c["variance"], ground_truth=kind)
            for k in ("deltaH1", "bars_dot", "mu_X_norm", "mu_Y_norm", "SE_conditional", "V_X", "V_Y",
                      "SE_deltaH1"):
                assert close(r[k], v[k], GOLDEN_REL), (k, r[k], v[k])
            assert np.allclose(r["s_values"], v["s_values"], rtol=GOLDEN_REL, atol=0)
            for k, want in truth.items():
                assert close(r[k], want, GOLDEN_REL), (kind, k, r[k], want)
            assert (r["B_E"], r["B_U"]) == (v["B_E"], v["B_U"])
            # The same parameters; the registry lists them in the model's declaration order, PyTorch in its own.
            assert sorted(r["registry"]["names"]) == sorted(g["registry"]["names"])


class DLPackOnly:
    """An array that offers nothing but the DLPack protocol (as a torch CPU tensor does)."""

    def __init__(self, a):
        self._a = np.asarray(a)

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_batch_dicts_and_dlpack_equal_files(checkpoints):
    d = GOLDEN / "gpt2_lora"
    ckpt = checkpoints["gpt2_lora"]
    from_files = ckpt.run(str(d / "E.safetensors"), str(d / "U.safetensors"), ground_truth="adam")
    E = ep.load_batch(d / "E.safetensors")
    U = {k: DLPackOnly(v) for k, v in ep.load_batch(d / "U.safetensors").items()}
    from_dicts = ckpt.run(E, U, ground_truth="adam")
    assert from_dicts["config"]["e_batch"] == "E batch"
    for k in ("deltaH1", "SE_deltaH1", "SE_conditional", "deltaH_true_tok", "ESS"):
        assert from_dicts[k] == from_files[k], k


def test_progress_goes_to_logging(checkpoints, caplog):
    d = GOLDEN / "qwen2_lora"
    with caplog.at_level(logging.INFO, logger="entropy_probe"):
        checkpoints["qwen2_lora"].run(str(d / "E.safetensors"), str(d / "U.safetensors"))
    messages = [r.getMessage() for r in caplog.records if r.name == "entropy_probe"]
    assert any(m.startswith("[probe] ") and "prompts" in m for m in messages), messages


def test_f32_runs_and_is_close_to_f64(checkpoints):
    d = GOLDEN / "qwen2_lora"
    r32 = ep.Checkpoint(d).run(str(d / "E.safetensors"), str(d / "U.safetensors"))
    r64 = checkpoints["qwen2_lora"].run(str(d / "E.safetensors"), str(d / "U.safetensors"))
    assert r32["config"]["dtype"] == "f32"
    assert close(r32["deltaH1"], r64["deltaH1"], 1e-3)
