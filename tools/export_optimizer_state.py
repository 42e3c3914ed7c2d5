#!/usr/bin/env python3
"""Export a PyTorch Adam/AdamW optimizer state of a PEFT model to entropy_probe's
``optimizer.safetensors``: a thin entry point for
``python/entropy_probe/optimizer_state.py`` (``entropy_probe.export_optimizer_state``
in the Python package), usable without installing the package:

    python tools/export_optimizer_state.py --adapter CHECKPOINT_DIR [--base-model BASE_DIR] \\
        [--optimizer CHECKPOINT_DIR/optimizer.pt] [--out CHECKPOINT_DIR/optimizer.safetensors]

or, with tools/ on sys.path, ``from export_optimizer_state import export_optimizer_state``.
"""
import importlib.util
import os
import sys

# The module file itself, not the package: importing `entropy_probe` would
# need its compiled extension, which an uninstalled checkout does not have.
_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python", "entropy_probe",
                     "optimizer_state.py")
_spec = importlib.util.spec_from_file_location("entropy_probe_optimizer_state", _path)
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)

from entropy_probe_optimizer_state import *  # noqa: E402,F401,F403  (export_optimizer_state, registry_names, ...)
from entropy_probe_optimizer_state import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
