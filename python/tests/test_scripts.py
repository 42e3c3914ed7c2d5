"""The example and the exporter's entry point compile; the example runs on a golden checkpoint with a stand-in
for transformers' tokenizer (the exporter needs torch)."""
import os
import py_compile
import subprocess
import sys

import pytest

from conftest import GOLDEN, ROOT


@pytest.mark.parametrize("path", ["examples/python/offline_probe.py", "tools/export_optimizer_state.py",
                                  "python/entropy_probe/optimizer_state.py"])
def test_compiles(path, tmp_path):
    py_compile.compile(str(ROOT / path), cfile=str(tmp_path / "out.pyc"), doraise=True)


# A stand-in for transformers.AutoTokenizer: the last 3 words of a text as token ids (the golden checkpoints
# have 32 positions), and token ids decoded as words that include the capitals, so the rewards vary.
FAKE_TRANSFORMERS = """
WORDS = ["Paris", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Nairobi", "Ottawa", "the", "a", "city", "is"]


class _Tokenizer:
    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [sum(map(ord, w)) % 50 for w in text.split()][-3:]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(WORDS[int(i) % len(WORDS)] for i in ids)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name):
        return _Tokenizer()
"""


def test_example_runs(tmp_path):
    (tmp_path / "transformers.py").write_text(FAKE_TRANSFORMERS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "examples/python/offline_probe.py"), str(GOLDEN / "gpt2_lora")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("predicted entropy change: ") and "with control variates" in lines[0], lines
    assert lines[1].startswith("true entropy change (one Adam step): "), lines
    assert lines[2].startswith("top samples (momentum "), lines
    assert len([line for line in lines[3:] if line.startswith("  prompt ")]) == 5, lines
