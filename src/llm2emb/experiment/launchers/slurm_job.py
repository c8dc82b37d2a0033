"""The callable a SLURM (submitit) job runs: one cell's command as a child process. Only the slurm launcher loads
this module (it needs submitit, an optional extra).

On pre-emption or at the time limit SLURM signals the job; submitit then calls `checkpoint`, which stops the
child (the trainer's last complete checkpoint stays on disk) and returns the same call to requeue: the requeued
job starts the cell again and the trainer resumes from that checkpoint (exact resume: same batches, RNG, optimizer).
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable


class CellJob(Checkpointable):
    """`command` with `env` added, output appended to `log`; the result file `result` marks success."""

    def __init__(self, command: list[str], env: dict[str, str], log: str, result: str) -> None:
        self.command = command
        self.env = env
        self.log = log
        self.result = result
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **self.env}
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"# job {os.environ.get('SLURM_JOB_ID') or os.environ.get('SUBMITIT_LOCAL_JOB_ID', '?')}: "
                      f"{' '.join(self.command)}\n")
            log.flush()
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
            code = self._proc.wait()
        if code != 0 or not Path(self.result).exists():
            raise RuntimeError(f"the cell exited with code {code} (log: {self.log})")
        return self.result

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Stop the child (its process group: an accelerate launch has workers) and requeue the same call."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        fresh = CellJob(self.command, self.env, self.log, self.result)
        return super(CellJob, fresh).checkpoint(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None
        return state
