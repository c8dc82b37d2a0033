"""`--set` as users type it: several KEY=VALUE pairs after one flag, the flag repeated, or both, in
`llm2emb train`, `llm2emb demo` and the seed's `run.py`."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from llm2emb.cli import build_parser
from llm2emb.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
F2LLM = str(ROOT / "configs" / "config.f2llm.json")
# one flag with two pairs, then the flag again; a quoted value with a space is one shell word
ARGS = ["--set", "train_steps=5", "experiment_id=my run", "--set", "learning_rate=0.001"]


@pytest.mark.parametrize("command", ["train", "demo"])
def test_set_takes_several_pairs_and_repeats(command):
    args = build_parser().parse_args([command, *ARGS])
    assert args.overrides == ["train_steps=5", "experiment_id=my run", "learning_rate=0.001"]
    assert build_parser().parse_args([command]).overrides == []


def _check_printed(out: str) -> None:
    cfg = json.loads(out)
    assert (cfg["train_steps"], cfg["experiment_id"], cfg["learning_rate"]) == (5, "my run", 0.001)


def test_train_cli_applies_every_pair(capsys):
    assert cli_main(["train", "--config", F2LLM, *ARGS, "--print-config"]) == 0
    _check_printed(capsys.readouterr().out)


def test_run_py_applies_every_pair(monkeypatch, capsys):
    """run.py (the seed's `accelerate launch ... run.py --config ...`) parses --set the same way."""
    monkeypatch.setattr(sys, "argv", ["run.py", "--config", F2LLM, *ARGS, "--print-config"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    assert exit_.value.code == 0
    _check_printed(capsys.readouterr().out)


def test_later_pair_wins():
    """Pairs keep their order, so the last value of a field given twice is the one used."""
    from llm2emb.config import load_train_config

    args = build_parser().parse_args(["train", "--set", "train_steps=5", "train_steps=7", "--set", "train_steps=9"])
    assert load_train_config(F2LLM, args.overrides).train_steps == 9
