"""`slurm`: one SLURM job per cell through submitit (`pip install 'llm2emb[slurm]'`), submitted as one job array
throttled by `max_parallel`.

    launcher:
      kind: slurm
      partition: gpu
      gpus_per_node: 8                 # with accelerate_config: one accelerate process per GPU, the global batch
      accelerate_config: ../configs/accelerate_config.yaml   # kept; without it a cell is one process on one GPU
      cpus_per_task: 64
      mem: 480G
      time: 1440                       # minutes, or "HH:MM:SS" / "D-HH:MM:SS"
      account: my_account
      qos: normal
      sbatch_extra: ["--constraint=h100", "--exclusive"]   # more #SBATCH lines
      setup: ["module load cuda/12.4", "source ~/venv/bin/activate"]   # shell lines before the job starts
      max_parallel: 4                  # at most 4 cells run at once (array throttle %4)
      max_requeues: 3                  # pre-emptions / time limits a cell may be requeued after
      cluster: slurm                   # or local: submitit's local executor (the same flow on this machine)

A job that SLURM pre-empts or that reaches its time limit is requeued (submitit's `helpers.Checkpointable`) and
the cell resumes from the trainer's last complete checkpoint. `--detach` submits and returns; the job ids are
kept in OUTPUT/slurm/jobs.json, `--status` asks sacct about them, and running the study again collects finished
cells and submits only those neither finished nor pending / running.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError
from llm2emb.experiment.launchers.base import (
    Job, Launcher, Outcome, Slot, _positive_int, register_launcher,
)

#: sacct states -> what `--status` shows
LIVE_STATES = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "pending", "RESIZING": "pending",
               "SUSPENDED": "pending", "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running"}
JOBS_FILE = "jobs.json"
CLUSTERS = ("slurm", "local")
POLL_SECONDS = 10.0


def _require_submitit() -> None:
    """The slurm launcher's optional dependency, refused in one sentence when missing."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("The slurm launcher needs submitit; install it with pip install 'llm2emb[slurm]'.") from None


@register_launcher("slurm")
class SlurmLauncher(Launcher):
    FIELDS = ("partition", "nodes", "gpus_per_node", "cpus_per_task", "mem", "time", "account", "qos",
              "sbatch_extra", "setup", "accelerate_config", "max_requeues", "cluster")
    detachable = True

    def __init__(self, options: Mapping[str, Any], where: str, root: Path) -> None:
        super().__init__(options, where, root)
        here = f"{where}: launcher"
        self.cluster = options.get("cluster", "slurm")
        if self.cluster not in CLUSTERS:
            raise UserError(f"{here}.cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}.")
        nodes = _positive_int(options.get("nodes", 1), f"{here}.nodes")
        if nodes != 1:
            raise UserError(f"{here}.nodes is {nodes}, but a cell runs on one node in this version (its processes "
                            "are started by one accelerate launch); use nodes: 1 and gpus_per_node.")
        self.gpus_per_node = options.get("gpus_per_node")
        if self.gpus_per_node is not None:
            self.gpus_per_node = _positive_int(self.gpus_per_node, f"{here}.gpus_per_node")
        self.cpus_per_task = options.get("cpus_per_task")
        if self.cpus_per_task is not None:
            self.cpus_per_task = _positive_int(self.cpus_per_task, f"{here}.cpus_per_task")
        self.time_minutes = parse_minutes(options.get("time", 60), f"{here}.time")
        self.max_requeues = _positive_int(options.get("max_requeues", 3), f"{here}.max_requeues")
        for key in ("partition", "mem", "account", "qos"):
            value = options.get(key)
            if value is not None and (not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value)):
                raise UserError(f"{here}.{key} must be a string, got {value!r}.")
        self.extra = _string_list(options.get("sbatch_extra"), f"{here}.sbatch_extra")
        for line in self.extra:
            if not re.fullmatch(r"--[a-z][a-z0-9-]*(=.+)?", line.strip()):
                raise UserError(f"{here}.sbatch_extra entry {line!r} must be an sbatch option such as "
                                "--constraint=h100 or --exclusive.")
        self.setup = _string_list(options.get("setup"), f"{here}.setup")
        self.accelerate = None
        if options.get("accelerate_config") is not None:
            from llm2emb.experiment.launchers.accelerate import AccelerateLauncher

            if not self.gpus_per_node:
                raise UserError(f"{here}.accelerate_config needs gpus_per_node (one accelerate process per GPU).")
            self.accelerate = AccelerateLauncher({"kind": "accelerate", "config_file": options["accelerate_config"],
                                                  "num_processes": self.gpus_per_node}, where, root)

    # ------------------------------------------------------------------ what a job is
    @property
    def processes(self) -> int:
        return self.accelerate.processes if self.accelerate is not None else 1

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "cluster": self.cluster}

    def slots(self, check: bool = True) -> list[Slot]:
        """Jobs run on the cluster's nodes: one lane, the node's devices as SLURM gives them."""
        if self.devices is not None:
            raise UserError(f"{self.where}: launcher.devices is for jobs on this machine; with slurm give "
                            "gpus_per_node.")
        return [Slot(0)]

    def command(self, job: Job, slot: Slot) -> list[str]:
        if self.accelerate is not None:
            return self.accelerate.command(job, slot)
        return super().command(job, slot)

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit's AutoExecutor parameters of this launcher's jobs."""
        params: dict[str, Any] = {"name": name, "timeout_min": self.time_minutes, "nodes": 1, "tasks_per_node": 1,
                                  "slurm_array_parallelism": self.max_parallel}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        for key, name_ in (("partition", "slurm_partition"), ("mem", "slurm_mem"), ("account", "slurm_account"),
                           ("qos", "slurm_qos")):
            if self.options.get(key) is not None:
                params[name_] = str(self.options[key])
        # requeue-able on pre-emption / time limit (submitit requeues through scontrol), and the extra lines
        params["slurm_additional_parameters"] = {"requeue": True, **dict(_sbatch_pair(line) for line in self.extra)}
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        return params

    # ------------------------------------------------------------------ checks
    def check(self, jobs: int) -> None:
        self.slots()
        _require_submitit()
        if self.accelerate is not None:
            self.accelerate.check(jobs, cuda=True)   # the nodes have the GPUs
        if self.cluster != "slurm":
            return
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UserError("The slurm launcher needs sbatch and srun on the PATH (run the study on a SLURM login node), or "
                            "set launcher.cluster: local to try the flow on this machine.")
        self.test_only()

    def test_only(self) -> None:
        """`sbatch --test-only` with the partition, time limit, account and resources: what sbatch rejects is
        refused here with its own message, before any job is submitted."""
        cmd = ["sbatch", "--test-only", f"--time={self.time_minutes}", "--nodes=1"]
        for key in ("partition", "account", "qos", "mem"):
            if self.options.get(key) is not None:
                cmd.append(f"--{key}={self.options[key]}")
        if self.gpus_per_node:
            cmd.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            cmd.append(f"--cpus-per-task={self.cpus_per_task}")
        cmd += [*self.extra, "--wrap", "true"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"sbatch --test-only could not run ({exc}); check the SLURM client.") from None
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            message = lines[-1] if lines else f"exit code {done.returncode}"
            raise UserError(f"{self.where}: sbatch rejects the launcher's settings: {message}")

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _jobs_file(folder: Path) -> Path:
        return folder / "slurm" / JOBS_FILE

    def _read_jobs(self, folder: Path) -> dict[str, dict[str, Any]]:
        import json

        try:
            return json.loads(self._jobs_file(folder).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _submitit_job(self, folder: Path, job_id: str):
        import submitit

        cls = submitit.SlurmJob if self.cluster == "slurm" else submitit.LocalJob
        return cls(folder=folder / "slurm" / "%j", job_id=job_id)

    def job_states(self, folder: Path, names: list[str]) -> dict[str, tuple[str, str]]:
        """sacct's state of each submitted cell (pending / running / failed / done) with its log paths."""
        jobs = self._read_jobs(folder)
        out: dict[str, tuple[str, str]] = {}
        for name in names:
            entry = jobs.get(name)
            if entry is None:
                continue
            state = self._state(folder, entry["job_id"])
            shown = LIVE_STATES.get(state, "done" if state in ("COMPLETED", "FINISHED") else "failed")
            out[name] = (shown, f"job {entry['job_id']} {state}; log {entry['log']}, scheduler log "
                                f"{entry.get('scheduler_log', '')}")
        return out

    def _state(self, folder: Path, job_id: str) -> str:
        _require_submitit()
        return str(self._submitit_job(folder, job_id).state).split()[0].upper()

    # ------------------------------------------------------------------ running
    def run(self, jobs: list[Job], on_start: Callable[[Job, Slot], None], on_finish: Callable[[Outcome], None],
            folder: Path | None = None, detach: bool = False) -> None:
        """Submit the cells that have no live job as one array; unless `detach`, wait for every cell's job and
        report each through `on_finish` (exit code 0 when it wrote its result file)."""
        import submitit

        from llm2emb.experiment.launchers.slurm_job import CellJob

        assert folder is not None, "the slurm launcher keeps its job ids in the output folder"
        known = self._read_jobs(folder)
        live = {j.name for j in jobs if j.name in known
                and LIVE_STATES.get(self._state(folder, known[j.name]["job_id"])) is not None}
        submit = [j for j in jobs if j.name not in live]
        slot = Slot(0)
        submitted: dict[str, Any] = {}
        if submit:
            executor = submitit.AutoExecutor(folder=folder / "slurm" / "%j", cluster=self.cluster,
                                             slurm_max_num_timeout=self.max_requeues)
            executor.update_parameters(**self.parameters(folder.name))
            # each array task its own rendezvous port, in case SLURM puts two tasks on one node
            calls = [CellJob(self.command(job, Slot(i)), self.environment(slot), str(job.log_path),
                             str(job.result_path)) for i, job in enumerate(submit)]
            try:
                with executor.batch():
                    handles = [executor.submit(call) for call in calls]
            except Exception as exc:  # noqa: BLE001 - sbatch's refusal, one line
                message = str(exc).strip().splitlines()
                raise UserError(f"Submitting {len(submit)} cell(s) failed: {message[-1] if message else exc}") from None
            for job, handle in zip(submit, handles):
                submitted[job.name] = handle
                known[job.name] = {"job_id": str(handle.job_id), "log": str(job.log_path),
                                   "scheduler_log": str(handle.paths.stdout), "submitted": time.time()}
                on_start(job, slot)
            write_json_atomic(self._jobs_file(folder), known)
        for name in sorted(live):
            print(f"      {name}: job {known[name]['job_id']} is still queued or running (not submitted again)",
                  flush=True)
        if detach:
            return
        handles = {**submitted, **{name: self._submitit_job(folder, known[name]["job_id"]) for name in live}}
        started = {name: known[name].get("submitted", time.time()) for name in handles}
        by_name = {j.name: j for j in jobs}
        while handles:
            for name, handle in list(handles.items()):
                if handle.done():
                    job = by_name[name]
                    code = 0 if job.result_path.exists() else 1
                    on_finish(Outcome(job, code, started[name], time.time(), None, 0,
                                      {"job_id": str(handle.job_id)}))
                    del handles[name]
            if handles:
                time.sleep(POLL_SECONDS if self.cluster == "slurm" else 0.5)

    def dry_run_lines(self, jobs: list[Job], slots: list[Slot]) -> list[str]:
        """The sbatch script of the array (what submitit writes) and each array task's command."""
        from llm2emb.experiment.launchers.slurm_script import sbatch_script

        if not jobs:
            return []
        folder = jobs[0].log_path.parent.parent
        lines = [f"sbatch script (one array of {len(jobs)} cell(s), at most {self.max_parallel} at once; "
                 f"folder {folder / 'slurm'}):"]
        lines += ["  " + line for line in sbatch_script(self.parameters(folder.name), folder / "slurm" / "%j",
                                                        len(jobs)).splitlines()]
        lines.append("array tasks (each a cell; requeued on pre-emption / time limit, resuming from its checkpoint):")
        for i, job in enumerate(jobs):
            lines.append(f"  {i}: {job.name}: {self.shell_line(job, Slot(i))}")
        return lines


def parse_minutes(value: Any, where: str) -> int:
    """A SLURM time limit as minutes: an integer, or "MM", "HH:MM:SS", "D-HH:MM[:SS]"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, str) and match:
        days, a, b, c = (int(x) if x else 0 for x in match.groups())
        if match.group(3) is None:           # "MM" or "D-HH"
            minutes = days * 1440 + (a * 60 if match.group(1) else a)
        elif match.group(4) is None:         # "HH:MM" after a day, else "MM:SS"
            minutes = days * 1440 + a * 60 + b if match.group(1) else a + (1 if b else 0)
        else:                                # "HH:MM:SS"
            minutes = days * 1440 + a * 60 + b + (1 if c else 0)
        if minutes > 0:
            return minutes
    raise UserError(f"{where} must be a time limit in minutes or as HH:MM:SS / D-HH:MM:SS, got {value!r}.")


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where} must be a list of strings.")
    return [v.strip() for v in value]


def _sbatch_pair(line: str) -> tuple[str, Any]:
    """"--constraint=h100" -> ("constraint", "h100"); "--exclusive" -> ("exclusive", True)."""
    key, sep, value = line.strip()[2:].partition("=")
    return key, (value if sep else True)
