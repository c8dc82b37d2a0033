"""`llm2emb demo`: the pipeline on a tiny model (fast), and the real demo with fewer steps (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm2emb.cli import main as cli_main
from llm2emb.commands.demo import DEMO_RECIPE, METRICS, results_table
from test_train_support import CONFIGS


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_recipe_matches_configs_quickstart():
    """`llm2emb train --config configs/quickstart.json` trains exactly what the demo trains."""
    from llm2emb.config import load_train_config

    data = json.loads((CONFIGS / "quickstart.json").read_text())
    assert {k: v for k, v in data.items() if k in DEMO_RECIPE} == DEMO_RECIPE
    assert set(DEMO_RECIPE) <= set(data)
    load_train_config(CONFIGS / "quickstart.json")  # valid


def test_results_table_is_markdown():
    table = results_table([{"label": "base", "metrics": {"ndcg_at_10": 0.0631, "mrr_at_10": 0.05,
                                                         "recall_at_10": 0.1}, "time": "eval 50s"}])
    lines = table.splitlines()
    assert lines[0] == "| model | nDCG@10 | MRR@10 | Recall@10 | time |"
    assert lines[2] == "| base | 0.063 | 0.050 | 0.100 | eval 50s |"
    assert len(METRICS) == 3


@pytest.mark.usefixtures("one_thread")
def test_demo_pipeline_on_a_tiny_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--model", str(tiny_model), "--steps", "3", "--eval-limits", "40",
            "--set", "log_interval=1"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| model | nDCG@10 | MRR@10 | Recall@10 | time |" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert results["steps"] == 3 and results["eval_queries"] == 40
    assert set(results["base"]["metrics"]) >= {"ndcg_at_10", "mrr_at_10", "recall_at_10"}
    assert (out / "demo_results.png").stat().st_size > 1000
    run = Path(results["run_dir"])
    assert (run / "final" / "adapter_config.json").exists() and (run / "eval" / "stdlib_code.json").exists()
    # a second run reuses data, base evaluation, training and the trained evaluation
    summary = (run / "train_summary.json").read_text()
    assert cli_main(args) == 0
    assert (run / "train_summary.json").read_text() == summary
    again = json.loads((out / "demo_results.json").read_text())
    assert again["trained"] == results["trained"] and again["base"] == results["base"]


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert cli_main(["demo", "--output", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_with_smollm2_beats_the_base_model(smollm2_dir, tmp_path, capsys):
    """The real demo, shortened to 30 steps and 200 queries: training must clearly beat the base model."""
    out = tmp_path / "demo"
    assert cli_main(["demo", "--output", str(out), "--steps", "30", "--eval-limits", "200", "--no-plot"]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    base, trained = results["base"]["metrics"], results["trained"]["metrics"]
    assert trained["ndcg_at_10"] > base["ndcg_at_10"] + 0.15, (base, trained)
    assert trained["recall_at_10"] > base["recall_at_10"]
