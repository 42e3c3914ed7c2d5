#!/usr/bin/env python3
"""The peer's Python virtual environment: torch, transformers, peft, safetensors and numpy from PyPI.

    python3 tools/peer_venv.py [DIR] [--dry-run]

Makes DIR (`python3 -m venv DIR`, then `DIR/bin/python -m pip install ...`) unless DIR's python
already imports the packages, and prints that python's path on stdout. DIR: the argument, else
$ENTROPY_PROBE_PEER_VENV, else build/peer-venv. The goldens (tools/make_golden.py) and the
comparisons (bench/compare-all) run under it; the C++ build never needs it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PACKAGES = ["torch", "transformers", "peft", "safetensors", "numpy"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], dry: bool) -> None:
    _say("+ " + shlex.join(cmd))
    if not dry:
        r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.exit(f"peer venv: failed ({r.returncode}): {shlex.join(cmd)}")


def default_dir() -> str:
    return os.environ.get("ENTROPY_PROBE_PEER_VENV") or os.path.join(REPO, "build", "peer-venv")


def peer_python(venv: str, dry: bool = False) -> str:
    """The venv's python, made (venv + pip install from PyPI) unless it imports the peer already."""
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import " + ", ".join(PEER_PACKAGES)]
    if os.access(py, os.X_OK) and subprocess.run(probe, capture_output=True).returncode == 0:
        _say(f"peer venv {venv}: reused (imports {', '.join(PEER_PACKAGES)})")
        return py
    if not os.access(py, os.X_OK):
        if os.path.exists(venv) and os.listdir(venv):
            sys.exit(f"peer venv {venv}: exists but has no bin/python; remove it or name another")
        _say(f"peer venv {venv}: making it")
        _run([sys.executable, "-m", "venv", venv], dry)
    else:
        _say(f"peer venv {venv}: its python does not import {', '.join(PEER_PACKAGES)}; installing")
    _say(f"installing from PyPI: {' '.join(PEER_PACKAGES)} (torch's Linux wheel is several GB)")
    _run([py, "-m", "pip", "install", "--upgrade", "pip"], dry)
    _run([py, "-m", "pip", "install"] + PEER_PACKAGES, dry)
    if not dry and subprocess.run(probe).returncode != 0:
        sys.exit(f"peer venv {venv}: {py} still does not import {', '.join(PEER_PACKAGES)} after pip install")
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help="the venv (default $ENTROPY_PROBE_PEER_VENV, else build/peer-venv)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = ap.parse_args()
    print(peer_python(os.path.abspath(args.dir or default_dir()), args.dry_run))


if __name__ == "__main__":
    main()
