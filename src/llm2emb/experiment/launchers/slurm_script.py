"""The sbatch script submitit writes for a job array of cells, made without a SLURM client (dry runs on any
machine): the launcher's AutoExecutor parameters renamed as submitit's SlurmExecutor does, then submitit's own
`_make_sbatch_string`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

#: AutoExecutor's generic names -> SlurmExecutor's (submitit.auto.auto and submitit.slurm.slurm)
GENERIC = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node", "nodes": "nodes",
           "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task"}


def sbatch_script(params: dict[str, Any], folder: Path, tasks: int, python: str | None = None) -> str:
    """The script of an array of `tasks` jobs with the launcher's `params` (AutoExecutor names)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm: dict[str, Any] = {}
    for key, value in params.items():
        if key in GENERIC:
            slurm[GENERIC[key]] = value
        elif key.startswith("slurm_"):
            slurm[key[len("slurm_"):]] = value
    command = " ".join([shlex.quote(python or sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=tasks, **slurm)
