"""Two CPU processes through the seed's launch path: `accelerate launch --config_file
configs/accelerate_cpu.yaml run.py --config <seed config>` trains, and its gradients equal one process on the
same global batch (embeddings gathered with gradients, loss weighted for DDP's averaging)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_support import (CONFIGS, ROOT, prepare_data, quick_overrides, read_metrics, trainable_state,
                                write_raw_data)

pytestmark = pytest.mark.slow
CONFIG = CONFIGS / "config.mrl_spread.lora.bi_mean.json"


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    raw = write_raw_data(tmp_path_factory.mktemp("raw"), retrieval_rows=64, classification_rows=32)
    return prepare_data(tiny_model, raw, tmp_path_factory.mktemp("tok"))


def _overrides(tiny_model, prepared, out: Path, batch_size: int) -> list[str]:
    # lora_dropout=0: the two launches would otherwise draw different dropout masks. validation_fraction 0.25
    # gives 16 + 8 held-out rows, whole global batches of 4 (a last partial batch of 1 row would be skipped
    # by two processes, which cannot split it, but used by one).
    return quick_overrides(tiny_model, prepared, out, steps=4, train_batch_size=batch_size, mrl_dims=[16, 32],
                           lora_dropout=0.0, checkpointing_steps=2, validation_steps=2, learning_rate=1e-3,
                           validation_fraction=0.25)


def _launch(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.parametrize("grad_cache", [0, 1], ids=["plain", "grad_cache"])
def test_two_cpu_processes_match_one_process(tiny_model, prepared, tmp_path, grad_cache):
    """grad_cache=1: the two processes embed their rows one at a time (GradCache), gather the cached
    embeddings with gradient and all-reduce once; the result still equals one uncached process."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    two = tmp_path / "two"
    cmd = [accelerate, "launch", "--config_file", str(CONFIGS / "accelerate_cpu.yaml"), str(ROOT / "run.py"),
           "--config", str(CONFIG), "--no-progress", "--set", f"grad_cache_chunk_size={grad_cache}"]
    for item in _overrides(tiny_model, prepared, two, batch_size=2):
        cmd += ["--set", item]
    _launch(cmd)
    one = tmp_path / "one"
    cmd = [sys.executable, str(ROOT / "run.py"), "--config", str(CONFIG), "--no-progress"]
    for item in _overrides(tiny_model, prepared, one, batch_size=4):
        cmd += ["--set", item]
    _launch(cmd)

    run2, run1 = two / "runs" / "exp", one / "runs" / "exp"
    launch = json.loads((run2 / "config.json").read_text())["launch"]
    assert launch["num_processes"] == 2 and launch["global_batch_size"] == 4
    ckpt = run2 / "checkpoints" / "step_2" / "state"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()

    m2 = [m for m in read_metrics(run2) if m["type"] == "train"]
    m1 = [m for m in read_metrics(run1) if m["type"] == "train"]
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [1, 2, 3, 4]
    # Same global batch, same gradient: equal up to float summation order.
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-4)
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-3)
    for a, b in zip(m2, m1):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    v2 = [m["loss"] for m in read_metrics(run2) if m["type"] == "validation"]
    v1 = [m["loss"] for m in read_metrics(run1) if m["type"] == "validation"]
    assert len(v2) == len(v1) == 2 and v2 == pytest.approx(v1, rel=2e-3)
    w2, w1 = trainable_state(run2 / "final"), trainable_state(run1 / "final")
    assert w2.keys() == w1.keys()
    assert all(torch.allclose(w2[k], w1[k], atol=2e-4) for k in w1)


@pytest.mark.parametrize("config", ["config.f2llm.json", "config.mrl_spread.bi_mean.json"])
def test_seed_configs_with_torchrun(config, tiny_model, prepared, tmp_path):
    """The other launch path of DESIGN.md: torchrun with two CPU processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "run.py"), "--config", str(CONFIGS / config), "--no-progress"]
    overrides = quick_overrides(tiny_model, prepared, tmp_path, steps=3, train_batch_size=2)
    if "mrl" in config:
        overrides.append("mrl_dims=16,32")
    for item in overrides:
        cmd += ["--set", item]
    _launch(cmd)
    summary = json.loads((tmp_path / "runs" / "exp" / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 3
