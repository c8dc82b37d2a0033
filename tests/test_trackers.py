"""Experiment trackers (`report_to`, `run_name`) through accelerate's tracker classes, with the real libraries and
no server: TensorBoard event files, MLflow (mlflow-skinny) with an explicit local file store, W&B offline."""
from __future__ import annotations


import pytest

from llm2emb.config import load_train_config, parse_overrides
from llm2emb.errors import UserError
from llm2emb import trackers
from llm2emb.train.run_info import RESUMABLE_FIELDS
from test_train_support import prepare_data, quick_overrides, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_defaults_and_set():
    cfg = load_train_config(None, ["model_path=m", "experiment_id=e", "train_data_path=d"])
    assert cfg.report_to == ["tensorboard"] and cfg.run_name == ""
    assert parse_overrides(["report_to=wandb,mlflow", "run_name=try 1"]) == {"report_to": ["wandb", "mlflow"],
                                                                           "run_name": "try 1"}
    assert {"report_to", "run_name"} <= RESUMABLE_FIELDS  # a tracker change never retrains a run or study cell


def test_unknown_tracker_is_one_sentence_with_did_you_mean():
    with pytest.raises(UserError, match=r"report_to has unknown tracker 'tensorbord'.*Did you mean 'tensorboard'\?"):
        load_train_config(None, ["model_path=m", "experiment_id=e", "train_data_path=d", "report_to=tensorbord"])


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "neptune", trackers.TrackerKind("neptune", "no_such_module_xyz",
                                                                           "neptune", lambda cfg, run_dir: None))
    with pytest.raises(UserError, match=r"report_to 'neptune' needs the no_such_module_xyz package: "
                                        r"pip install 'llm2emb\[neptune\]'\.$"):
        trackers.check_report_to(["neptune"], "cfg.yaml")


def test_training_reports_to_tensorboard_mlflow_and_wandb(tmp_path, monkeypatch, tiny_model):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    import mlflow
    from llm2emb.train.trainer import train

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"   # explicit local store, no server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    data = prepare_data(tiny_model, write_raw_data(tmp_path / "raw", 16, 8, k=2), tmp_path / "tok")
    overrides = quick_overrides(tiny_model, data, tmp_path, steps=2, report_to=["tensorboard", "mlflow", "wandb"],
                                run_name="tracked")
    cfg = load_train_config(None, overrides)
    result = train(cfg, show_progress=False)
    assert not result.already_complete

    assert list((tmp_path / "tb" / "exp").glob("events.out.tfevents.*"))       # as before: tb_dir/experiment_id
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["llm2emb"], output_format="list")
    assert [r.info.run_name for r in runs] == ["tracked"]
    assert "train/loss" in runs[0].data.metrics and runs[0].data.params["experiment_id"] == "exp"
    offline = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))

    # changing only the trackers or the run name is the same run: finished, not trained again
    again = load_train_config(None, overrides + ["report_to=[]", "run_name=other"])
    assert train(again, show_progress=False).already_complete
