"""Periodic evaluation during training (`eval_steps` / `eval_tasks`): the main scores land in metrics.jsonl as
"eval" entries at every N steps and at the end, a resumed run does not log a step twice, a study cell carries
them as its curve, and bad settings are one-sentence errors before training starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from test_train_support import prepare_data, quick_overrides, read_metrics, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tasks")
    sts = root / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta kitten\t4.5\na dog\ta car\t0.5\nthe sun\tthe moon\t2.0\n"
                   "red apple\tgreen apple\t3.0\n")
    beir = root / "mini"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(["cats purr", "dogs bark", "cars drive"])))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(["a cat", "a dog", "a car"])))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n")
    return [str(sts), str(beir)]


def test_eval_entries_every_n_steps_and_at_the_end(tiny_model, prepared, tasks, tmp_path):
    from llm2emb.train import train

    overrides = quick_overrides(tiny_model, prepared, tmp_path, steps=5, eval_steps=2, eval_tasks=tasks,
                                checkpointing_steps=0, validation_steps=0, pooling_mode="mean")
    train(load_train_config(None, overrides), show_progress=False)
    evals = [m for m in read_metrics(tmp_path / "runs" / "exp") if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 5]
    for entry in evals:
        scores = {k: v for k, v in entry.items() if k not in ("type", "step")}
        sts = next(k for k in scores if k.endswith("sts/cosine_spearman"))
        assert set(scores) == {sts, "mini/ndcg_at_10"}
        assert -1 <= scores[sts] <= 1 and 0 <= scores["mini/ndcg_at_10"] <= 1


def test_resume_does_not_log_a_step_twice(tiny_model, prepared, tasks, tmp_path):
    from llm2emb.train import train

    first = quick_overrides(tiny_model, prepared, tmp_path, steps=4, eval_steps=2, eval_tasks=tasks[:1],
                            checkpointing_steps=2, validation_steps=0)
    train(load_train_config(None, first), show_progress=False)
    run = tmp_path / "runs" / "exp"
    # as if killed right after the step-4 evaluation, before the final model: resume from step 2
    import shutil

    shutil.rmtree(run / "final")
    (run / "summary.json").unlink(missing_ok=True)
    for step_dir in (run / "checkpoints").glob("step_4"):
        shutil.rmtree(step_dir)
    train(load_train_config(None, first), show_progress=False)
    assert [m["step"] for m in read_metrics(run) if m["type"] == "eval"] == [2, 4]


@pytest.mark.parametrize("fields, match", [
    ({"eval_steps": 5}, "eval_tasks' is empty but eval_steps is 5"),
    ({"eval_steps": -1, "eval_tasks": ["builtin:stdlib"]}, "eval_steps' must be >= 0"),
    ({"eval_steps": 5, "eval_tasks": ["x"], "eval_limits": 0}, "eval_limits' must be >= 1"),
])
def test_bad_settings_are_user_errors(fields, match):
    with pytest.raises(UserError, match=match):
        load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", **fields)


def test_a_missing_task_fails_before_training(tiny_model, prepared, tmp_path):
    from llm2emb.train import train

    overrides = quick_overrides(tiny_model, prepared, tmp_path, steps=2, eval_steps=1,
                                eval_tasks=[str(tmp_path / "nope.tsv")])
    with pytest.raises(UserError, match="eval_tasks: .*does not exist"):
        train(load_train_config(None, overrides), show_progress=False)
    assert not (tmp_path / "runs" / "exp" / "metrics.jsonl").exists()
