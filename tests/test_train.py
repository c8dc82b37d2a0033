"""Training end to end on tiny random models (fast): the four seed configs, run layout, logging, validation,
checkpoints, resume of a finished / interrupted run, NaN handling and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llm2emb.cli import main as cli_main
from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from test_train_support import (CONFIGS, SEED_CONFIGS, prepare_data, quick_overrides, read_metrics,
                                trainable_state, write_raw_data)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    return write_raw_data(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def prepared(tiny_model, raw_data, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, raw_data, tmp_path_factory.mktemp("tok"))


def _cfg(config: str | None, tiny_model, prepared, tmp_path, **extra):
    path = CONFIGS / config if config else None
    return load_train_config(path, quick_overrides(tiny_model, prepared, tmp_path, **extra))


def _train(cfg, **kw):
    from llm2emb.train import train

    return train(cfg, show_progress=False, **kw)


@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_seed_config_trains_on_cpu(config, tiny_model, prepared, tmp_path, capsys):
    """`llm2emb train --config <seed config> --set model_path=<tiny> train_data_path=<prepared> ...` works and
    leaves the documented run layout."""
    overrides = quick_overrides(tiny_model, prepared, tmp_path, steps=4)
    if "mrl" in config:
        overrides.append("mrl_dims=16,32")  # the tiny model's embeddings have 64 dimensions
    args = ["train", "--config", str(CONFIGS / config), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert cli_main(args) == 0
    assert "final model" in capsys.readouterr().out
    run = tmp_path / "runs" / "exp"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["model_path"] == str(tiny_model)
    assert saved["config"]["pooling_mode"] == json.loads((CONFIGS / config).read_text())["pooling_mode"]
    assert {"torch", "transformers", "peft", "accelerate"} <= set(saved["versions"])
    assert "git_commit" in saved and saved["launch"]["num_processes"] == 1
    # checkpoints every 2 steps (the last step is the final model, not a checkpoint)
    ckpt = run / "checkpoints" / "step_2"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "state" / "optimizer.bin").exists()
    assert (ckpt / "model" / "llm2emb_config.json").exists()
    assert not (run / "checkpoints" / "step_4").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["batcher"]["position"] == 2
    # metrics: a train line per step, validation every 2 steps
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if m["type"] == "train"] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if m["type"] == "validation"] == [2, 4]
    assert all(m["loss"] is not None and m["loss"] > 0 for m in metrics)
    assert all({"lr", "samples_per_s", "grad_norm"} <= set(m) for m in metrics if m["type"] == "train")
    if "spread" in config:
        assert all("spread_out" in m for m in metrics if m["type"] == "train")
    assert list((tmp_path / "tb" / "exp").glob("events.out.tfevents.*"))
    # the final model loads on its own and embeds
    from llm2emb import Embedder

    emb = Embedder.from_pretrained(run / "final")
    assert emb.is_lora == ("lora" in config)
    assert emb.config.bidirectional == ("bi_mean" in config)
    vectors = emb.encode(["hello world", "sorting lists"])
    assert vectors.shape == (2, 64) and abs(float((vectors[0] ** 2).sum()) - 1) < 1e-4
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 4


def test_training_reduces_loss_and_changes_weights(tiny_model, prepared, tmp_path):
    cfg = _cfg(None, tiny_model, prepared, tmp_path, steps=16, learning_rate=3e-3, pooling_mode="mean",
               validation_steps=8, checkpointing_steps=0, num_hard_neg=0, min_lr=0)
    result = _train(cfg)
    valid = [m["loss"] for m in read_metrics(cfg.run_dir) if m["type"] == "validation"]
    assert len(valid) == 2 and result.last_validation["loss"] == pytest.approx(valid[1])
    from llm2emb import Embedder

    base = Embedder.from_pretrained(tiny_model, pooling="mean")
    trained = Embedder.from_pretrained(result.final_dir)
    text = ["how are sorting lists handled?"]
    assert not torch.allclose(torch.from_numpy(base.encode(text)), torch.from_numpy(trained.encode(text)))
    # validation loss after 16 steps is lower than after 8 (the task is easy and the lr is high)
    assert valid[1] < valid[0], valid
    assert not (cfg.run_dir / "checkpoints").exists()  # checkpointing_steps=0: final model only


def test_rerun_of_finished_run_does_nothing(tiny_model, prepared, tmp_path):
    cfg = _cfg(None, tiny_model, prepared, tmp_path, steps=2)
    _train(cfg)
    before = trainable_state(cfg.run_dir / "final")
    again = _train(cfg)
    assert again.already_complete
    after = trainable_state(cfg.run_dir / "final")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_resume_ignores_interrupted_checkpoints(tiny_model, prepared, tmp_path):
    """A crash after step 4's checkpoint: the rerun resumes from step 4, ignoring a step_6 folder that lacks
    trainer_state.json and a .partial folder, and ends with the same weights as an uninterrupted run."""
    full = _cfg("config.mrl_spread.lora.bi_mean.json", tiny_model, prepared, tmp_path / "a", steps=8,
                mrl_dims=[16, 32], checkpointing_steps=2)
    _train(full)
    crashed = _cfg("config.mrl_spread.lora.bi_mean.json", tiny_model, prepared, tmp_path / "b", steps=8,
                   mrl_dims=[16, 32], checkpointing_steps=2)
    _train(crashed)
    run = crashed.run_dir
    # roll the run back to "killed after the step-4 checkpoint, while writing step 6"
    for name in ("final", "train_summary.json"):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    ckpts = run / "checkpoints"
    (ckpts / "step_6" / "trainer_state.json").unlink()
    shutil.copytree(ckpts / "step_4", ckpts / ".step_8.partial")
    before = json.loads((ckpts / "step_4" / "trainer_state.json").read_text())["train_seconds"]
    result = _train(crashed)
    assert result.resumed_from == 4
    # the run's training time counts the first process's seconds too
    assert json.loads((run / "train_summary.json").read_text())["train_seconds"] >= before + result.train_seconds - 1e-3
    assert before > 0
    assert not (ckpts / ".step_8.partial").exists()
    a, b = trainable_state(full.run_dir / "final"), trainable_state(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_metrics(run) if m["type"] == "train"]
    assert steps == list(range(1, 9))  # lines after the checkpoint were dropped and logged again


def test_nan_loss_is_skipped_then_stops(tiny_model, prepared, tmp_path, monkeypatch, caplog):
    from llm2emb.losses import EmbeddingObjective
    from llm2emb.train import TrainingDiverged

    original = EmbeddingObjective.forward
    calls = {"n": 0}

    def one_nan(self, q, p, n, use_inbatch, **keys):
        out = original(self, q, p, n, use_inbatch, **keys)
        calls["n"] += 1
        if calls["n"] == 2 and self.training:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(EmbeddingObjective, "forward", one_nan)
    result = _train(_cfg(None, tiny_model, prepared, tmp_path / "one", steps=4, validation_steps=0))
    assert result.skipped_steps == 1 and result.steps == 4
    assert "not finite" in caplog.text

    def always_nan(self, q, p, n, use_inbatch, **keys):
        out = original(self, q, p, n, use_inbatch, **keys)
        out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(EmbeddingObjective, "forward", always_nan)
    cfg = _cfg(None, tiny_model, prepared, tmp_path / "all", steps=20, validation_steps=0, checkpointing_steps=3)
    with pytest.raises(TrainingDiverged, match="NaN or infinite for 5 steps in a row"):
        _train(cfg)
    assert not (cfg.run_dir / "final").exists()
    assert isinstance(TrainingDiverged("x"), UserError)  # the CLI prints it without a traceback


def test_raw_data_is_rejected_with_prepare_hint(tiny_model, raw_data, tmp_path):
    cfg = _cfg(None, tiny_model, raw_data, tmp_path)
    with pytest.raises(UserError, match="llm2emb prepare"):
        _train(cfg)
    assert not cfg.run_dir.exists()  # nothing written


def test_tokenizer_mismatch_is_rejected(tiny_model, prepared, tmp_path):
    other = tmp_path / "other_tok"
    shutil.copytree(prepared, other)
    info = json.loads((other / "prepare_info.json").read_text())
    info["tokenizer"], info["tokenizer_fingerprint"] = "Qwen/Qwen3-0.6B", "0" * 64
    (other / "prepare_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="tokenised with 'Qwen/Qwen3-0.6B'.*llm2emb prepare --model"):
        _train(_cfg(None, tiny_model, other, tmp_path))


def test_output_dir_of_another_experiment_is_refused(tiny_model, prepared, tmp_path):
    _train(_cfg(None, tiny_model, prepared, tmp_path, steps=2))
    changed = _cfg(None, tiny_model, prepared, tmp_path, steps=2, learning_rate=5e-4)
    with pytest.raises(UserError, match="holds a different experiment: learning_rate"):
        _train(changed)
    # a field that does not change what is trained (logging) is fine: the run is recognised as complete
    assert _train(_cfg(None, tiny_model, prepared, tmp_path, steps=2, log_interval=5)).already_complete
    stray = tmp_path / "stray"
    (stray / "exp").mkdir(parents=True)
    (stray / "exp" / "notes.txt").write_text("mine")
    cfg = _cfg(None, tiny_model, prepared, tmp_path, output_dir=str(stray))
    with pytest.raises(UserError, match="not an llm2emb run"):
        _train(cfg)


def test_mrl_dims_larger_than_embedding_are_rejected(tiny_model, prepared, tmp_path):
    cfg = _cfg("config.mrl_spread.json", tiny_model, prepared, tmp_path)  # [128, 256] > 64
    with pytest.raises(UserError, match="mrl_dims.*64-dimensional"):
        _train(cfg)


def test_cli_reports_user_errors_without_traceback(tiny_model, prepared, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_path": "x",\n  "learning_rate": 1e-4,,\n}')
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2, column" in err and "Traceback" not in err
    assert cli_main(["train", "--config", str(CONFIGS / "config.f2llm.json"), "--set", "lerning_rate=1"]) == 2
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err


def test_merge_writes_merged_model_with_same_vectors(tiny_model, prepared, tmp_path):
    cfg = _cfg("config.mrl_spread.lora.bi_mean.json", tiny_model, prepared, tmp_path, steps=2,
               mrl_dims=[16, 32], learning_rate=1e-2)
    result = _train(cfg, merge=True)
    from llm2emb import Embedder

    adapter = Embedder.from_pretrained(result.final_dir)
    merged = Embedder.from_pretrained(cfg.run_dir / "final_merged")
    assert adapter.is_lora and not merged.is_lora
    texts = ["Instruct: find the module.\nQuery: how are sorting lists handled?", "hashing files"]
    assert torch.allclose(torch.from_numpy(adapter.encode(texts)), torch.from_numpy(merged.encode(texts)),
                          atol=1e-5)


def test_trainable_head_and_pooling_are_trained_and_saved(tiny_model, prepared, tmp_path):
    """A linear head and attention pooling train alongside LoRA, are checkpointed and saved with the model."""
    cfg = _cfg(None, tiny_model, prepared, tmp_path, steps=3, checkpointing_steps=2, lora_enabled=True,
               head="linear", head_dim=32, pooling_mode="attention", mrl_enabled=True, mrl_dims=[16])
    result = _train(cfg)
    from safetensors.torch import load_file

    from llm2emb import Embedder

    state = load_file(str(cfg.run_dir / "checkpoints" / "step_2" / "state" / "model.safetensors"))
    assert any(".head." in k for k in state) and any(".pooling." in k for k in state)
    assert any("lora_A" in k for k in state) and not any("embed_tokens" in k for k in state)
    emb = Embedder.from_pretrained(result.final_dir)
    assert emb.embedding_dim == 32 and emb.encode(["x"]).shape == (1, 32)
    assert (result.final_dir / "modules.safetensors").exists()


def test_run_from_before_a_new_config_field_is_still_the_same_experiment(tmp_path):
    """A run saved by an older llm2emb lacks fields added since; it ran with their defaults."""
    from llm2emb.train.run_info import check_run_dir

    cfg = load_train_config(None, ["model_path=m", "experiment_id=e", "train_data_path=d",
                                   f"output_dir={tmp_path}"])
    saved = cfg.to_dict()
    del saved["tf32"]
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps({"config": saved}))
    assert check_run_dir(cfg) is True
    cfg.tf32 = False  # not the default: a different experiment
    with pytest.raises(UserError, match="tf32"):
        check_run_dir(cfg)
