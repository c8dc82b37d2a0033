"""Offline demo data: the standard-library code-search task (train in F2LLM raw layout, eval in BEIR)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from llm2emb.data import builtin


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib")
    return out, builtin.build_stdlib_codesearch(out)


def test_sizes_and_layout(built):
    out, info = built
    assert 1500 <= info["train_rows"] <= 3000
    assert 300 <= info["eval_queries"] <= builtin.MAX_EVAL_QUERIES
    train = pd.read_parquet(out / "train" / "stdlib_code.parquet")
    assert len(train) == info["train_rows"]
    k = builtin.NUM_NEGATIVES
    assert list(train.columns) == ["query", "passage", *[f"negative_{j}" for j in range(1, k + 1)]]
    for _, row in train.head(200).iterrows():
        negatives = {row[f"negative_{j}"] for j in range(1, k + 1)}
        assert row["passage"] not in negatives and len(negatives) == k
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest == {"stdlib_code": {"type": "retrieval", "instruction": builtin.INSTRUCTION}}


def test_queries_are_docstrings_and_passages_have_no_docstring(built):
    out, _ = built
    train = pd.read_parquet(out / "train" / "stdlib_code.parquet")
    row = train.iloc[0]
    assert row["passage"].lstrip().startswith(("def ", "async def ", "@"))
    assert row["query"] not in row["passage"]
    assert train["query"].is_unique and train["passage"].is_unique


def test_beir_eval_is_consistent_and_disjoint_from_train(built):
    out, info = built
    folder = out / "eval" / "stdlib_code"
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    qrels = (folder / "qrels" / "test.tsv").read_text().splitlines()
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    doc_ids, query_ids = {d["_id"] for d in corpus}, {q["_id"] for q in queries}
    assert len(queries) == info["eval_queries"] == len(qrels) - 1
    for line in qrels[1:]:
        qid, did, score = line.split("\t")
        assert qid in query_ids and did in doc_ids and score == "1"
    train = pd.read_parquet(out / "train" / "stdlib_code.parquet")
    assert not {d["text"] for d in corpus} & set(train["passage"])
    # split by top-level package: no package on both sides
    train_packages = {f.package for f in builtin.split_functions(builtin.extract_functions())[0]}
    eval_packages = {q["_id"][2:].split(".")[0] for q in queries}
    assert not train_packages & eval_packages


def test_rebuild_is_reused_and_deterministic(built, tmp_path):
    out, info = built
    assert builtin.build_stdlib_codesearch(out) == info  # same settings: the saved data is reused
    functions = builtin.extract_functions()
    assert functions == builtin.parse_functions(builtin.stdlib_dir())  # a fresh parse gives the same
    train, evaluation = builtin.split_functions(functions)
    assert [f.query for f in train] == pd.read_parquet(out / "train" / "stdlib_code.parquet")["query"].tolist()
    assert len(evaluation) == info["eval_queries"]


def test_prepared_demo_data_trains_through_the_batcher(built, tmp_path, smollm2_dir):
    from llm2emb.data.batching import MultiTaskBatcher
    from llm2emb.data.tokenize import prepare

    out, _ = built
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.read_parquet(out / "train" / "stdlib_code.parquet").head(64).to_parquet(raw / "stdlib_code.parquet")
    (raw / "manifest.json").write_text((out / "train" / "manifest.json").read_text())
    prepare(str(smollm2_dir), raw, tmp_path / "tok", max_seq_length=160, workers=1, progress=False)
    batcher = MultiTaskBatcher(tmp_path / "tok", batch_size=16, num_hard_neg=1)
    batch = next(iter(batcher))
    assert batch.dataset == "stdlib_code" and batch.num_negatives == 1 and batch.use_inbatch
    assert all(p > 0 for p in batch.query_prefix_lengths)  # the instruction ends with the separator
