"""A pipeline stage with a teacher: teacher columns added to the stage's prepared data, the distillation
losses trained on them, and a changed teacher re-running the stage."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from llm2emb.pipeline import load_pipeline
from llm2emb.pipeline.runner import PipelineRunner
from test_pipeline import write_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_distillation_stage(tiny_model, tmp_path, capsys):
    losses = [{"name": "contrastive"}, {"name": "distill_kl", "weight": 0.5}, {"name": "margin_mse"}]
    path = write_pipeline(tmp_path, tiny_model, [
        {"name": "distil", "data": "raw", "teacher": {"model": str(tiny_model), "instructions": False},
         "set": {"losses": losses}}], eval={"tasks": [str(tmp_path / "sts.tsv")], "start": False})
    out = tmp_path / "out"
    result = PipelineRunner(load_pipeline(path), out).run()
    (record,) = result["stages"]
    assert record["teacher"] == str(tiny_model) and record["steps"] == 2
    table = pq.read_table(out / "data" / "distil" / "prepared" / "facts.parquet")
    assert {"teacher_query", "teacher_passage", "teacher_negative_1", "teacher_negative_2"} <= set(table.column_names)
    metrics = (out / "runs" / "distil" / "metrics.jsonl").read_text()
    assert '"distill_kl"' in metrics and '"margin_mse"' in metrics
    # another teacher: the stage's key changes, it runs again (and the teacher columns are redone)
    spec = yaml.safe_load(path.read_text())
    spec["stages"][0]["teacher"]["instructions"] = True
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    capsys.readouterr()
    PipelineRunner(load_pipeline(path), out).run()
    assert "distil: done (skipped)" not in capsys.readouterr().out
    info = (out / "data" / "distil" / "prepared" / "teacher_info.json").read_text()
    assert '"instructions": true' in info


def test_on_the_fly_teacher_stage(tiny_model, tmp_path):
    """teacher: {on_the_fly: true}: no teacher columns, the stage's training config runs the teacher per step."""
    import json

    losses = [{"name": "contrastive"}, {"name": "distill_kl", "weight": 0.5}]
    path = write_pipeline(tmp_path, tiny_model, [
        {"name": "fly", "data": "raw", "teacher": {"model": str(tiny_model), "on_the_fly": True},
         "set": {"losses": losses}}], eval={"tasks": [str(tmp_path / "sts.tsv")], "start": False})
    out = tmp_path / "out"
    PipelineRunner(load_pipeline(path), out).run()
    table = pq.read_table(out / "data" / "fly" / "prepared" / "facts.parquet")
    assert not any(c.startswith("teacher_") for c in table.column_names)
    run_config = json.loads((out / "runs" / "fly" / "config.json").read_text())["config"]
    assert run_config["teacher_model"] == str(tiny_model) and run_config["teacher_instructions"] is True
    assert '"distill_kl"' in (out / "runs" / "fly" / "metrics.jsonl").read_text()


def test_teacher_is_an_earlier_stage_trained_on_another_model(tiny_model, tiny_model_factory, tmp_path, capsys):
    """The seed's distillation variant: a stage trains the recipe on a larger model (`model:`), and a student
    stage from the pipeline's model distils from that stage's result (`teacher: {stage: ...}`)."""
    import json

    other = tiny_model_factory("qwen3")
    losses = [{"name": "contrastive"}, {"name": "distill_kl"}]
    stages = [{"name": "big", "model": str(other), "data": "raw"},
              {"name": "student", "from": "start", "data": "raw", "teacher": {"stage": "big", "precision": "auto"},
               "set": {"losses": losses}}]
    path = write_pipeline(tmp_path, tiny_model, stages, eval={"tasks": [str(tmp_path / "sts.tsv")], "start": False})
    out = tmp_path / "out"
    big, student = PipelineRunner(load_pipeline(path), out).run()["stages"]
    assert big["model_path"] == str(other) and student["model_path"] == str(tiny_model)
    assert student["teacher"] == big["result"]
    info = json.loads((out / "data" / "student" / "prepared" / "teacher_info.json").read_text())
    assert info["settings"]["teacher"] == big["result"] and info["settings"]["precision"] == "auto"
    assert '"distill_kl"' in (out / "runs" / "student" / "metrics.jsonl").read_text()
    # the teacher stage changes: it runs again, and so does the student that learns from it
    stages[0]["set"] = {"train_steps": 3}
    spec = yaml.safe_load(path.read_text())
    spec["stages"] = stages
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    capsys.readouterr()
    big2, student2 = PipelineRunner(load_pipeline(path), out).run()["stages"]
    assert "done (skipped)" not in capsys.readouterr().out
    assert big2["steps"] == 3 and student2["key"] != student["key"]
