"""Hard-negative mining: exclusions, skip-top, thresholds, random fill, folders and the `mine` command."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from llm2emb.cli import main
from llm2emb.data.mining import BM25Scorer, MiningSettings, lexical_tokens, mine_negatives
from llm2emb.errors import UserError

TOPICS = ["apple banana fruit", "river water boat", "piano music song", "football goal team", "rocket space moon",
          "bread oven bake", "snow winter cold", "train rail station", "garden flower seed", "doctor clinic health"]


def _pairs(n_per_topic: int = 6) -> pd.DataFrame:
    """Each query shares words with its own passage and, more weakly, with the other passages of its topic."""
    rows = []
    for t, topic in enumerate(TOPICS):
        for i in range(n_per_topic):
            rows.append({"query": f"{topic} question {t}-{i} token{t}x{i}",
                         "passage": f"{topic} answer text token{t}x{i} token{t}x{i} extra{i}"})
    return pd.DataFrame(rows)


def test_lexical_tokens_split_identifiers_and_cjk():
    assert lexical_tokens("get_close_matches of HTTPServer") == ["get", "close", "matches", "http", "server"]
    assert lexical_tokens("银行卡") == ["银", "行", "卡"]


def test_bm25_mining_excludes_positives_and_prefers_same_topic():
    frame = _pairs()
    out, report = mine_negatives(frame, BM25Scorer(), MiningSettings(num=3, skip_top=0, max_score=None,
                                                                     max_ratio=None))
    assert list(out.columns) == ["query", "passage", "negative_1", "negative_2", "negative_3"]
    assert report["rows_fully_mined"] == len(frame) and report["random_fill"] == 0
    for _, row in out.iterrows():
        negs = [row[f"negative_{j}"] for j in (1, 2, 3)]
        assert row["passage"] not in negs and len(set(negs)) == 3
        topic = row["query"].split(" question")[0]
        assert all(n.startswith(topic) for n in negs)  # hard = same topic, not random


def test_query_with_several_positives_gets_none_of_them():
    frame = _pairs(4)
    extra = frame.iloc[[0]].copy()
    extra["passage"] = frame["passage"][1]  # query 0 also has passage 1 as a positive
    frame = pd.concat([frame, extra], ignore_index=True)
    out, _ = mine_negatives(frame, BM25Scorer(), MiningSettings(num=5, skip_top=0, max_score=None, max_ratio=None))
    rows_of_q0 = out[out["query"] == frame["query"][0]]
    assert len(rows_of_q0) == 2
    for _, row in rows_of_q0.iterrows():
        negs = {row[f"negative_{j}"] for j in range(1, 6)}
        assert not negs & {frame["passage"][0], frame["passage"][1]}


def test_symmetric_data_never_uses_the_query_text_itself():
    texts = [f"{t} sentence {i}" for t in TOPICS for i in range(3)]
    frame = pd.DataFrame({"query": texts, "passage": texts[1:] + texts[:1]})  # every query is also a passage
    out, _ = mine_negatives(frame, BM25Scorer(), MiningSettings(num=4, skip_top=0, max_score=None, max_ratio=None))
    for _, row in out.iterrows():
        assert row["query"] not in {row[f"negative_{j}"] for j in range(1, 5)}


def test_skip_top_drops_the_highest_ranked_candidates():
    frame = _pairs()
    full, _ = mine_negatives(frame, BM25Scorer(), MiningSettings(num=4, skip_top=0, max_score=None, max_ratio=None))
    skipped, _ = mine_negatives(frame, BM25Scorer(), MiningSettings(num=2, skip_top=2, max_score=None,
                                                                    max_ratio=None))
    # without skipping the ranking is n1 n2 n3 n4; skipping two gives n3 n4
    assert (skipped["negative_1"] == full["negative_3"]).all()
    assert (skipped["negative_2"] == full["negative_4"]).all()


def test_impossible_threshold_falls_back_to_random_fill():
    frame = _pairs()
    # a ratio no candidate can meet forces random negatives, counted in the report, still excluding positives
    out, report = mine_negatives(frame, BM25Scorer(), MiningSettings(num=3, skip_top=0, max_score=None,
                                                                     max_ratio=1e-9, seed=1))
    assert report["rows_fully_mined"] == 0 and report["random_fill"] == 3 * len(frame)
    for _, row in out.iterrows():
        negs = [row[f"negative_{j}"] for j in (1, 2, 3)]
        assert row["passage"] not in negs and len(set(negs)) == 3
    again, _ = mine_negatives(frame, BM25Scorer(), MiningSettings(num=3, skip_top=0, max_score=None,
                                                                  max_ratio=1e-9, seed=1))
    pd.testing.assert_frame_equal(out, again)  # deterministic


def test_mined_negatives_respect_the_ratio():
    frame = _pairs()
    settings = MiningSettings(num=2, skip_top=0, max_score=None, max_ratio=0.9)
    out, report = mine_negatives(frame, BM25Scorer(), settings)
    assert report["rows_fully_mined"] > 0
    scorer = BM25Scorer()
    corpus = frame["passage"].tolist()
    scorer.index(corpus)
    checked = 0
    for _, row in out.iterrows():
        ids = [corpus.index(row["passage"]), corpus.index(row["negative_1"]), corpus.index(row["negative_2"])]
        _, _, (scores,) = scorer.search([row["query"]], 1, [ids])
        if scores[1] > 0 and scores[2] > 0:  # zero-score picks can only come from the random fill
            assert (scores[1:] < 0.9 * scores[0]).all()
            checked += 1
    assert checked > 0


def test_embedding_scorer_with_a_tiny_model(tiny_model):
    from llm2emb.data.mining import EmbeddingScorer

    frame = _pairs(2)
    scorer = EmbeddingScorer(str(tiny_model), max_length=32)
    out, report = mine_negatives(frame, scorer, MiningSettings(num=2, skip_top=1, max_score=2.0, max_ratio=None))
    assert report["scorer"] == "embedding" and len(out) == len(frame)
    assert not (out["negative_1"] == out["passage"]).any()
    assert np.isfinite(report["mean_positive_score"])


def test_too_small_corpus_is_a_user_error():
    frame = pd.DataFrame({"query": ["a b", "c d"], "passage": ["a b c", "c d e"]})
    with pytest.raises(UserError, match="too few"):
        mine_negatives(frame, BM25Scorer(), MiningSettings(num=5))


def test_mine_folder_and_cli(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _pairs().to_parquet(raw / "topics.parquet")
    labelled = pd.DataFrame({"query": ["good film", "bad film"], "passage": ["positive", "negative"],
                             "negative_1": ["negative", "positive"]})
    labelled.to_parquet(raw / "sentiment.parquet")
    with_negs = _pairs(3).assign(negative_1="fixed negative")
    with_negs.to_parquet(raw / "given.parquet")
    (raw / "manifest.json").write_text(json.dumps({"sentiment": {"type": "classification"},
                                                   "topics": {"instruction": "Instruct: find\nQuery: "}}))
    out = tmp_path / "mined"
    code = main(["mine", "--scorer", "bm25", "--input", str(raw), "--output", str(out), "--num", "3",
                 "--skip-top", "0", "--max-ratio", "none"])
    assert code == 0
    topics = pd.read_parquet(out / "topics.parquet")
    assert [c for c in topics.columns if c.startswith("negative_")] == ["negative_1", "negative_2", "negative_3"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "sentiment.parquet"), labelled)  # not minable: copied
    pd.testing.assert_frame_equal(pd.read_parquet(out / "given.parquet"), with_negs)    # has negatives: kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sentiment"]["type"] == "classification"
    assert manifest["topics"] == {"type": "retrieval", "instruction": "Instruct: find\nQuery: "}
    info = json.loads((out / "mine_info.json").read_text())
    assert info["datasets"]["topics"]["negatives"] == 3
    # existing output is not overwritten silently; --remine replaces given negatives
    assert main(["mine", "--scorer", "bm25", "-i", str(raw), "-o", str(out)]) == 2
    assert main(["mine", "--scorer", "bm25", "-i", str(raw), "-o", str(out), "--overwrite", "--remine",
                 "--num", "2", "--max-ratio", "none"]) == 0
    given = pd.read_parquet(out / "given.parquet")
    assert list(given.columns) == ["query", "passage", "negative_1", "negative_2"]
    report = json.loads((out / "mine_info.json").read_text())["datasets"]["given"]
    assert report["replaced_negative_columns"] == 1
    assert report["corpus"] == len(with_negs) + 1  # the old negative stayed a candidate


def test_mine_without_model_for_embedding_scorer_is_a_user_error(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    _pairs().to_parquet(tmp_path / "raw" / "t.parquet")
    assert main(["mine", "--scorer", "embedding", "-i", str(tmp_path / "raw"), "-o", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
