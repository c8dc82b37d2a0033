"""End-to-end on the real SmolLM2-135M through its built-in alias (slow: runs in CI)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llm2emb import Embedder

pytestmark = pytest.mark.slow


def test_alias_encodes_english_and_chinese(smollm2_dir):
    emb = Embedder.from_pretrained("smollm2-135m", pooling="mean")
    vecs = emb.encode(["你好", "hello", "The cat sits on the mat.", "猫坐在垫子上。"])
    assert vecs.shape == (4, 576) and np.isfinite(vecs).all()
    sims = vecs @ vecs.T
    assert sims[2, 3] < 0.9999 and sims[0, 1] < 0.9999


def test_models_cli(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "llm2emb.cli", "models", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "smollm2-135m" in out.stdout and "true" in out.stdout
    again = subprocess.run([sys.executable, "-m", "llm2emb.cli", "models", "download", "smollm2-135m"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == str(smollm2_dir)
    bad = subprocess.run([sys.executable, "-m", "llm2emb.cli", "models", "download", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "Unknown built-in model" in bad.stderr
