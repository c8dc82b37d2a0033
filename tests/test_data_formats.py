"""Raw data formats (F2LLM, BGE jsonl, sentence-transformers), the task manifest, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llm2emb.data.formats import DatasetFile, list_datasets, load_dataset
from llm2emb.data.manifest import TASK_TYPES, DatasetSpec, parse_manifest, read_manifest, resolve_manifest
from llm2emb.errors import UserError


def _file(path: Path) -> DatasetFile:
    return DatasetFile(path.stem if path.is_file() else path.name, path)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


F2LLM_ROWS = {"query": ["q1", "q2"], "passage": ["p1", "p2"], "negative_1": ["n1", "n2"],
              "negative_2": ["m1", "m2"]}


# ---------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv", ".tsv"])
def test_f2llm_layout_in_every_file_type(tmp_path, suffix):
    frame = pd.DataFrame(F2LLM_ROWS)
    path = tmp_path / f"ds{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        _write_jsonl(path, frame.to_dict("records"))
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    ds = load_dataset(_file(path))
    assert ds.format == "f2llm" and ds.name == "ds"
    assert list(ds.frame.columns) == ["query", "passage", "negative_1", "negative_2"]
    assert ds.frame.to_dict("list") == F2LLM_ROWS
    assert ds.num_negatives == 2


def test_f2llm_without_negatives_and_extra_columns(tmp_path):
    pd.DataFrame({"query": ["a"], "passage": ["b"], "score": [3.5]}).to_parquet(tmp_path / "x.parquet")
    ds = load_dataset(_file(tmp_path / "x.parquet"))
    assert list(ds.frame.columns) == ["query", "passage"] and ds.num_negatives == 0


def test_f2llm_shards_folder_is_one_dataset(tmp_path):
    shards = tmp_path / "raw" / "msmarco"
    shards.mkdir(parents=True)
    pd.DataFrame({"query": ["a"], "passage": ["b"]}).to_parquet(shards / "part-0.parquet")
    pd.DataFrame({"query": ["c"], "passage": ["d"]}).to_parquet(shards / "part-1.parquet")
    (files,) = list_datasets(tmp_path / "raw")
    assert files.name == "msmarco"
    assert sorted(load_dataset(files).frame["query"]) == ["a", "c"]


def test_sentence_transformers_columns(tmp_path):
    pd.DataFrame({"anchor": ["a1", "a2"], "positive": ["p1", "p2"], "negative": ["n1", "n2"]}).to_parquet(
        tmp_path / "st.parquet")
    ds = load_dataset(_file(tmp_path / "st.parquet"))
    assert ds.format == "sentence-transformers"
    assert ds.frame.to_dict("list") == {"query": ["a1", "a2"], "passage": ["p1", "p2"], "negative_1": ["n1", "n2"]}
    _write_jsonl(tmp_path / "st2.jsonl", [{"anchor": "a", "positive": "p", "negative_1": "x", "negative_2": "y"}])
    ds2 = load_dataset(_file(tmp_path / "st2.jsonl"))
    assert ds2.frame.iloc[0].tolist() == ["a", "p", "x", "y"]
    _write_jsonl(tmp_path / "st3.jsonl", [{"anchor": "a", "positive": "p"}])
    assert load_dataset(_file(tmp_path / "st3.jsonl")).num_negatives == 0


def test_bge_rows_expand_positives_cycle_negatives_and_carry_type_and_prompt(tmp_path):
    path = _write_jsonl(tmp_path / "bge.jsonl", [
        {"query": "q1", "pos": ["p1a", "p1b"], "neg": ["n1", "n2", "n3"], "prompt": "Find it.", "type": "normal"},
        {"query": "q2", "pos": ["p2"], "neg": ["m1"], "prompt": "Find it.", "type": "normal"},
    ])
    ds = load_dataset(_file(path))
    assert ds.format == "bge"
    assert ds.frame["query"].tolist() == ["q1", "q1", "q2"]
    assert ds.frame["passage"].tolist() == ["p1a", "p1b", "p2"]
    assert ds.frame[["negative_1", "negative_2", "negative_3"]].values.tolist() == [
        ["n1", "n2", "n3"], ["n1", "n2", "n3"], ["m1", "m1", "m1"]]
    assert ds.defaults == DatasetSpec(type="retrieval", instruction="Instruct: Find it.\nQuery: ")
    # a custom separator goes into the instruction template
    ds2 = load_dataset(_file(path), prompt_template="Instruct: {prompt}\nQuestion: ")
    assert ds2.defaults.instruction == "Instruct: Find it.\nQuestion: "


def test_bge_per_row_prompts_are_prepended(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"query": "q1", "pos": ["p1"], "neg": [], "prompt": "A."},
        {"query": "q2", "pos": ["p2"], "neg": [], "prompt": "B."},
    ])
    ds = load_dataset(_file(path))
    assert ds.frame["query"].tolist() == ["Instruct: A.\nQuery: q1", "Instruct: B.\nQuery: q2"]
    assert ds.defaults.instruction == "" and ds.num_negatives == 0


@pytest.mark.parametrize("bge_type,task", [("symmetric_class", "classification"), ("symmetric_sts", "sts"),
                                           ("symmetric_clustering", "clustering"), ("only_1neg", "retrieval"),
                                           ("something_new", "retrieval")])
def test_bge_types_map_to_task_types(tmp_path, bge_type, task):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "pos": ["p"], "neg": ["n"], "type": bge_type}])
    assert load_dataset(_file(path)).defaults.type == task


def test_real_bge_samples(shared_data):
    """The FlagEmbedding examples in ../shared/data convert with their own task type and prompt."""
    folder = shared_data / "train" / "bge_format_samples"
    expected = {"classification-no_in_batch_neg_Banking77Classification": "classification",
                "clustering-no_in_batch_neg_arXiv_title": "clustering", "retrieval_msmarco": "retrieval",
                "retrieval_nli": "retrieval", "retrieval_nq": "retrieval", "sts_sts": "sts"}
    files = list_datasets(folder)
    assert {f.name for f in files} == set(expected)
    for file in files:
        ds = load_dataset(file)
        assert ds.format == "bge" and len(ds.frame) == 10
        assert ds.defaults.type == expected[file.name]
        assert ds.defaults.instruction.startswith("Instruct: ") and ds.defaults.instruction.endswith("\nQuery: ")
        assert ds.num_negatives >= 1
        assert all(isinstance(v, str) for v in ds.frame.to_numpy().ravel())


def test_format_can_be_forced(tmp_path):
    # both anchor/positive and query/passage columns: detection takes F2LLM, --format picks the other
    pd.DataFrame({"query": ["q"], "passage": ["p"], "anchor": ["a"], "positive": ["b"]}).to_parquet(
        tmp_path / "both.parquet")
    assert load_dataset(_file(tmp_path / "both.parquet")).frame["query"].tolist() == ["q"]
    forced = load_dataset(_file(tmp_path / "both.parquet"), format="sentence-transformers")
    assert forced.frame["query"].tolist() == ["a"]
    with pytest.raises(UserError, match="format 'bge' needs"):
        load_dataset(_file(tmp_path / "both.parquet"), format="bge")
    with pytest.raises(UserError, match="Unknown format 'bg'.*Did you mean 'bge'"):
        load_dataset(_file(tmp_path / "both.parquet"), format="bg")


def test_list_datasets_skips_metadata_and_rejects_duplicate_names(tmp_path):
    pd.DataFrame(F2LLM_ROWS).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "data_stats.json").write_text("{}")
    (tmp_path / "README.md").write_text("notes")
    assert [f.name for f in list_datasets(tmp_path)] == ["a"]
    _write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "passage": "p"}])
    with pytest.raises(UserError, match="Two inputs give dataset name 'a'"):
        list_datasets(tmp_path)


# --------------------------------------------------------------------------------------------- bad input

def _error(tmp_path: Path, frame_or_text, name: str = "bad.parquet") -> str:
    path = tmp_path / name
    if isinstance(frame_or_text, pd.DataFrame):
        frame_or_text.to_parquet(path)
    else:
        path.write_text(frame_or_text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_dataset(_file(path))
    return str(info.value)


def test_missing_query_or_passage_column(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query": ["q"], "pasage": ["p"]}))
    assert "bad.parquet" in msg and "'passage'" in msg and "Did you mean 'pasage'" in msg
    msg = _error(tmp_path, pd.DataFrame({"question": ["q"], "passage": ["p"]}))
    assert "'query'" in msg and "--format" in msg


def test_null_text_names_file_column_and_row(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query": ["a", "b", None, None], "passage": ["p"] * 4}))
    assert "bad.parquet" in msg and "'query'" in msg and "row 2" in msg and "null" in msg


def test_non_string_text(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query": ["a", "b"], "passage": ["p", "p"], "negative_1": [1, 2]}))
    assert "'negative_1'" in msg and "row 0" in msg and "int" in msg
    msg = _error(tmp_path, "\n".join(json.dumps(r) for r in [{"query": "a", "passage": "b"},
                                                             {"query": ["x"], "passage": "c"}]), "bad.jsonl")
    assert "bad.jsonl" in msg and "'query'" in msg and "row 1" in msg and "list" in msg


def test_negative_columns_with_a_gap(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query": ["a"], "passage": ["b"], "negative_1": ["c"], "negative_3": ["d"]}))
    assert "negative_2 is missing" in msg and "bad.parquet" in msg
    msg = _error(tmp_path, pd.DataFrame({"query": ["a"], "passage": ["b"], "negative_2": ["c"]}))
    assert "negative_1 is missing" in msg


def test_empty_dataset(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query": pd.Series([], dtype=str), "passage": pd.Series([], dtype=str)}))
    assert "no rows" in msg and "bad.parquet" in msg
    assert "no rows" in _error(tmp_path, "", "empty.jsonl") or "no columns" in _error(tmp_path, "", "empty.jsonl")


def test_unreadable_or_corrupt_file(tmp_path):
    msg = _error(tmp_path, "this is not parquet", "broken.parquet")
    assert "Cannot read" in msg and "broken.parquet" in msg
    msg = _error(tmp_path, '{"query": "a", "passage": "b"}\n{"query": oops}\n', "broken.jsonl")
    assert "broken.jsonl, line 2" in msg


def test_bge_bad_rows(tmp_path):
    msg = _error(tmp_path, json.dumps({"query": "q", "pos": [], "neg": ["n"]}) + "\n", "b1.jsonl")
    assert "line 1" in msg and "'pos' is empty" in msg
    msg = _error(tmp_path, "\n".join(json.dumps(r) for r in [{"query": "q", "pos": ["p"], "neg": ["n"]},
                                                             {"query": "q", "pos": ["p"], "neg": [3]}]), "b2.jsonl")
    assert "line 2" in msg and "'neg'" in msg and "int" in msg
    msg = _error(tmp_path, "\n".join(json.dumps(r) for r in [{"query": "q", "pos": ["p"], "neg": ["n"]},
                                                             {"query": "q", "pos": ["p"], "neg": []}]), "b3.jsonl")
    assert "line 2" in msg and "'neg' is empty" in msg
    msg = _error(tmp_path, "\n".join(json.dumps(r) for r in [{"query": "q", "pos": ["p"], "type": "normal"},
                                                             {"query": "q", "pos": ["p"], "type": "symmetric_class"}]),
                 "b4.jsonl")
    assert "mixes row types" in msg


def test_prepared_data_is_not_raw_input(tmp_path):
    msg = _error(tmp_path, pd.DataFrame({"query_input_ids": [[1, 2]], "passage_input_ids": [[3]],
                                         "query": ["q"], "passage": ["p"]}))
    assert "token ids" in msg


# --------------------------------------------------------------------------------------------- manifest

def test_task_types_registry():
    assert set(TASK_TYPES) == {"retrieval", "pairs", "sts", "clustering", "classification"}
    assert TASK_TYPES["retrieval"].use_inbatch and TASK_TYPES["pairs"].use_inbatch
    for name in ("sts", "clustering", "classification"):
        assert not TASK_TYPES[name].use_inbatch
    assert TASK_TYPES["classification"].forced_num_negatives == 1
    assert TASK_TYPES["retrieval"].forced_num_negatives is None


def test_manifest_resolution(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "a": {"type": "classification"},
        "b": {"instruction": "Instruct: x\nQuery: "},
        "c": "sts",
    }))
    manifest = read_manifest(tmp_path)
    resolved = resolve_manifest(manifest, ["a", "b", "c", "d", "e"],
                                defaults={"e": DatasetSpec("clustering", "Instruct: e\nQuery: "),
                                          "b": DatasetSpec("pairs", "old")})
    assert resolved["a"] == DatasetSpec("classification", "")
    assert resolved["b"] == DatasetSpec("pairs", "Instruct: x\nQuery: ")  # manifest field over file default
    assert resolved["c"] == DatasetSpec("sts", "")
    assert resolved["d"] == DatasetSpec()  # retrieval, no instruction
    assert resolved["e"] == DatasetSpec("clustering", "Instruct: e\nQuery: ")
    assert read_manifest(tmp_path / "nothing-here") == {}


@pytest.mark.parametrize("data,match", [
    ({"a": {"type": "clasification"}}, "unknown task type 'clasification'.*Did you mean 'classification'"),
    ({"a": {"type": "retrieval", "instrution": "x"}}, "unknown field 'instrution'.*Did you mean 'instruction'"),
    ({"a": {"instruction": 5}}, "'instruction' must be a string"),
    ({"a": 3}, "entry must be an object"),
    (["a"], "must be a JSON object"),
])
def test_bad_manifest(data, match):
    with pytest.raises(UserError, match=match):
        parse_manifest(data, "manifest.json")


def test_manifest_names_unknown_dataset_and_broken_json(tmp_path):
    with pytest.raises(UserError, match="names dataset 'scifact'.*Did you mean 'scifact_en'"):
        resolve_manifest({"scifact": {"type": "retrieval"}}, ["scifact_en", "atec"])
    (tmp_path / "manifest.json").write_text('{"a": {"type": "sts",}}')
    with pytest.raises(UserError, match="manifest.json: invalid JSON: trailing comma at line 1"):
        read_manifest(tmp_path)


def test_prepared_output_inside_the_input_folder_is_not_a_dataset(tmp_path):
    pd.DataFrame(F2LLM_ROWS).to_parquet(tmp_path / "a.parquet")
    tok = tmp_path / "tokenised"
    tok.mkdir()
    pd.DataFrame({"query_input_ids": [[1, 2]]}).to_parquet(tok / "a.parquet")
    (tok / "prepare_info.json").write_text("{}")
    assert [f.name for f in list_datasets(tmp_path)] == ["a"]
