"""Data-parallel evaluation: `llm2emb eval` under 2 CPU processes (torchrun) splits corpus and query encoding,
gathers the shards in order, and gives the one-process vectors (float tolerance) and metrics; the embedding
cache written by the main process is read by the next 2-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm2emb.eval.distributed import encode_data_parallel, shard_bounds
from test_study import write_tasks


def test_shards_cover_every_row_once_in_order():
    for n in (0, 1, 5, 6, 7):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_one_process_is_a_plain_call():
    calls = []
    out = encode_data_parallel(lambda part: calls.append(part) or np.ones((len(part), 2)), ["a", "b", "c"])
    assert calls == [["a", "b", "c"]] and out.shape == (3, 2)


def _eval(model: Path, tasks: str, out: Path, cache: Path, processes: int) -> subprocess.CompletedProcess:
    args = ["-m", "llm2emb", "eval", "--model", str(model), "--pooling", "mean", "--tasks", tasks, "--output",
            str(out), "--cache-dir", str(cache), "--no-progress", "--max-length", "32", "--batch-size", "2",
            # fp32: shards change which texts share a padded batch, which moves bf16 results by ~1e-3
            "--precision", "fp32"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_process_eval_equals_one_process(tiny_model, tmp_path):
    beir, sts = write_tasks(tmp_path)
    tasks = f"{beir},{sts}"
    one = _eval(tiny_model, tasks, tmp_path / "one", tmp_path / "cache1", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _eval(tiny_model, tasks, tmp_path / "two", tmp_path / "cache2", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model:") == 1                         # only the main process prints and writes
    records = {}
    for run in ("one", "two"):
        files = sorted((tmp_path / run).glob("*.json"))
        assert len(files) == 2
        records[run] = [json.loads(f.read_text()) for f in files]
    for a, b in zip(records["one"], records["two"]):
        assert a["task"]["name"] == b["task"]["name"]
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6)
    # the corpus vectors in the cache: the 2-process run gathered the shards in the original order
    (v1,) = [np.load(p) for p in (tmp_path / "cache1").glob("*.npy")]
    (v2,) = [np.load(p) for p in (tmp_path / "cache2").glob("*.npy")]
    assert v1.shape == v2.shape == (6, v1.shape[1])
    np.testing.assert_allclose(v2, v1, atol=1e-5)
    again = _eval(tiny_model, tasks, tmp_path / "again", tmp_path / "cache2", 2)
    assert again.returncode == 0 and "read from the cache" in again.stderr
