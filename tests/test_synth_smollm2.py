"""The real generator: SmolLM2-135M-Instruct writes a few code-search queries (slow: a minute or two on CPU)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from llm2emb.synth import SynthOptions, synthesize
from llm2emb.synth.generators import build_generator
from llm2emb.synth.store import LOG_FILE, STATE_DIR

pytestmark = pytest.mark.slow


def test_smollm2_writes_queries_for_undocumented_stdlib_functions(tmp_path, smollm2_dir):
    generator = build_generator("transformers", "smollm2-135m")
    assert generator.uses_chat_template  # the Instruct model: prompts go through its chat template
    report = synthesize(SynthOptions(corpus="builtin:stdlib-undocumented", spec="builtin:stdlib-code",
                                     model="smollm2-135m", output=str(tmp_path / "out"), limit=4, batch_size=4,
                                     filters="length", progress=False), generator=generator)
    gen = report["generation"]
    assert gen["passages"] == 4 and gen["parsed"] >= 2   # a 135M model parses most replies within 3 attempts
    records = [r for line in (tmp_path / "out" / STATE_DIR / LOG_FILE).read_text().splitlines()
               for r in json.loads(line)["records"]]
    for r in records:
        assert r["reply"].startswith('{"query": "')
        if r["status"] == "ok":
            assert len(r["fields"]["query"]) > 3 and len(r["negatives"]) == 3
    frame = pd.read_parquet(tmp_path / "out" / "stdlib_synth.parquet")
    assert list(frame.columns) == ["query", "passage", "negative_1", "negative_2", "negative_3"]
    assert frame["passage"].str.contains("def ").all()
