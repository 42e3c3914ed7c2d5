"""Bad input is a Python exception carrying the library's message, naming the file (or batch) and key."""
import json
import shutil
import struct

import numpy as np
import pytest

import entropy_probe as ep
from conftest import GOLDEN

D = GOLDEN / "gpt2_lora"


@pytest.fixture(scope="module")
def ckpt():
    return ep.Checkpoint(D, dtype="f64")


def write_safetensors(path, tensors):
    """A minimal safetensors writer (the package's tests need no torch): name -> (dtype, shape, bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_exception_hierarchy():
    assert issubclass(ep.InputError, ValueError) and issubclass(ep.InputError, ep.Error)
    assert issubclass(ep.UsageError, ValueError) and issubclass(ep.Error, RuntimeError)


def test_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(ep.InputError, match=str(tmp_path / "nothing")):
        ep.Checkpoint(tmp_path / "nothing")


def test_bad_checkpoint_config_names_the_file(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(D, d)
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ep.InputError, match=r"config\.json"):
        ep.Checkpoint(d)


def test_batch_file_missing_a_key_names_file_and_key(ckpt, tmp_path):
    f = tmp_path / "E.safetensors"
    write_safetensors(f, {"sequences": ("I64", [1, 1, 2], struct.pack("<2q", 1, 2))})
    with pytest.raises(ep.InputError, match=rf"{f}: missing tensor 'attention_mask'"):
        ckpt.run(f, D / "U.safetensors")
    with pytest.raises(ep.InputError, match=str(f)):
        ep.load_batch(f)


def test_not_a_batch_file(tmp_path):
    f = tmp_path / "E.safetensors"
    f.write_bytes(b"not safetensors")
    with pytest.raises(ep.InputError, match=str(f)):
        ep.load_batch(f)
    with pytest.raises(ep.InputError, match=str(tmp_path / "absent.safetensors")):
        ep.load_batch(tmp_path / "absent.safetensors")


def test_token_outside_the_vocabulary_names_file_and_index(ckpt, tmp_path):
    E = ep.load_batch(D / "E.safetensors")
    E["sequences"][1, 0, 0] = ckpt.vocab_size
    f = tmp_path / "E_bad.safetensors"
    ep.save_batch(E, f)
    with pytest.raises(ep.InputError, match=rf"{f}: sequences\[1,0,0\] = {ckpt.vocab_size} "):
        ckpt.run(f, D / "U.safetensors")
    with pytest.raises(ep.InputError, match=r"^E batch: sequences\[1,0,0\]"):
        ckpt.run(E, D / "U.safetensors")


def test_bad_batch_dicts(ckpt):
    E = ep.load_batch(D / "E.safetensors")
    cases = [
        ({**E, "sequences": E["sequences"].astype(float)}, "'sequences' has dtype float64"),
        ({**E, "advantages": E["advantages"][:, :1]}, r"'advantages' has shape \[\d+, 1\], expected \[B, G\]"),
        ({**E, "attention_mask": E["attention_mask"] * 2}, r"attention_mask\[0,0,2\] = 2 is not 0 or 1"),
        ({k: v for k, v in E.items() if k != "prompt_lens"}, "missing 'prompt_lens'"),
        ({**E, "labels": E["advantages"]}, r"unknown key\(s\) \['labels'\]"),
        ({**E, "advantages": np.full_like(E["advantages"], np.nan)}, r"advantages\[0,0\] = nan is not finite"),
        ({**E, "sequences": E["sequences"] + 2**31}, r"sequences\[0,0,0\] = \d+ is outside the int32 range"),
    ]
    for batch, message in cases:
        with pytest.raises(ep.InputError, match="^E batch: " + message):
            ckpt.run(batch, D / "U.safetensors")


def test_bad_options(ckpt):
    E, U = D / "E.safetensors", D / "U.safetensors"
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        ckpt.run(E, U, learning_rate=0.1)
    with pytest.raises(ep.UsageError, match="weighting must be one of dr_grpo, per_token_avg, got 'mean'"):
        ckpt.run(E, U, weighting="mean")
    with pytest.raises(ep.UsageError, match="lr must be positive"):
        ckpt.run(E, U, lr=-1.0)
    with pytest.raises(ep.UsageError, match="mb_size"):
        ckpt.run(E, U, mb_size=1.5)
    with pytest.raises(ep.UsageError, match="control_variates = 'yes'; expected True or False"):
        ckpt.run(E, U, control_variates="yes")
    if ep.has_cuda():  # a CUDA build: runs on a GPU, or says that none was found
        try:
            assert ep.Checkpoint(D, device="cuda").device == "cuda"
        except ep.Error as e:
            assert "Checkpoint: device 'cuda': no CUDA device found" in str(e)
    else:
        with pytest.raises(ep.UsageError, match="no CUDA support"):
            ep.Checkpoint(D, device="cuda")
    with pytest.raises(ep.UsageError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        ep.Checkpoint(D, device="gpu")
    with pytest.raises(ep.UsageError, match="dtype must be 'f32' or 'f64'"):
        ep.Checkpoint(D, dtype="bf16")
