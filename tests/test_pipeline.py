"""`llm2emb pipeline`: bad files refused before any stage runs, a staged run on a tiny model (SimCSE with
dropout, an MNTP LoRA on a full-weight result, merge / continue of an adapter, a merge stage), the per-stage report,
and re-runs (finished stages skipped, a changed stage re-run with the stages that use it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.pipeline import load_pipeline
from llm2emb.pipeline.runner import PipelineRunner
from llm2emb.pipeline.spec import find_cycle
from test_train_support import write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = {"train_batch_size": 4, "num_hard_neg": 1, "max_seq_length": 32, "train_steps": 2, "warmup_steps": 1,
         "log_interval": 1, "validation_steps": 0, "validation_fraction": 0.0, "checkpointing_steps": 1,
         "learning_rate": 1e-3, "pooling_mode": "mean"}


def sts_file(folder: Path) -> Path:
    rows = ["sentence1\tsentence2\tscore", "sorting lists\tsorting lists quickly\t4.5",
            "parsing dates\tcaching urls\t0.5", "hashing files\thashing large files\t4.0",
            "routing events\tmapping images\t1.0", "packing tables\tpacking the tables\t5.0"]
    path = folder / "sts.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_pipeline(folder: Path, model: Path, stages: list[dict], **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw"
    if not raw.exists():
        write_raw_data(raw, retrieval_rows=24, classification_rows=8, k=2)
    spec = {"name": "tiny", "model": str(model), "base": dict(QUICK), "data": {"max_seq_length": 32},
            "eval": {"tasks": [str(sts_file(folder))]}, "stages": stages, **extra}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ checks

def test_find_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "data": "raw"}, {"name": "a", "data": "raw"}], "two stages are named 'a'"),
    ([{"name": "a", "data": "raw", "from": "b"}, {"name": "b", "data": "raw", "from": "a"}],
     "stages a -> b -> a form a cycle"),
    ([{"name": "a", "data": "raw", "from": "b"}, {"name": "b", "data": "raw", "from": "start"}],
     "stage 'a' uses stage 'b', which comes after it"),
    ([{"name": "a", "data": "raw", "from": "nope"}], "uses stage 'nope', which does not exist"),
    ([{"name": "a", "data": "missing_folder"}], "data missing_folder does not exist"),
    ([{"name": "a", "data": "raw", "config": "missing.json"}], "Config file .*missing.json does not exist"),
    ([{"name": "a", "data": "raw", "set": {"train_stpes": 3}}], "unknown config field 'train_stpes'.*train_steps"),
    ([{"name": "a"}], "stage 'a' has no data"),
    ([{"name": "a", "data": "raw", "simcse": True}], "simcse needs dropout > 0"),
    ([{"name": "a", "data": "raw", "dropout": 1.5}], r"dropout must be a number in \[0, 1\)"),
    ([{"name": "a", "data": "raw", "set": {"lora_enabled": True}}, {"name": "b", "data": "raw"}],
     "starts from stage 'a', which trains a LoRA adapter; say what to do with it"),
    ([{"name": "a", "data": "raw"}, {"name": "b", "data": "raw", "start": "continue"}],
     "start: continue trains the previous stage's adapter on"),
    ([{"name": "a", "data": "raw", "teacher": "some-model"}], "has a teacher but no distillation loss"),
    ([{"name": "a", "data": "raw"}, {"name": "m", "merge": {"stages": ["a"], "weights": [1, 2]}}],
     "merge.weights has 2 values for 1 stages"),
    ([{"name": "a", "data": "raw"}, {"name": "m", "merge": {"method": "soup", "stages": ["a"]}}],
     "Unknown merge method 'soup'"),
    ([{"name": "a", "data": "raw"}, {"name": "m", "merge": {"stages": ["a"]}, "data": "raw"}],
     "is a merge stage and cannot also have 'data'"),
    ([{"name": "a", "data": "raw", "set": {"output_dir": "x"}}], "output_dir is set by the pipeline"),
    ([{"name": "a", "data": "raw", "colour": 1}], "unknown field 'colour'"),
    ([], "stages must be a non-empty list"),
    ([{"name": "a", "data": "raw", "from": "start", "model": "other-model"}], "has both from and model"),
    ([{"name": "a", "data": "builtin:stdlib-undocumented"}], "holds texts without queries; use it in a SimCSE"),
    ([{"name": "a", "data": ["raw", "builtin:stdlb"]}], "unknown built-in data 'builtin:stdlb'.*builtin:stdlib"),
    ([{"name": "a", "data": "raw"}, {"name": "b", "data": "raw", "model": "other-model"},
      {"name": "m", "merge": {"stages": ["a", "b"]}}], "merges 'a' .* with 'b' .*must share a base model"),
    ([{"name": "a", "data": "raw", "teacher": {"model": "x", "stage": "y"}, "set": {"losses": [{"name": "distill_kl"}]}}],
     "teacher must be a model, or a mapping with either model or stage"),
    ([{"name": "a", "data": "raw", "teacher": {"stage": "big"}, "set": {"losses": [{"name": "margin_mse"}]}}],
     "uses stage 'big', which does not exist"),
    ([{"name": "a", "data": "raw", "teacher": {"model": "x", "precision": "fp8"}, "set": {"losses": [{"name": "distill_kl"}]}}],
     "teacher.precision is 'fp8'"),
])
def test_bad_pipeline_files_are_one_sentence_before_anything_runs(tiny_model, tmp_path, stages, message):
    path = write_pipeline(tmp_path, tiny_model, stages)
    with pytest.raises(UserError, match=message):
        load_pipeline(path)
    assert main(["pipeline", str(path), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_stages(tiny_model, tmp_path, capsys):
    path = write_pipeline(tmp_path, tiny_model, [
        {"name": "simcse", "data": "raw", "simcse": True, "dropout": 0.1},
        {"name": "sup", "data": "raw", "set": {"mntp_mask_probability": 0.2, "bi_attn_enabled": True}},
        {"name": "soup", "merge": {"stages": ["simcse", "sup"]}}])
    assert main(["pipeline", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1. simcse: training from start (2 steps, SimCSE, dropout 0.1)" in out
    assert "2. sup: training from simcse (2 steps, MNTP 0.2)" in out and "3. soup: merging simcse, sup (linear)" in out
    assert not (tmp_path / "out").exists()
    # --set reaches every training stage, after the stage's own settings
    assert main(["pipeline", str(path), "--output", str(tmp_path / "out"), "--dry-run", "--set", "train_steps=7"]) == 0
    assert "1. simcse: training from start (7 steps" in capsys.readouterr().out
    assert main(["pipeline", str(path), "--dry-run", "--set", "model_path=x"]) == 2
    assert "model_path is set by the pipeline" in capsys.readouterr().err
    # --eval-task adds a task to every evaluation; a missing one is refused before anything runs
    other = tmp_path / "more.tsv"
    other.write_text(sts_file(tmp_path).read_text())
    assert main(["pipeline", str(path), "--output", str(tmp_path / "out"), "--dry-run", "--eval-task", str(other)]) == 0
    assert "2 eval task(s)" in capsys.readouterr().out
    assert main(["pipeline", str(path), "--dry-run", "--eval-task", str(tmp_path / "nope.tsv")]) == 2
    assert "eval.tasks[1]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a staged run

STAGES = [
    {"name": "simcse", "data": "raw", "simcse": True, "dropout": 0.2},
    {"name": "lora", "data": "raw", "set": {"lora_enabled": True, "lora_r": 4, "lora_alpha": 8,  # LLM2Vec's MNTP
                                            "mntp_mask_probability": 0.3, "bi_attn_enabled": True}},
    {"name": "full", "data": "raw", "start": "merge"},
    {"name": "more_lora", "from": "lora", "data": "raw", "start": "continue",
     "set": {"lora_enabled": True, "lora_r": 4, "lora_alpha": 8}},
    {"name": "soup", "merge": {"method": "linear", "stages": ["simcse", "full"], "weights": [1, 3]}},
]


@pytest.fixture(scope="module")
def staged(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    path = write_pipeline(root, tiny_model, STAGES)
    result = PipelineRunner(load_pipeline(path), root / "out").run()
    return root, path, result


def test_every_stage_is_trained_evaluated_and_reported(staged):
    root, _, result = staged
    out = root / "out"
    names = [r["name"] for r in result["stages"]]
    assert names == ["start", "simcse", "lora", "full", "more_lora", "soup"]
    for record in result["stages"]:
        (row,) = record["eval"].values()
        assert row["metric"] == "cosine_spearman" and -1 <= row["value"] <= 1
    assert [r["steps"] for r in result["stages"]] == [0, 2, 2, 2, 2, 0]
    report = (out / "report.md").read_text()
    assert "| simcse | train |" in report and "| soup | merge |" in report and "Δ start" in report
    assert (out / "report.png").stat().st_size > 1000
    assert json.loads((out / "pipeline.json").read_text())["pending"] == []
    metrics = [json.loads(line) for line in (out / "runs" / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert all("mntp_accuracy" in m for m in metrics if m["type"] == "train")  # the MNTP stage ran MNTP


def test_simcse_stage_sees_each_text_twice_under_dropout(staged, tiny_model):
    from llm2emb.model.embedder import Embedder

    out = staged[0] / "out"
    table = pq.read_table(out / "data" / "simcse" / "prepared" / "facts.parquet").to_pydict()
    assert table["query_input_ids"] == table["passage_input_ids"]          # (text, text) rows, no instruction
    assert table["query_prefix_length"] == [0] * len(table["query_prefix_length"])
    start = out / "stages" / "simcse" / "input"
    assert json.loads((start / "config.json").read_text())["attention_dropout"] == 0.2
    # the weights are the starting model's (hard links), only the config differs
    assert (start / "model.safetensors").stat().st_ino == (Path(tiny_model) / "model.safetensors").stat().st_ino
    emb = Embedder.from_pretrained(str(start), pooling="mean")
    batch = emb.collate(emb.tokenize(["a text that appears twice in a row"]).input_ids)
    emb.train()
    torch.manual_seed(0)
    one, two = emb(**batch), emb(**batch)
    assert not torch.allclose(one, two)                                    # dropout is on while training ...
    emb.eval()
    torch.testing.assert_close(emb(**batch), emb(**batch))                # ... and off for encoding
    # the next stage goes back to the starting model's dropout (0)
    lora_input = out / "stages" / "lora" / "input"
    assert json.loads((lora_input / "config.json").read_text())["attention_dropout"] == 0.0


def test_lora_handoffs(staged):
    out = staged[0] / "out"
    # a LoRA trained on the SimCSE result records that result's folder as its base, not the original model
    lora = json.loads((out / "runs" / "lora" / "final" / "llm2emb_config.json").read_text())
    assert lora["lora_adapter"] is True
    assert Path(lora["base_model"]) == (out / "stages" / "lora" / "input").resolve()
    # start: merge -> full weights folded from the adapter
    merged = out / "stages" / "full" / "input"
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").exists()
    # start: continue -> the adapter trained on, over the adapter's own base
    run_config = json.loads((out / "runs" / "more_lora" / "config.json").read_text())["config"]
    assert run_config["lora_adapter_path"] == str(out / "runs" / "lora" / "final")
    cont = json.loads((out / "runs" / "more_lora" / "final" / "llm2emb_config.json").read_text())
    assert cont["lora_adapter"] is True
    # the merge stage's weights are 1:3 of the simcse and full results
    from safetensors.torch import load_file

    a = load_file(str(out / "runs" / "simcse" / "final" / "model.safetensors"))
    b = load_file(str(out / "runs" / "full" / "final" / "model.safetensors"))
    m = load_file(str(out / "merged" / "soup" / "model.safetensors"))
    key = "layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(m[key], (a[key] + 3 * b[key]) / 4, rtol=0, atol=1e-6)


def test_baseline_rows_carry_paired_bootstrap_intervals(staged, capsys):
    """baseline: a stage -> every other row's change from it with a 95% interval; per-item results stay in the
    stage records, not in pipeline.json; an unknown baseline is one sentence."""
    import re

    root, path, _ = staged
    out = root / "out"
    spec = yaml.safe_load(path.read_text())
    other = root / "with_baseline.yaml"
    other.write_text(yaml.safe_dump({**spec, "baseline": "simcse"}, sort_keys=False))
    # a record written without per-item results (an older llm2emb) is evaluated again
    record_path = out / "stages" / "full" / "stage.json"
    record = json.loads(record_path.read_text())
    record["eval"] = {row: {k: v for k, v in value.items() if k != "per_item"} for row, value in record["eval"].items()}
    record_path.write_text(json.dumps(record))
    result = PipelineRunner(load_pipeline(other), out).run()
    assert "training" not in capsys.readouterr().out            # nothing is trained again
    (row,) = result["comparisons"]["full"]
    values = {r["name"]: r["eval"][row]["value"] for r in result["stages"]}
    assert result["comparisons"]["full"][row]["diff"] == pytest.approx(values["full"] - values["simcse"], abs=1e-4)
    assert "simcse" not in result["comparisons"] and all("per_item" not in v for r in result["stages"]
                                                         for v in r["eval"].values())
    report = (out / "report.md").read_text()
    assert f"Δ simcse {row} [95% CI]" in report
    assert re.search(r"\| full \| train \|.*[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", report)
    other.write_text(yaml.safe_dump({**spec, "baseline": "simcs"}, sort_keys=False))
    with pytest.raises(UserError, match="baseline 'simcs' is not a stage.*simcse"):
        load_pipeline(other)


def test_rerun_skips_finished_stages_and_reruns_what_changed(staged, capsys):
    root, path, _ = staged
    out = root / "out"
    final = out / "runs" / "full" / "final" / "model.safetensors"
    before = {name: (out / "runs" / name / "final").stat().st_mtime_ns for name in ("simcse", "lora", "full")}
    # an interrupted stage (killed after training, before its record): its run is kept and not trained again
    (out / "stages" / "full" / "stage.json").unlink()
    PipelineRunner(load_pipeline(path), out).run()
    text = capsys.readouterr().out
    assert "simcse: done (skipped)" in text and "soup: done (skipped)" in text and "full: training" in text
    assert (out / "runs" / "full" / "final").stat().st_mtime_ns == before["full"]
    # a changed stage runs again, and so does every stage that uses its result
    spec = yaml.safe_load(path.read_text())
    spec["stages"][1]["set"]["learning_rate"] = 5e-4
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    PipelineRunner(load_pipeline(path), out).run()
    text = capsys.readouterr().out
    assert "simcse: done (skipped)" in text
    for name in ("lora", "full", "more_lora", "soup"):
        assert f"{name}: done (skipped)" not in text, name
    assert (out / "runs" / "simcse" / "final").stat().st_mtime_ns == before["simcse"]
    assert (out / "runs" / "lora" / "final").stat().st_mtime_ns != before["lora"]
    assert final.exists()
    # another pipeline cannot take over the folder
    spec["name"] = "other"
    other = root / "other.yaml"
    other.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UserError, match="holds pipeline 'tiny', not 'other'"):
        PipelineRunner(load_pipeline(other), out).run()
    os.environ.pop("LLM2EMB_DEBUG", None)


def test_stage_data_mixes_folders_and_builtin_texts(tmp_path, monkeypatch):
    """data: [folder, builtin:stdlib-undocumented] links every dataset into one folder with one merged
    manifest; the built-in texts (functions without a docstring) become SimCSE rows like any other text."""
    import pandas as pd

    from llm2emb.data import builtin
    from llm2emb.pipeline.data import raw_input, simcse_rows

    functions = [builtin.CodeFunction("json.x", f"f{i}", "", f"def f{i}(a):\n    return a + {i}") for i in range(3)]
    monkeypatch.setattr(builtin, "undocumented_training_functions", lambda: functions)
    monkeypatch.setenv("LLM2EMB_HOME", str(tmp_path / "home"))
    write_raw_data(tmp_path / "raw", retrieval_rows=6, classification_rows=4, k=1)
    folder = Path(raw_input([str(tmp_path / "raw"), "builtin:stdlib-undocumented"], tmp_path / "files"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stdlib_undocumented"] == {"type": "retrieval", "instruction": ""}
    assert set(json.loads((tmp_path / "raw" / "manifest.json").read_text())) <= set(manifest)
    texts = pd.read_parquet(folder / "stdlib_undocumented.parquet")
    assert list(texts["query"]) == list(texts["passage"]) == [f.passage for f in functions]
    rows = pd.read_parquet(Path(simcse_rows(str(folder), tmp_path / "simcse")) / "stdlib_undocumented.parquet")
    assert list(rows["query"]) == [f.passage for f in functions]
