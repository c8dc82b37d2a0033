"""Slow end-to-end evaluation with the real SmolLM2-135M (run in CI): the issue's acceptance command (with
mean pooling and max length 128 to keep it to one corpus pass), the cache across runs and processes'
ways of loading the same model, and the mteb adapter's equality with the local evaluator on a real model."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embedding-cache")


def test_issue_command_writes_results(smollm2_dir, shared_data, shared_cache, tmp_path):
    from llm2emb.cli import main

    eval_dir = shared_data / "eval"
    out = tmp_path / "results"
    argv = ["eval", "--model", "smollm2-135m", "--pooling", "mean", "--max-length", str(MAX_LENGTH),
            "--tasks", f"{eval_dir / 'scifact_mini'},{eval_dir / 'stsb_en' / 'dev.tsv'}", "--limits", "100",
            "--output", str(out), "--cache-dir", str(shared_cache), "--no-progress"]
    assert main(argv) == 0
    retrieval = json.loads((out / "scifact_mini__smollm2-135m-mean.json").read_text())
    assert retrieval["info"]["n_queries"] == 100 and retrieval["info"]["n_docs"] == 1000
    assert retrieval["model"]["pooling"] == "mean" and retrieval["limits"] == 100
    assert retrieval["metrics"]["ndcg_at_10"] > 0.1  # untrained mean pooling: ~0.2 (eos pooling is near 0)
    sts = json.loads((out / "stsb_en-dev__smollm2-135m-mean.json").read_text())
    assert sts["info"]["n_pairs"] == 1500 and sts["metrics"]["cosine_spearman"] > 0.3  # ~0.54 untrained
    # the second run reads the corpus from the cache and gives the same numbers
    assert main(argv) == 0
    again = json.loads((out / "scifact_mini__smollm2-135m-mean.json").read_text())
    assert again["info"]["corpus_from_cache"] is True and again["metrics"] == retrieval["metrics"]


def test_mteb_adapter_equals_local_evaluator_real_model(smollm2_dir, shared_data, shared_cache):
    from llm2emb import Embedder
    from llm2emb.eval.mteb_adapter import LocalRetrievalTask, run_mteb_task
    from llm2emb.eval.retrieval import run_retrieval

    folder = shared_data / "eval" / "scifact_mini"
    emb = Embedder.from_pretrained("smollm2-135m", pooling="mean", max_length=MAX_LENGTH)
    local = run_retrieval(emb, folder, limits=50, cache=shared_cache, show_progress=False)
    via_mteb = run_mteb_task(emb, LocalRetrievalTask(folder, limits=50), cache=shared_cache, show_progress=False)
    assert local.metrics["ndcg_at_10"] > 0.1
    for key in ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_100", "precision_at_10"):
        assert abs(local.metrics[key] - via_mteb["metrics"][key]) <= 1e-6, key
