"""Checkpoint.run's options of issue 18 (direction, influence, influence_matrix, influence_truth[_seq],
lr_sweep, control_variates): each reaches the result, and bad values raise naming the option."""
import csv
import re

import numpy as np
import pytest

import entropy_probe as ep
from conftest import GOLDEN, eight_prompt_batch

D = GOLDEN / "gpt2_lora"
E, U = D / "E.safetensors", D / "U.safetensors"
RATES = [1e-4, 3e-4]
PICKED = [(0, 1), (1, 0)]


def close(a, b, rel=1e-12, scale=None):
    return abs(a - b) <= rel * max(abs(b), scale or 0.0, 1e-300)


@pytest.fixture(scope="module")
def ckpt():
    return ep.Checkpoint(D, dtype="f64")


@pytest.fixture(scope="module")
def result(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv")
    r = ckpt.run(eight_prompt_batch(ckpt), U, direction="both", influence=True, influence_matrix=True, influence_truth=2,
                 influence_truth_seq=PICKED, lr_sweep=RATES, control_variates=True,
                 influence_csv=out / "influence.csv", influence_matrix_csv=out / "matrix.csv")
    return r, out


def test_directions(result):
    r, _ = result
    assert set(r["directions"]) == {"precond_sgd", "adamw"}
    assert r["config"]["directions"] == ["precond_sgd", "adamw"]
    assert r["deltaH1"] == r["directions"]["precond_sgd"]["deltaH1"]  # the first direction's
    adamw = r["directions"]["adamw"]
    assert {"deltaH1", "momentum_share", "decay_share"} <= set(adamw)


def test_influences_sum_to_the_adamw_deltaH1(result):
    r, _ = result
    inf = r["influence"]
    B, G = r["B_U"], len(inf) // r["B_U"]
    assert r["influence_direction"] == "adamw"  # adamw when it is computed
    assert [(s["prompt"], s["completion"]) for s in inf] == [(u, g) for u in range(B) for g in range(G)]
    for s in inf:
        assert {"advantage", "length", "influence"} <= set(s)
    a = r["directions"]["adamw"]
    total = sum(s["influence"] for s in inf) + a["momentum_share"] + a["decay_share"]
    scale = max(abs(s["influence"]) for s in inf)
    assert close(total, a["deltaH1"], 1e-12, scale), (total, a["deltaH1"])


def test_influence_matrix_columns_sum_to_the_influences(result):
    r, _ = result
    m = r["influence_matrix"]
    assert m["direction"] == "adamw"
    values = np.array(m["values"])
    assert values.shape == (len(m["rows"]), len(m["columns"]))
    inf = {(s["prompt"], s["completion"]): s["influence"] for s in r["influence"]}
    scale = max(abs(x) for x in inf.values())
    worst = 0.0
    for j, c in enumerate(m["columns"]):
        want = inf[(c["prompt"], c["completion"])]
        worst = max(worst, abs(values[:, j].sum() - want) / scale)
    assert worst <= 1e-12, worst
    a = r["directions"]["adamw"]
    assert close(sum(m["momentum"]), a["momentum_share"], 1e-12, scale)
    assert close(sum(m["decay"]), a["decay_share"], 1e-12, scale)


def test_influence_truth_for_the_largest_and_the_listed(result):
    r, _ = result
    inf = r["influence"]
    with_truth = {(s["prompt"], s["completion"]) for s in inf if "truth" in s}
    largest = sorted(inf, key=lambda s: -abs(s["influence"]))[:2]
    assert with_truth == {(s["prompt"], s["completion"]) for s in largest} | set(PICKED)
    for s in inf:
        if "truth" in s:
            assert {"deltaH", "SE", "deltaH_tok", "ESS"} <= set(s["truth"])
    assert r["config"]["influence_truth"]["largest"] == 2


def test_lr_sweep_along_every_direction(result):
    r, _ = result
    assert r["config"]["lr_sweep"] == RATES
    points = [(p["direction"], p["learning_rate"]) for p in r["lr_sweep"]]
    assert points == [(d, eta) for d in ("precond_sgd", "adamw") for eta in RATES]
    for p in r["lr_sweep"]:
        # deltaH1 is linear in eta along a fixed direction
        assert close(p["deltaH1"], p["learning_rate"] * r["directions"][p["direction"]]["deltaH1"] /
                     r["learning_rate"], 1e-12)
        assert {"deltaH_true", "deltaH_true_tok", "SE_deltaH_true", "ESS"} <= set(p)


def test_control_variates(result):
    r, _ = result
    cv = r["control_variates"]
    assert set(cv) == {"features", "deltaH1", "SE", "deltaH1_plain", "SE_plain", "beta"}
    assert r["config"]["control_variates"] is True
    # The plain estimate is the probe's deltaH1 along precond_sgd.
    assert close(cv["deltaH1_plain"], r["directions"]["precond_sgd"]["deltaH1"], 1e-12)


def test_csv_files_hold_the_result(result):
    r, out = result
    with open(out / "influence.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(x["prompt"]), int(x["completion"]), float(x["influence"])) for x in rows] == \
        [(s["prompt"], s["completion"], s["influence"]) for s in r["influence"]]
    with open(out / "matrix.csv") as f:
        lines = list(csv.reader(f))
    assert len(lines) == 1 + len(r["influence_matrix"]["rows"])
    assert [float(x) for x in lines[1][2:2 + len(r["influence_matrix"]["columns"])]] == \
        r["influence_matrix"]["values"][0]


def test_flags_off_leave_the_keys_out(ckpt):
    r = ckpt.run(E, U, variance="none", influence=False, influence_matrix=False, control_variates=False)
    for key in ("influence", "influence_matrix", "control_variates", "lr_sweep"):
        assert key not in r, key


def test_influence_truth_seq_accepts_numpy_pairs(ckpt):
    r = ckpt.run(E, U, variance="none", influence_truth_seq=np.array([[1, 1]]))
    assert [(s["prompt"], s["completion"]) for s in r["influence"] if "truth" in s] == [(1, 1)]


BAD = [
    ({"direction": "sideways"}, "direction must be one of precond_sgd, adamw, both, got 'sideways'"),
    ({"influence": "yes"}, "influence = 'yes'; expected True or False"),
    ({"influence_matrix": 1}, "influence_matrix = 1; expected True or False"),
    ({"control_variates": "yes"}, "control_variates = 'yes'; expected True or False"),
    ({"influence_truth": 0}, "influence_truth expects a count of at least 1, got '0'"),
    ({"influence_truth": 1.5}, "influence_truth = 1.5; expected an integer count K"),
    ({"influence_truth": True}, "influence_truth = True; expected an integer count K"),
    ({"influence_truth": 10**6}, r"influence_truth\.largest \(influence_truth\) = 1000000 must be between"),
    ({"influence_truth_seq": [(0,)]}, r"influence_truth_seq = \[\(0,\)\]; expected a non-empty list"),
    ({"influence_truth_seq": []}, r"influence_truth_seq = \[\]; expected a non-empty list"),
    ({"influence_truth_seq": "0:1"}, "influence_truth_seq = '0:1'; expected a non-empty list"),
    ({"influence_truth_seq": [(99, 0)]}, r"\(influence_truth_seq\) 99:0 is outside the U batch"),
    ({"influence_truth_seq": [(0, 0), (0, 0)]}, r"\(influence_truth_seq\) lists 0:0 twice"),
    ({"influence_truth_seq": [(-1, 0)]}, "influence_truth_seq expects U:G,U:G,... .*got '-1:0'"),
    ({"lr_sweep": [1e-3, -1.0]}, r"lr_sweep expects a list .*'-1\.0' is not a positive number"),
    ({"lr_sweep": ["a"]}, r"lr_sweep = \['a'\]; expected a non-empty list of learning rates"),
    ({"lr_sweep": []}, r"lr_sweep = \[\]; expected a non-empty list of learning rates"),
    ({"lr_sweep": "1e-3:1e-2:1"}, "lr_sweep expects a list"),
    ({"max_memory": "lots"}, "max_memory expects a size in bytes .* got 'lots'"),
    ({"max_memory": 1.5}, r"max_memory = 1\.5; expected a number of bytes"),
    ({"influence_csv": 3}, "influence_csv = 3; expected a file name"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[next(iter(o)) + f"-{i}" for i, (o, _) in enumerate(BAD)])
def test_bad_values_raise_naming_the_option(ckpt, options, message):
    with pytest.raises(ep.UsageError, match=message):
        ckpt.run(E, U, variance="none", **options)


def test_csv_in_a_missing_directory_names_it(ckpt, tmp_path):
    f = tmp_path / "absent" / "influence.csv"
    message = f"Checkpoint.run: influence_csv {f}: the directory '{tmp_path / 'absent'}' does not exist"
    with pytest.raises(ep.UsageError, match=re.escape(message)):
        ckpt.run(E, U, influence_csv=f)
