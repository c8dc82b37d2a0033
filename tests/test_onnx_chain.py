"""The whole ONNX chain on a trained run, through the CLI: train a LoRA run for 2 steps (eos pooling / causal and
mean pooling / bidirectional), `llm2emb export --merge-lora --onnx --onnx-int8 auto`, then `llm2emb eval
--no-cache` of the export with the torch backend, the ONNX fp32 graph and the ONNX int8 graph: the fp32 graph
gives the torch scores (within 1e-4), the int8 graph loads and scores. Tiny random models; the same chain on
SmolLM2-135M with real data is `bench/onnx_trained_runs.py` (numbers in docs/serving.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2emb.cli import main
from llm2emb.config import load_train_config
from llm2emb.export import backends
from test_train_support import prepare_data, quick_overrides, write_raw_data

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: ONNX fp32 vs torch fp32 scores of the same export (cosine >= 0.9999 per vector; ranking ties aside)
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tasks")
    sts = root / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat sleeps\ta kitten naps\t4.5\na dog barks\ta car drives\t0.5\n"
                   "the sun rises\tthe moon sets\t2.0\nred apple\tgreen apple\t3.0\nsearch code\tfind functions\t3.5\n")
    beir = root / "mini"
    (beir / "qrels").mkdir(parents=True)
    docs = ["cats purr on the sofa", "dogs bark at night", "cars drive on roads", "fish swim in the sea",
            "birds fly south in winter", "the parser reads json files"]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    queries = ["a cat", "a dog", "a car", "a fish", "a bird", "read json"]
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(queries)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(queries))))
    return f"{sts},{beir}"


def scores(output: Path) -> dict[str, float]:
    """{task name: main score} of every result file `llm2emb eval --output` wrote."""
    found = {}
    for path in output.rglob("*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "main_score" in record:
            found[record["task"]["name"].rsplit("/", 1)[-1]] = record["metrics"][record["main_score"]]
    return found


@pytest.mark.parametrize("pooling, bidirectional", [("eos", False), ("mean", True)])
def test_trained_run_exports_to_onnx_and_evaluates_the_same(tiny_model, prepared, tasks, tmp_path, pooling,
                                                           bidirectional):
    from llm2emb.train import train

    overrides = quick_overrides(tiny_model, prepared, tmp_path, steps=2, checkpointing_steps=0, validation_steps=0,
                                validation_fraction=0.0, pooling_mode=pooling, bi_attn_enabled=bidirectional,
                                lora_enabled=True, lora_r=4, lora_alpha=8, skip_instruction=False)
    cfg = load_train_config(None, overrides)
    train(cfg, show_progress=False)
    out = tmp_path / "export"
    assert main(["export", "--model", str(cfg.run_dir), "--output", str(out), "--merge-lora",
                 "--onnx-int8", "auto"]) == 0
    int8 = backends.int8_file(backends.resolve_int8_config("auto"))
    assert (out / "onnx" / "model.onnx").is_file() and (out / int8).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config.get("is_causal", True) is (not bidirectional)

    got = {}
    for name, extra in (("torch", ["--precision", "fp32"]), ("onnx", ["--backend", "onnx"]),
                        ("int8", ["--backend", "onnx", "--onnx-file", int8])):
        assert main(["eval", "--model", str(out), "--tasks", tasks, "--no-cache", "--no-progress",
                     "--output", str(tmp_path / name), *extra]) == 0
        got[name] = scores(tmp_path / name)
    assert set(got["torch"]) == {"sts", "mini"}
    for task, value in got["torch"].items():
        assert got["onnx"][task] == pytest.approx(value, abs=SCORE_TOLERANCE), task
        assert -1 <= got["int8"][task] <= 1
