"""fastembed (ONNX Runtime, no torch) loads an `llm2emb export --onnx` folder from disk with
`TextEmbedding.add_custom_model(pooling=LAST_TOKEN / MEAN, normalization=True)` and gives llm2emb's vectors.

fastembed 0.9 requires huggingface-hub < 2 and transformers 5 (llm2emb) >= 2.4, so fastembed never enters
llm2emb's environment: the test builds a venv of its own under $LLM2EMB_HOME/fastembed-venv (`python -m venv`,
`pip install fastembed`, once; needs PyPI) and runs a small script there that reads the exported folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llm2emb import Embedder
from llm2emb.export import export_model
from llm2emb.model.loading import llm2emb_home

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FASTEMBED_SPEC = os.environ.get("LLM2EMB_FASTEMBED_SPEC", "fastembed>=0.9,<0.10")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "a", "今天天气很好，我们去公园散步吧。",
         "Embeddings map text to vectors that can be compared with a dot product."]

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType
    folder, pooling, dim, texts_file, out_file = sys.argv[1:]
    TextEmbedding.add_custom_model(model="local/llm2emb-export", pooling=PoolingType[pooling], normalization=True,
                                   sources=ModelSource(hf="local/llm2emb-export"), dim=int(dim),
                                   model_file="onnx/model.onnx")
    model = TextEmbedding("local/llm2emb-export", specific_model_path=folder)
    texts = json.load(open(texts_file, encoding="utf-8"))
    np.save(out_file, np.stack(list(model.embed(texts, batch_size=2))))
''')


def fastembed_python() -> Path:
    """The venv with fastembed (built on first use); skips when it cannot be built (no PyPI)."""
    venv = llm2emb_home() / "fastembed-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", FASTEMBED_SPEC], check=True,
                           capture_output=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"could not build a fastembed venv ({FASTEMBED_SPEC}): {getattr(exc, 'stderr', b'')[-300:]!r}")
        (venv / ".complete").write_text(FASTEMBED_SPEC)
    return python


@pytest.mark.slow
@pytest.mark.parametrize("pooling, bidirectional, side, fastembed_pooling", [
    ("eos", False, "left", "LAST_TOKEN"), ("mean", True, "right", "MEAN")])
def test_fastembed_loads_export(tiny_model, tmp_path, pooling, bidirectional, side, fastembed_pooling):
    python = fastembed_python()
    src = tmp_path / "src"
    Embedder.from_pretrained(str(tiny_model), pooling=pooling, bidirectional=bidirectional,
                             padding_side=side).save(src)
    out = tmp_path / "export"
    export_model(str(src), out, onnx=True)
    reference = Embedder.from_pretrained(str(out)).encode(TEXTS)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    script = tmp_path / "run_fastembed.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(script), str(out), fastembed_pooling, str(reference.shape[1]),
                           str(tmp_path / "texts.json"), str(tmp_path / "fastembed.npy")],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "fastembed.npy")
    cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.9999, cos
