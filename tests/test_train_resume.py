"""Exact resume: a CPU run killed with SIGKILL mid-way and started again with the same command ends with
the same weights, bit for bit, as a run that was never interrupted (optimizer, scheduler, RNG and data
position restored; LoRA dropout on, so the RNG state matters)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_support import (CONFIGS, ROOT, prepare_data, quick_overrides, read_metrics, trainable_state,
                                write_raw_data)

CONFIG = CONFIGS / "config.mrl_spread.lora.bi_mean.json"
STEPS = 15


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    raw = write_raw_data(tmp_path_factory.mktemp("raw"))
    return prepare_data(tiny_model, raw, tmp_path_factory.mktemp("tok"))


def _command(tiny_model, prepared, out: Path, grad_cache: int = 0) -> list[str]:
    cmd = [sys.executable, str(ROOT / "run.py"), "--config", str(CONFIG), "--no-progress",
           "--set", f"grad_cache_chunk_size={grad_cache}"]
    for item in quick_overrides(tiny_model, prepared, out, steps=STEPS, checkpointing_steps=3, validation_steps=6,
                                mrl_dims=[16, 32], log_interval=2):
        cmd += ["--set", item]
    return cmd


def _env() -> dict[str, str]:
    # Same thread count for every run (CPU kernels are deterministic for a fixed thread count).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("grad_cache", [0, 3], ids=["plain", "grad_cache"])
def test_kill_9_mid_run_then_resume_is_bit_exact(tiny_model, prepared, tmp_path, grad_cache):
    reference = tmp_path / "reference"
    _run(_command(tiny_model, prepared, reference, grad_cache))

    out = tmp_path / "killed"
    run_dir = out / "runs" / "exp"
    cmd = _command(tiny_model, prepared, out, grad_cache)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_6").exists():
            assert proc.poll() is None, f"run ended before its step-6 checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists(), "the run finished before it was killed; nothing was tested"

    _run(cmd)  # the same command again: resumes from the newest complete checkpoint
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == STEPS
    assert summary["resumed_from"] is not None and 6 <= summary["resumed_from"] < STEPS
    assert not list((run_dir / "checkpoints").glob(".*.partial"))

    expected = trainable_state(reference / "runs" / "exp" / "final")
    got = trainable_state(run_dir / "final")
    assert expected.keys() == got.keys() and len(expected) > 0
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    # the resumed run's log equals the uninterrupted one (drop the timing columns)
    def losses(run: Path) -> list[tuple]:
        return [(m["type"], m["step"], m["loss"]) for m in read_metrics(run)]
    assert losses(run_dir) == losses(reference / "runs" / "exp")
