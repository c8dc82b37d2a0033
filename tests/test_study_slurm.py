"""Studies on SLURM through submitit: refusals before submitting (no submitit, no sbatch, sbatch --test-only
rejecting the settings), the golden `--dry-run` sbatch script, the submit / status / collect loop against fake
`sbatch` / `srun` / `sacct` on the PATH, and (slow) submitit's local executor running the study, with a job
interrupted by the timeout signal requeued and resumed from its checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_study import run_study, study_inputs, write_study  # noqa: F401 - study_inputs is a fixture

pytest.importorskip("submitit")

SLURM = {"kind": "slurm", "partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem": "64G",
         "time": "01:30:00", "account": "emb", "sbatch_extra": ["--constraint=h100"], "max_parallel": 2,
         "setup": ["module load cuda"]}


def fake_slurm(folder: Path, sacct_lines: list[str] | None = None, test_only_error: str | None = None) -> Path:
    """sbatch (records every call, answers --test-only, prints a job id), srun, sacct (prints sacct.txt)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = folder / "sbatch_calls.txt"
    test_only = (f'echo "sbatch: error: {test_only_error}" >&2; exit 1' if test_only_error else "exit 0")
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
if [[ " $* " == *" --test-only "* ]]; then {test_only}; fi
echo "$@" >> {calls}
cat "$1" >> {folder / 'scripts.txt'}
echo "Submitted batch job 4242"
""")
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 0\n")
    (bin_dir / "sacct").write_text(f"#!/bin/bash\necho 'JobID|State|NodeList'\ncat {folder / 'sacct.txt'}\n")
    (folder / "sacct.txt").write_text("\n".join(sacct_lines or []) + "\n")
    for name in ("sbatch", "srun", "sacct"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_without_submitit_or_sbatch_is_refused(study_inputs, tiny_model, tmp_path, capsys, monkeypatch):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, launcher=SLURM)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert run_study(spec, tmp_path / "out") == 2
    assert "needs sbatch and srun on the PATH" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)      # import submitit -> ImportError
    assert run_study(spec, tmp_path / "out") == 2
    assert "pip install 'llm2emb[slurm]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "logs").exists()


@pytest.mark.parametrize("change, message", [
    ({"time": "an hour"}, "launcher.time must be a time limit"),
    ({"nodes": 2}, "a cell runs on one node"),
    ({"sbatch_extra": ["constraint=h100"]}, "must be an sbatch option such as --constraint=h100"),
    ({"partiton": "gpu"}, "launcher.partiton is not a field of the slurm launcher. Did you mean 'partition'"),
    ({"accelerate_config": "../missing.yaml", "gpus_per_node": 8}, "missing.yaml does not exist"),
    ({"devices": [[0]]}, "launcher.devices is for jobs on this machine"),
])
def test_bad_slurm_fields(study_inputs, tiny_model, tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}:{os.environ['PATH']}")
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, launcher={**SLURM, **change})
    assert run_study(spec, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sbatch_calls.txt").exists()


def test_sbatch_test_only_rejection_is_one_line_before_submitting(study_inputs, tiny_model, tmp_path, capsys,
                                                                  monkeypatch):
    bin_dir = fake_slurm(tmp_path, test_only_error="invalid partition specified: gpu")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, launcher=SLURM)
    assert run_study(spec, tmp_path / "out", "--detach") == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("sbatch rejects the launcher's settings: sbatch: error: invalid partition specified: "
                                "gpu") and err.count("\n") == 1
    assert not (tmp_path / "sbatch_calls.txt").exists()


def test_dry_run_prints_the_sbatch_script(study_inputs, tiny_model, tmp_path, capsys):
    """Golden: the array script submitit will submit (array throttle, requeue, time limit, resources)."""
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, launcher=SLURM)
    out = tmp_path / "out"
    assert run_study(spec, out, "--dry-run") == 0
    printed = capsys.readouterr().out
    script = printed[printed.index("sbatch script"):].splitlines()
    folder = out / "slurm"
    expected = f"""sbatch script (one array of 4 cell(s), at most 2 at once; folder {folder}):
  #!/bin/bash
  
  # Parameters
  #SBATCH --account=emb
  #SBATCH --array=0-3%2
  #SBATCH --constraint=h100
  #SBATCH --cpus-per-task=8
  #SBATCH --error={folder}/%A_%a/%A_%a_0_log.err
  #SBATCH --gpus-per-node=1
  #SBATCH --job-name=out
  #SBATCH --mem=64G
  #SBATCH --nodes=1
  #SBATCH --ntasks-per-node=1
  #SBATCH --open-mode=append
  #SBATCH --output={folder}/%A_%a/%A_%a_0_log.out
  #SBATCH --partition=gpu
  #SBATCH --requeue
  #SBATCH --signal=USR2@90
  #SBATCH --time=90
  #SBATCH --wckey=submitit
  
  # setup
  module load cuda
  
  # command
  export SUBMITIT_EXECUTOR=slurm
  srun --unbuffered --output {folder}/%A_%a/%A_%a_%t_log.out --error {folder}/%A_%a/%A_%a_%t_log.err \
{sys.executable} -u -m submitit.core._submit {folder}/%j
array tasks (each a cell; requeued on pre-emption / time limit, resuming from its checkpoint):
  0: mean.seed1: {sys.executable} -m llm2emb.study.cell {out}/cells/.mean.seed1.spec.json
  1: eos.seed1: {sys.executable} -m llm2emb.study.cell {out}/cells/.eos.seed1.spec.json
  2: mean.seed2: {sys.executable} -m llm2emb.study.cell {out}/cells/.mean.seed2.spec.json
  3: eos.seed2: {sys.executable} -m llm2emb.study.cell {out}/cells/.eos.seed2.spec.json""".splitlines()
    assert [line.rstrip() for line in script] == [line.rstrip() for line in expected]
    assert not (out / "slurm").exists()


def test_submit_status_collect_loop_against_fake_slurm(study_inputs, tiny_model, tmp_path, capsys, monkeypatch):
    """--detach submits one array and returns; --status reads sacct; after one job finished (its cell record
    written, as the job would) and the other failed, running the study again collects the finished cell and
    submits only the failed one."""
    bin_dir = fake_slurm(tmp_path, ["4242_0|PENDING|", "4242_1|RUNNING|node1"])
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1,), launcher=SLURM)
    out = tmp_path / "out"
    assert run_study(spec, out, "--detach") == 0
    assert len((tmp_path / "sbatch_calls.txt").read_text().splitlines()) == 1
    assert "#SBATCH --array=0-1%2" in (tmp_path / "scripts.txt").read_text()
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert {name: entry["job_id"] for name, entry in jobs.items()} == {"mean.seed1": "4242_0", "eos.seed1": "4242_1"}
    capsys.readouterr()

    assert run_study(spec, out, "--status") == 0
    status = capsys.readouterr().out
    assert "mean.seed1" in status and "pending" in status and "running" in status
    assert str(out / "logs" / "eos.seed1.log") in status

    # the job of mean.seed1 runs (here: its command, as the array task would) and completes; eos.seed1 fails
    done = subprocess.run([sys.executable, "-m", "llm2emb.study.cell", str(out / "cells" / ".mean.seed1.spec.json")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "sacct.txt").write_text("4242_0|COMPLETED|node1\n4242_1|FAILED|node1\n")
    assert run_study(spec, out, "--status") == 0
    status = capsys.readouterr().out
    assert [line.split()[:2] for line in status.splitlines()[1:3]] == [["mean.seed1", "done"], ["eos.seed1", "failed"]]

    assert run_study(spec, out, "--detach") == 0
    printed = capsys.readouterr().out
    assert "mean.seed1: done (skipped)" in printed
    calls = (tmp_path / "sbatch_calls.txt").read_text().splitlines()
    assert len(calls) == 2                                      # only the failed cell went again
    assert (tmp_path / "scripts.txt").read_text().count("#SBATCH --array") == 1   # a single job is no array
    assert json.loads((out / "slurm" / "jobs.json").read_text())["eos.seed1"]["job_id"] == "4242"


def test_detach_is_refused_for_launchers_on_this_machine(study_inputs, tiny_model, tmp_path, capsys):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    assert run_study(spec, tmp_path / "out", "--detach") == 2
    assert "--detach needs a launcher that hands cells to a scheduler" in capsys.readouterr().err


@pytest.mark.slow
def test_submitit_local_executor_runs_the_study_and_requeues_on_timeout(study_inputs, tiny_model, tmp_path):
    """cluster: local runs each cell as a submitit job; the first cell's job gets the timeout signal (USR2, which
    submitit's local controller sends its task before the time limit) once it wrote a checkpoint: it is requeued
    and the cell resumes from that checkpoint (exact resume), and the study's metrics equal the local launcher's."""
    root, raw, beir, sts = study_inputs
    budget = {"train_steps": 40, "checkpointing_steps": 2, "save_total_limit": 1}
    recipes = {"mean": {}, "eos": {"pooling_mode": "eos"}}
    local = write_study(tmp_path / "local.json", tiny_model, raw, beir, sts, seeds=(1,), recipes=recipes,
                        budget=budget)
    assert run_study(local, tmp_path / "local") == 0
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1,), recipes=recipes, budget=budget,
                       launcher={"kind": "slurm", "cluster": "local", "max_parallel": 1, "time": 30})
    out = tmp_path / "out"
    interrupted: list[int] = []

    def interrupt() -> None:
        """USR2 to mean.seed1's task once it wrote a checkpoint: what submitit's local controller sends its tasks
        at the time limit (signal_delay_s before it)."""
        deadline = time.time() + 240
        while time.time() < deadline and not interrupted:
            try:
                controller = json.loads((out / "slurm" / "jobs.json").read_text())["mean.seed1"]["job_id"]
                tasks = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
            except (OSError, ValueError, KeyError):
                tasks = []
            if tasks and list((out / "runs" / "mean.seed1" / "checkpoints").glob("step_*/trainer_state.json")):
                os.kill(int(tasks[0]), signal.SIGUSR2)
                interrupted.append(int(tasks[0]))
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    assert run_study(spec, out) == 0
    watcher.join()
    assert interrupted
    log = (out / "logs" / "mean.seed1.log").read_text()
    assert log.count("# job ") == 2 and "resumed from" in log     # started twice, the second time resumed
    study = json.loads((out / "study.json").read_text())
    local_study = json.loads((tmp_path / "local" / "study.json").read_text())
    assert [c["metrics"] for c in study["cells"]] == [c["metrics"] for c in local_study["cells"]]
