"""`llm2emb prepare`: tokenised layout, EOS and max length, instruction prefixes, dedup, stats, re-runs,
tokenizer fingerprint, bad input, read_prepared, and the CLI."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2emb.cli import main as cli_main
from llm2emb.model.tokenization import encode_texts, instruction_prefix_end
from llm2emb.data.tokenize import prepare, read_prepared, tokenizer_fingerprint
from llm2emb.errors import UserError

MAX = 16
INSTRUCTION = "Instruct: Find the passage.\nQuery: "
LONG = "the quick brown fox jumps over the lazy dog " * 6  # > MAX tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from llm2emb.model.loading import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def _raw_folder(root: Path) -> Path:
    """One dataset per supported format, a manifest, long texts (truncation) and repeated texts (dedup)."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "query": ["what is a fox", "what is a dog", LONG, "what is a fox"],
        "passage": ["a fox is an animal", LONG, "a dog barks", "a fox is an animal"],
        "negative_1": ["a cat", "a cat", "a bird sings", LONG],
        "negative_2": ["a dog barks", "a fish", "a cat", "a cat"],
    }).to_parquet(root / "retr.parquet")
    pd.DataFrame({"query": ["great movie", "awful film", "loved it"],
                  "passage": ["positive", "negative", "positive"],
                  "negative_1": ["negative", "positive", "negative"]}).to_parquet(root / "cls.parquet")
    pd.DataFrame({"anchor": ["hello there", "good morning"], "positive": ["hi", "morning!"]}).to_parquet(
        root / "st_pairs.parquet")
    (root / "bge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "capital of France", "pos": ["Paris is the capital of France."], "neg": ["Berlin is big."],
         "prompt": "Retrieve the answer.", "type": "normal"},
        {"query": "tallest mountain", "pos": ["Everest is the tallest."], "neg": ["The Nile is long."],
         "prompt": "Retrieve the answer.", "type": "normal"},
    ]))
    (root / "manifest.json").write_text(json.dumps({"retr": {"instruction": INSTRUCTION},
                                                    "cls": {"type": "classification"},
                                                    "st_pairs": {"type": "pairs"}}))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    raw = _raw_folder(tmp_path_factory.mktemp("raw") / "data")
    out = tmp_path_factory.mktemp("tok") / "data"
    result = prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False)
    return raw, out, result


def test_layout_info_and_manifest(prepared, tokenizer, smollm2_dir):
    raw, out, result = prepared
    assert sorted(p.name for p in out.iterdir()) == [
        "bge.parquet", "cls.parquet", "data_stats.json", "manifest.json", "prepare_info.json",
        "retr.parquet", "st_pairs.parquet"]
    schema = pq.read_schema(out / "retr.parquet")
    assert schema.names == ["query_input_ids", "passage_input_ids", "negative_1_input_ids",
                            "negative_2_input_ids", "query_prefix_length"]
    assert pa.types.is_list(schema.field("query_input_ids").type)
    assert schema.field("query_input_ids").type.value_type == pa.int32()
    assert schema.field("query_prefix_length").type == pa.int32()
    assert pq.read_schema(out / "st_pairs.parquet").names == ["query_input_ids", "passage_input_ids",
                                                              "query_prefix_length"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {
        "bge": {"type": "retrieval", "instruction": "Instruct: Retrieve the answer.\nQuery: "},
        "cls": {"type": "classification", "instruction": ""},
        "retr": {"type": "retrieval", "instruction": INSTRUCTION},
        "st_pairs": {"type": "pairs", "instruction": ""},
    }
    info = json.loads((out / "prepare_info.json").read_text())
    assert info == {**info, "tokenizer": str(smollm2_dir), "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id, "max_seq_length": MAX,
                    "instruction_separator": "Query:", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    assert info["llm2emb_version"]


def test_every_sequence_ends_with_eos_fits_and_matches_encode_texts(prepared, tokenizer):
    raw, out, _ = prepared
    eos = tokenizer.eos_token_id
    for name in ("retr", "cls", "st_pairs", "bge"):
        table = pq.read_table(out / f"{name}.parquet").to_pydict()
        for column, values in table.items():
            if column.endswith("_input_ids"):
                for ids in values:
                    assert ids[-1] == eos and 2 <= len(ids) <= MAX
    # Same tokens as the shared rule (what Embedder.encode uses), instruction included, row by row.
    frame = pd.read_parquet(raw / "retr.parquet")
    table = pq.read_table(out / "retr.parquet").to_pydict()
    expected_q = encode_texts(tokenizer, [INSTRUCTION + q for q in frame["query"]], MAX,
                              instruction_prefix_end(INSTRUCTION, "Query:"))
    assert table["query_input_ids"] == expected_q.input_ids
    assert table["query_prefix_length"] == expected_q.prefix_lengths
    assert all(p > 0 for p in table["query_prefix_length"])
    for column in ("passage", "negative_1", "negative_2"):
        assert table[f"{column}_input_ids"] == encode_texts(tokenizer, list(frame[column]), MAX).input_ids
    # No instruction, no separator in the text: no prefix.
    assert set(pq.read_table(out / "cls.parquet").column("query_prefix_length").to_pylist()) == {0}


def test_stats_count_rows_truncation_and_distinct_texts(prepared, tokenizer):
    raw, out, result = prepared
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats == result["datasets"]
    retr = stats["retr"]
    assert retr["rows"] == 4 and retr["hard_negatives"] == 2  # long rows kept, not dropped
    assert retr["type"] == "retrieval" and retr["format"] == "f2llm"
    # truncated: the long query (with instruction), the long passage, the long negative
    assert retr["truncated"] == {"query": 1, "passage": 1, "negatives": 1}
    frame = pd.read_parquet(raw / "retr.parquet")
    distinct = set(INSTRUCTION + frame["query"]) | set(frame["passage"]) | set(frame["negative_1"]) | set(
        frame["negative_2"])
    assert retr["unique_texts"] == len(distinct)
    assert retr["token_length"]["query"]["max"] == MAX
    assert set(retr["token_length"]) == {"query", "passage", "negatives"}
    assert stats["st_pairs"]["format"] == "sentence-transformers" and stats["st_pairs"]["hard_negatives"] == 0
    assert stats["bge"]["format"] == "bge" and stats["cls"]["type"] == "classification"
    assert stats["retr"]["tokens"] == sum(
        len(ids) for col in pq.read_table(out / "retr.parquet").to_pydict().values()
        if isinstance(col[0], list) for ids in col)


def test_worker_processes_give_identical_output(prepared, smollm2_dir, tmp_path):
    raw, out, _ = prepared
    out2 = tmp_path / "tok2"
    prepare(str(smollm2_dir), raw, out2, max_seq_length=MAX, workers=2, progress=False)
    for name in ("retr", "cls", "st_pairs", "bge"):
        assert pq.read_table(out2 / f"{name}.parquet").equals(pq.read_table(out / f"{name}.parquet"))


def test_rerun_skips_done_datasets_and_redoes_changed_ones(smollm2_dir, tmp_path, tokenizer):
    raw = _raw_folder(tmp_path / "raw")
    out = tmp_path / "tok"
    first = prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False, tokenizer=tokenizer)
    assert first["skipped"] == []
    again = prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False, tokenizer=tokenizer)
    assert sorted(again["skipped"]) == ["bge", "cls", "retr", "st_pairs"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    # a changed source file and a changed manifest entry are redone, the rest skipped
    pd.DataFrame({"query": ["new query"], "passage": ["new passage"]}).to_parquet(raw / "st_pairs.parquet")
    manifest = json.loads((raw / "manifest.json").read_text())
    manifest["cls"] = {"type": "classification", "instruction": "Instruct: Classify.\nQuery: "}
    (raw / "manifest.json").write_text(json.dumps(manifest))
    third = prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False, tokenizer=tokenizer)
    assert sorted(third["skipped"]) == ["bge", "retr"]
    assert pq.read_table(out / "st_pairs.parquet").num_rows == 1
    assert json.loads((out / "manifest.json").read_text())["cls"]["instruction"] == "Instruct: Classify.\nQuery: "
    forced = prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False,
                     tokenizer=tokenizer, overwrite=True)
    assert forced["skipped"] == []
    # other settings on the same output: refused unless --overwrite
    with pytest.raises(UserError, match="different max_seq_length.*--overwrite"):
        prepare(str(smollm2_dir), raw, out, max_seq_length=MAX + 1, workers=1, progress=False, tokenizer=tokenizer)


def test_bad_dataset_writes_nothing_for_it(smollm2_dir, tmp_path, tokenizer):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"query": ["a", "b"], "passage": ["c", "d"]}).to_parquet(raw / "a_good.parquet")
    pd.DataFrame({"query": ["a", "b", "c"], "passage": ["c", None, "e"]}).to_parquet(raw / "b_bad.parquet")
    out = tmp_path / "tok"
    with pytest.raises(UserError, match=r"b_bad\.parquet, column 'passage', row 1"):
        prepare(str(smollm2_dir), raw, out, max_seq_length=MAX, workers=1, progress=False, tokenizer=tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["a_good.parquet", "data_stats.json", "manifest.json",
                                                     "prepare_info.json"]  # no temp files, no b_bad
    assert list(json.loads((out / "manifest.json").read_text())) == ["a_good"]
    # a manifest with an unknown type fails before anything is tokenised
    (raw / "manifest.json").write_text(json.dumps({"a_good": {"type": "ranking"}}))
    with pytest.raises(UserError, match="unknown task type 'ranking'"):
        prepare(str(smollm2_dir), raw, tmp_path / "tok2", max_seq_length=MAX, workers=1, progress=False,
                tokenizer=tokenizer)
    assert not (tmp_path / "tok2").exists()


def test_tokenizer_fingerprint_is_stable_and_sensitive(smollm2_dir, tokenizer, tmp_path):
    from llm2emb.model.loading import load_tokenizer

    again = load_tokenizer(str(smollm2_dir), padding_side="left")
    again.backend_tokenizer.enable_truncation(max_length=5)  # runtime settings do not matter
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    assert len(tokenizer_fingerprint(tokenizer)) == 64
    changed = load_tokenizer(str(smollm2_dir))
    changed.add_tokens(["<brand_new_token>"])
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tokenizer)


def test_read_prepared(prepared, tmp_path):
    raw, out, _ = prepared
    info = read_prepared(out)
    assert sorted(info["datasets"]) == ["bge", "cls", "retr", "st_pairs"]
    assert info["manifest"]["cls"]["type"] == "classification"
    assert info["max_seq_length"] == MAX and info["tokenizer_fingerprint"]
    assert info["stats"]["retr"]["rows"] == 4
    with pytest.raises(UserError, match="raw text.*llm2emb prepare --model"):
        read_prepared(raw)
    with pytest.raises(UserError, match="does not exist.*llm2emb prepare"):
        read_prepared(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "cls.parquet").unlink()
    with pytest.raises(UserError, match="cls.parquet is missing"):
        read_prepared(broken)


def test_cli_prepare_and_user_errors(smollm2_dir, tmp_path, capsys):
    raw = _raw_folder(tmp_path / "raw")
    out = tmp_path / "tok"
    code = cli_main(["prepare", "--model", str(smollm2_dir), "--input", str(raw), "--output", str(out),
                     "--max-seq-length", str(MAX), "--workers", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "retr" in printed and "classification" in printed and "prepared" in printed
    assert read_prepared(out)["datasets"]
    os.environ.pop("LLM2EMB_DEBUG", None)
    (raw / "zz_bad.parquet").write_bytes(b"not a parquet file")
    code = cli_main(["prepare", "--model", str(smollm2_dir), "--input", str(raw), "--output", str(out),
                     "--max-seq-length", str(MAX), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "zz_bad.parquet" in err and "Traceback" not in err
    code = cli_main(["prepare", "--model", str(smollm2_dir), "--input", str(tmp_path / "nope"), "--output",
                     str(out)])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_shared_training_data_subset(shared_data, smollm2_dir, tmp_path, tokenizer):
    """Real data (Chinese and English): rows kept, EOS last, lengths within the limit."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("ocnli_zh", "stsb_pairs_en"):
        os.symlink(shared_data / "train" / f"{name}.parquet", raw / f"{name}.parquet")
    out = tmp_path / "tok"
    result = prepare(str(smollm2_dir), raw, out, max_seq_length=64, workers=2, progress=False, tokenizer=tokenizer)
    expected = json.loads((shared_data / "train" / "data_stats.json").read_text())
    for name, stats in result["datasets"].items():
        assert stats["rows"] == expected[name]["rows"]
        assert stats["hard_negatives"] == expected[name]["hard_negatives"]
        table = pq.read_table(out / f"{name}.parquet").to_pydict()
        for column, values in table.items():
            if column.endswith("_input_ids"):
                assert all(v[-1] == tokenizer.eos_token_id and len(v) <= 64 for v in values)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_all_shared_training_data_with_two_tokenizers(shared_data, tmp_path, model):
    """The done-when check: all of ../shared/data/train with two different tokenizers."""
    from llm2emb.model.loading import load_tokenizer, prepare_builtin

    try:
        tokenizer = load_tokenizer(str(prepare_builtin(model)))
    except UserError as exc:
        pytest.skip(f"{model} unavailable: {exc}")
    out = tmp_path / "tok"
    result = prepare(model, shared_data / "train", out, workers=2, progress=False, tokenizer=tokenizer)
    expected = json.loads((shared_data / "train" / "data_stats.json").read_text())
    assert {n: (s["rows"], s["hard_negatives"]) for n, s in result["datasets"].items()} == {
        n: (s["rows"], s["hard_negatives"]) for n, s in expected.items()}
    info = read_prepared(out)
    assert info["tokenizer"] == model and info["eos_token_id"] == tokenizer.eos_token_id
    for name in expected:
        for column in pq.read_table(out / f"{name}.parquet").to_pydict().values():
            if isinstance(column[0], list):
                assert all(v[-1] == tokenizer.eos_token_id and len(v) <= 1024 for v in column)
