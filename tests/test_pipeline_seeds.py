"""A pipeline over seeds: one run per seed (each training stage's seed), the start row evaluated once, every
stage reported as mean +- std over the seeds with the change from the baseline (paired bootstrap averaged over
seeds, seeds where the stage was higher), resume, and the mistakes refused in one sentence."""
from __future__ import annotations

import json

import pytest
import yaml

from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.pipeline import load_pipeline
from llm2emb.pipeline.runner import PipelineRunner
from llm2emb.pipeline.seeds import SeedsRunner
from llm2emb.study.stats import mean_std
from test_pipeline import write_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = [{"name": "a", "data": "raw", "set": {"learning_rate": 3e-3}},
          {"name": "b", "from": "start", "data": "raw"}]


@pytest.fixture(scope="module")
def seeds_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-seeds")
    path = write_pipeline(root, tiny_model, STAGES, baseline="b", seeds=[1, 2])
    out = root / "out"
    assert main(["pipeline", str(path), "--output", str(out)]) == 0
    return root, path, out


def test_one_run_per_seed_with_its_seed(seeds_run):
    _, _, out = seeds_run
    records = {seed: {name: json.loads((out / f"seed-{seed}" / "stages" / name / "stage.json").read_text())
                      for name in ("start", "a", "b")} for seed in (1, 2)}
    for seed in (1, 2):
        config = json.loads((out / f"seed-{seed}" / "runs" / "a" / "config.json").read_text())["config"]
        assert config["seed"] == seed
    assert records[1]["a"]["key"] != records[2]["a"]["key"]
    assert records[1]["start"]["key"] == records[2]["start"]["key"]
    assert (out / "seed-1" / "report.md").exists() and (out / "report.md").exists()


def test_report_is_mean_and_std_over_seeds_with_baseline_intervals(seeds_run):
    _, _, out = seeds_run
    result = json.loads((out / "pipeline.json").read_text())
    assert result["seeds"] == [1, 2] and result["seeds_done"] == [1, 2]
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["start", "a", "b"]
    (row,) = stages["a"]["eval"]
    values = {seed: {name: json.loads((out / f"seed-{seed}" / "stages" / name / "stage.json").read_text())
                     ["eval"][row]["value"] for name in ("a", "b")} for seed in (1, 2)}
    mean, std = mean_std([values[1]["a"], values[2]["a"]])
    assert stages["a"]["eval"][row]["mean"] == pytest.approx(mean)
    assert stages["a"]["eval"][row]["std"] == pytest.approx(std)
    assert stages["a"]["eval"][row]["values"] == {"1": values[1]["a"], "2": values[2]["a"]}
    compared = result["comparisons"]["a"][row]
    diffs = [values[s]["a"] - values[s]["b"] for s in (1, 2)]
    assert compared["diff"] == pytest.approx(sum(diffs) / 2, abs=1e-4)
    assert compared["low"] <= compared["diff"] <= compared["high"]
    assert compared["better_seeds"] == sum(d > 0 for d in diffs) and compared["seeds"] == 2
    report = (out / "report.md").read_text()
    assert "over seeds 1, 2" in report and "±" in report
    assert f"({compared['better_seeds']}/2)" in report
    assert (out / "report.png").exists()


def test_start_is_evaluated_once_and_a_rerun_skips_everything(seeds_run, capsys):
    root, path, out = seeds_run
    capsys.readouterr()
    SeedsRunner(load_pipeline(path), out).run()
    text = capsys.readouterr().out
    assert "evaluating" not in text and "training" not in text
    assert text.count("done (skipped)") == 4
    # the start row was evaluated by one seed and shared: only one seed has its evaluation outputs
    assert sum((out / f"seed-{seed}" / "eval" / "start").exists() for seed in (1, 2)) == 1
    # --seeds adds a seed: only its stages run
    assert main(["pipeline", str(path), "--output", str(out), "--seeds", "1", "2", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("done (skipped)") == 4 and text.count("training from") == 2
    assert json.loads((out / "pipeline.json").read_text())["seeds_done"] == [1, 2, 3]


def test_seed_mistakes_are_one_sentence(seeds_run, tiny_model, tmp_path, capsys):
    root, path, out = seeds_run
    for seeds, message in (([1, 1], "lists a seed twice"), ([], "non-empty list"), ("3", "non-empty list")):
        bad = write_pipeline(tmp_path / "bad", tiny_model, STAGES, seeds=seeds)
        with pytest.raises(UserError, match=message):
            load_pipeline(bad)
    with pytest.raises(UserError, match="--set seed=... and seeds both"):
        load_pipeline(path, {"seed": 3})
    stage_seed = write_pipeline(tmp_path / "stage_seed", tiny_model,
                                [{"name": "a", "data": "raw", "set": {"seed": 5}}], seeds=[1, 2])
    assert main(["pipeline", str(stage_seed), "--dry-run"]) == 2
    assert "stage 'a' sets seed" in capsys.readouterr().err
    # a seeds folder is not continued as a single run, nor a single run's folder as a seeds run
    single = yaml.safe_load(path.read_text())
    del single["seeds"]
    single_path = root / "single.yaml"
    single_path.write_text(yaml.safe_dump(single, sort_keys=False))
    with pytest.raises(UserError, match="holds a seeds run of pipeline 'tiny'"):
        PipelineRunner(load_pipeline(single_path), out).check_output()
    with pytest.raises(UserError, match="holds a single-seed run of pipeline 'tiny'.*seed-<its seed>"):
        SeedsRunner(load_pipeline(path), out / "seed-1").check_output()
    assert main(["pipeline", str(path), "--output", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "seeds 1, 2: one run each in" in capsys.readouterr().out


def test_a_moved_single_run_joins_a_seeds_run(tiny_model, tmp_path, capsys):
    """A single-seed run moved to <output>/seed-<its seed>/ is reused (its records' absolute result paths
    are found again in the moved folder)."""
    path = write_pipeline(tmp_path, tiny_model, [*STAGES, {"name": "soup", "merge": {"stages": ["a", "b"]}}])
    single = tmp_path / "single"
    assert main(["pipeline", str(path), "--output", str(single), "--set", "seed=7"]) == 0
    (tmp_path / "seeds").mkdir()
    single.rename(tmp_path / "seeds" / "seed-7")
    capsys.readouterr()
    assert main(["pipeline", str(path), "--output", str(tmp_path / "seeds"), "--seeds", "7"]) == 0
    text = capsys.readouterr().out
    assert text.count("done (skipped)") == 3 and "training" not in text and "merging" not in text
