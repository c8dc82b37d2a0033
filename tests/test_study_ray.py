"""Studies on Ray (`launcher: {kind: ray}`): refusals before anything runs (no Ray, no cluster at the address) and
(slow) a local Ray instance running the study, one task per cell, with the local launcher's metrics."""
from __future__ import annotations

import json
import sys

import pytest

from test_study import run_study, study_inputs, write_study  # noqa: F401 - study_inputs is a fixture


def test_ray_missing_or_no_cluster_is_refused(study_inputs, tiny_model, tmp_path, capsys, monkeypatch):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, launcher={"kind": "ray", "address": "auto"})
    monkeypatch.setitem(sys.modules, "ray", None)
    assert run_study(spec, tmp_path / "out") == 2
    assert "pip install 'llm2emb[ray]'" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("ray")
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts,
                       launcher={"kind": "ray", "address": "127.0.0.1:1"})
    assert run_study(spec, tmp_path / "out") == 2
    assert "no Ray cluster at launcher.address '127.0.0.1:1'" in capsys.readouterr().err
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts,
                       launcher={"kind": "ray", "num_gpus": -1})
    assert run_study(spec, tmp_path / "out") == 2
    assert "launcher.num_gpus must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "logs").exists()


@pytest.mark.slow
def test_local_ray_instance_runs_the_study(study_inputs, tiny_model, tmp_path):
    """Two cells as two Ray tasks at once (one CPU each): the metrics equal the local launcher's; a failing cell
    is reported and the other finishes."""
    pytest.importorskip("ray")
    root, raw, beir, sts = study_inputs
    recipes = {"mean": {}, "broken": {"mrl_enabled": True, "mrl_dims": [4096]}}
    local = write_study(tmp_path / "local.json", tiny_model, raw, beir, sts, seeds=(1,), recipes={"mean": {}})
    assert run_study(local, tmp_path / "local") == 0
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1,), recipes=recipes,
                       launcher={"kind": "ray", "num_cpus": 1, "max_parallel": 2, "max_retries": 1})
    assert run_study(spec, tmp_path / "out") == 1
    cells = {c["recipe"]: c for c in json.loads((tmp_path / "out" / "study.json").read_text())["cells"]}
    assert cells["broken"]["status"] == "failed" and "4096" in cells["broken"]["error"]
    local_cell = json.loads((tmp_path / "local" / "study.json").read_text())["cells"][0]
    assert cells["mean"]["metrics"] == local_cell["metrics"] and cells["mean"]["launcher"]["kind"] == "ray"
    assert "# ray task:" in (tmp_path / "out" / "logs" / "mean.seed1.log").read_text()
