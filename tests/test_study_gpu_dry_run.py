"""The seed's GPU study (`studies/seed_configs.gpu.yaml`) with only its `launcher` section changed: `--dry-run`
prints the accelerate commands for one 8-GPU node, the commands of 8 cells side by side, and the sbatch script of
a SLURM cluster (one node per cell), with device-hours and wall time. Nothing here has a GPU: the text is checked."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from llm2emb.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_study(tmp_path, monkeypatch):
    """A copy of the repository's GPU study beside copies of configs/ and a one-dataset training_data/ folder; the
    model's size is given (no hub here) so the estimate has numbers."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "studies").mkdir()
    (tmp_path / "training_data").mkdir()
    # one small dataset in F2LLM's columns: the dry run checks data.input as prepare would read it
    (tmp_path / "training_data" / "msmarco.jsonl").write_text(
        '{"query": "what is a cat", "passage": "a small feline", "negative_1": "a car"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("llm2emb.study.estimate.non_embedding_parameters", lambda model: 440_000_000)
    text = (REPO / "studies" / "seed_configs.gpu.yaml").read_text(encoding="utf-8")

    def write(launcher: dict) -> Path:
        path = tmp_path / "studies" / "seed_configs.gpu.yaml"
        path.write_text(text + "\n" + yaml.safe_dump({"launcher": launcher}), encoding="utf-8")
        return path
    return write


def _dry_run(path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["study", str(path), "--dry-run", "--output", str(path.parent.parent / "out")]) == 0
    return capsys.readouterr().out


def test_one_node_with_eight_gpus_deepspeed_per_cell(gpu_study, capsys):
    out = _dry_run(gpu_study({"kind": "accelerate", "config_file": "../configs/accelerate_config.yaml",
                              "num_processes": 8}), capsys)
    root = Path.cwd()
    lines = [line.strip() for line in out.splitlines() if "accelerate launch" in line]
    assert len(lines) == 12
    assert lines[0] == (f"f2llm.seed1: {Path(sys.executable).parent / 'accelerate'} launch --config_file "
                        f"{root / 'configs' / 'accelerate_config.yaml'} --num_processes 8 --deepspeed_config_file "
                        f"{root / 'configs' / 'deepspeed_zero2.json'} --main_process_port 29500 -m "
                        f"llm2emb.study.cell {root / 'out' / 'cells' / '.f2llm.seed1.spec.json'}")
    assert "launcher: accelerate, 8 process(es) per cell, 1 cell(s) at a time" in out
    assert "device-hours" in out and "(+12 cell(s) not estimable)" not in out


def test_eight_cells_side_by_side(gpu_study, capsys):
    out = _dry_run(gpu_study({"kind": "local", "max_parallel": 8, "devices": [[i] for i in range(8)]}), capsys)
    lines = [line.strip() for line in out.splitlines() if "-m llm2emb.study.cell" in line]
    assert len(lines) == 12
    assert [line.split()[1] for line in lines[:9]] == [f"CUDA_VISIBLE_DEVICES={i}" for i in range(8)] + \
        ["CUDA_VISIBLE_DEVICES=0"]
    assert "8 cell(s) at a time x 1 process(es)" in out


def test_slurm_one_node_per_cell(gpu_study, capsys):
    out = _dry_run(gpu_study({"kind": "slurm", "partition": "gpu", "gpus_per_node": 8,
                              "accelerate_config": "../configs/accelerate_config.yaml", "cpus_per_task": 64,
                              "mem": "480G", "time": "24:00:00", "account": "my_account", "max_parallel": 4}),
                   capsys)
    for line in ("#SBATCH --array=0-11%4", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=1", "#SBATCH --time=1440",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my_account", "#SBATCH --requeue",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --mem=480G", "#SBATCH --signal=USR2@90"):
        assert f"  {line}\n" in out, line
    tasks = [line.strip() for line in out.splitlines() if "accelerate launch" in line]
    assert len(tasks) == 12 and tasks[11].startswith("11: mrl_spread.lora.bi_mean.seed3: ")
    assert "--num_processes 8" in tasks[0] and "--main_process_port 29511" in tasks[11]
