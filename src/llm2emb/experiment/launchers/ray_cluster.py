"""`ray`: one Ray task per cell (`pip install 'llm2emb[ray]'`), on an existing cluster or a local Ray instance.

    launcher:
      kind: ray
      address: auto                    # an existing cluster (`ray start --head`); omitted: a local Ray instance
      num_gpus: 8                      # per cell (with accelerate_config: one accelerate process per GPU)
      num_cpus: 16                     # per cell
      accelerate_config: ../configs/accelerate_config.yaml
      max_retries: 3                   # a task lost with its node is retried; the cell resumes from its checkpoint
      max_parallel: 4                  # at most 4 cells submitted at once

Each task runs the cell's command as a child process on the node Ray picked (its GPUs in CUDA_VISIBLE_DEVICES,
set by Ray), so the output folder must be on storage every node sees. A retried task starts the cell again and
the trainer resumes from its last complete checkpoint.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.experiment.launchers.base import Job, Launcher, Outcome, Slot, _positive_int, register_launcher


@register_launcher("ray")
class RayLauncher(Launcher):
    FIELDS = ("address", "num_gpus", "num_cpus", "accelerate_config", "max_retries")

    def __init__(self, options: Mapping[str, Any], where: str, root: Path) -> None:
        super().__init__(options, where, root)
        here = f"{where}: launcher"
        self.address = options.get("address")
        if self.address is not None and not isinstance(self.address, str):
            raise UserError(f"{here}.address must be a string such as auto or ray://head:10001.")
        self.num_gpus = options.get("num_gpus", 0)
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int) or self.num_gpus < 0:
            raise UserError(f"{here}.num_gpus must be an integer >= 0, got {self.num_gpus!r}.")
        self.num_cpus = _positive_int(options.get("num_cpus", 1), f"{here}.num_cpus")
        self.max_retries = options.get("max_retries", 3)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise UserError(f"{here}.max_retries must be an integer >= 0, got {self.max_retries!r}.")
        self.accelerate = None
        if options.get("accelerate_config") is not None:
            from llm2emb.experiment.launchers.accelerate import AccelerateLauncher

            if self.num_gpus < 1:
                raise UserError(f"{here}.accelerate_config needs num_gpus (one accelerate process per GPU).")
            self.accelerate = AccelerateLauncher({"kind": "accelerate", "config_file": options["accelerate_config"],
                                                  "num_processes": self.num_gpus}, where, root)

    @property
    def processes(self) -> int:
        return self.accelerate.processes if self.accelerate is not None else 1

    def slots(self, check: bool = True) -> list[Slot]:
        if self.devices is not None:
            raise UserError(f"{self.where}: launcher.devices is for jobs on this machine; with ray give num_gpus.")
        return [Slot(i) for i in range(self.max_parallel)]

    def command(self, job: Job, slot: Slot) -> list[str]:
        return self.accelerate.command(job, slot) if self.accelerate is not None else super().command(job, slot)

    def environment(self, slot: Slot) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.num_cpus), "MKL_NUM_THREADS": str(self.num_cpus)}

    def check(self, jobs: int) -> None:
        self.slots()
        ray = _import_ray()
        if self.accelerate is not None:
            self.accelerate.check(jobs, cuda=True)
        if self.address is not None and not ray.is_initialized():
            _reachable(self.address, self.where)
            try:
                ray.init(address=self.address, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - no cluster there: one sentence
                line = str(exc).strip().splitlines()
                raise UserError(f"{self.where}: no Ray cluster at launcher.address {self.address!r} "
                                f"({line[0] if line else type(exc).__name__}); start one with `ray start --head` "
                                "or leave address out for a local Ray instance.") from None

    def run(self, jobs: list[Job], on_start: Callable[[Job, Slot], None], on_finish: Callable[[Outcome], None],
            folder: Path | None = None, detach: bool = False) -> None:
        """Submit up to `max_parallel` tasks, then one more each time one finishes; each task's outcome goes to
        `on_finish` (a task that failed after its retries is a failed cell, the others go on)."""
        ray = _import_ray()
        if detach:
            raise UserError("--detach is for the slurm launcher; a Ray study's driver waits for its tasks.")
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, log_to_driver=False, include_dashboard=False,
                     **({} if self.address else {"num_cpus": max(self.num_cpus * self.max_parallel, 1)}))
        task = ray.remote(_run_cell).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                             max_retries=self.max_retries, retry_exceptions=False)
        todo = list(enumerate(jobs))
        running: dict[Any, tuple[Job, Slot, float]] = {}
        try:
            while todo or running:
                while todo and len(running) < self.max_parallel:
                    i, job = todo.pop(0)
                    slot = Slot(i % self.max_parallel)
                    on_start(job, slot)
                    ref = task.remote(self.command(job, Slot(i)), self.environment(slot), str(job.log_path))
                    running[ref] = (job, slot, time.time())
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job, slot, started = running.pop(ref)
                    try:
                        code, peak = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task (or its node) was lost for good
                        code, peak = 1, None
                        with open(job.log_path, "a", encoding="utf-8") as log:
                            log.write(f"error: the Ray task failed: {str(exc).strip().splitlines()[-1:]}\n")
                    on_finish(Outcome(job, code, started, time.time(), peak, slot.index, {"ray": True}))
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()


def _run_cell(command: list[str], env: dict[str, str], log_path: str) -> tuple[int, float]:
    """A Ray task: the cell's command as a child process (its GPUs are those Ray gave this task)."""
    import subprocess

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **env}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# ray task: {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), round(usage.ru_maxrss / 1024, 1)


def _reachable(address: str, where: str) -> None:
    """A host:port address must accept a connection (ray.init would wait minutes for a GCS that is not there)."""
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"{where}: no Ray cluster at launcher.address {address!r} ({exc.strerror or exc}); start "
                        "one with `ray start --head` or leave address out for a local Ray instance.") from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("The ray launcher needs Ray; install it with pip install 'llm2emb[ray]'.") from None
    return ray
