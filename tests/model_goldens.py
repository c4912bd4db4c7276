"""Access to the model parity goldens that tests/goldens/make_model_goldens.py writes (from HF transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

GOLDENS = Path(__file__).parent / "goldens"
TINY_LLAMA_DIR = GOLDENS / "tiny_llama"


def load_model_golden(name: str) -> dict[str, np.ndarray]:
    """A golden .npz as a dict. Missing is a failure, never a skip: CI must not pass without the peer's numbers."""
    path = GOLDENS / name
    if not path.is_file():
        pytest.fail(f"missing golden {path}: regenerate with `.venv/bin/python tests/goldens/make_model_goldens.py`")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
