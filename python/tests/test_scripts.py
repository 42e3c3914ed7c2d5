"""The example and the exporter's entry point compile (running them needs torch and a tokenizer)."""
import py_compile

import pytest

from conftest import ROOT


@pytest.mark.parametrize("path", ["examples/python/offline_probe.py", "tools/export_optimizer_state.py",
                                  "python/entropy_probe/optimizer_state.py"])
def test_compiles(path, tmp_path):
    py_compile.compile(str(ROOT / path), cfile=str(tmp_path / "out.pyc"), doraise=True)
