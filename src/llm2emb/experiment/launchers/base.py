"""How a unit of work (a study cell, a pipeline stage) is started: the `launcher:` section of a study or pipeline
file, a registry of kinds, and the machinery every kind on this machine shares (parallel lanes, devices and
threads per lane, logs, exit codes).

    launcher:
      kind: accelerate                 # local (default) | accelerate | slurm | ray
      config_file: ../configs/accelerate_config.yaml
      num_processes: 4
      max_parallel: 2                  # cells side by side
      devices: [[0, 1, 2, 3], [4, 5, 6, 7]]   # one device group per parallel cell (default: split
                                       # CUDA_VISIBLE_DEVICES, or the CPU cores)

A job is one process tree that runs `python -m MODULE SPEC` and writes its result file last; a launcher turns it
into a command and runs it. Adding a launcher: a `Launcher` subclass in its own file in this package with
`@register_launcher("name")`, imported in `llm2emb/experiment/launchers/__init__.py`.
"""
from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llm2emb.errors import UserError, did_you_mean

#: fields every launcher kind takes
COMMON_FIELDS = ("kind", "max_parallel", "devices")

LAUNCHERS: dict[str, type[Launcher]] = {}


def register_launcher(kind: str):
    """Class decorator: make a `Launcher` subclass reachable as `launcher: {kind: NAME}` and `--launcher NAME`."""
    def wrap(cls: type[Launcher]) -> type[Launcher]:
        cls.kind = kind
        LAUNCHERS[kind] = cls
        return cls
    return wrap


@dataclass
class Job:
    """One cell or stage: `python -m module spec_path`, output to `log_path`, result file written last."""
    name: str
    module: str
    spec_path: Path
    log_path: Path
    result_path: Path


@dataclass
class Slot:
    """One lane of jobs that run side by side: its devices (GPU ids; None: the CPU), CPU threads per process
    and the rendezvous port of its multi-process jobs."""
    index: int
    devices: list[int] | None = None
    threads: int | None = None
    port: int | None = None


@dataclass
class Outcome:
    """How a job ended: exit code, wall-clock start / end (seconds since the epoch), peak RSS of its biggest
    process (MiB), the lane it ran in."""
    job: Job
    code: int
    started: float
    finished: float
    peak_rss_mib: float | None = None
    slot: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a SLURM allocation or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[int]:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES when set, else torch's device count."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "-1"]
        return [int(v) for v in ids if v.isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no usable CUDA: the CPU
        return []


class Launcher:
    """A way to start jobs. Subclasses set `FIELDS` (their own fields besides COMMON_FIELDS), check them in
    `__init__` and say how a job becomes a command (`command`). `run` starts jobs on this machine, `max_parallel`
    at a time; launchers that hand jobs to a cluster override it."""
    kind: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[str, ...]] = ()
    #: whether a pipeline trains its stages inside the driver process under this launcher (today's behaviour)
    in_driver: ClassVar[bool] = False
    #: whether `--detach` can return while jobs run (a scheduler holds them, not this process)
    detachable: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any], where: str, root: Path) -> None:
        self.where = where
        self.root = root
        self.options = dict(options)
        self.max_parallel = _positive_int(options.get("max_parallel", 1), f"{where}: launcher.max_parallel")
        devices = options.get("devices")
        if devices is not None:
            if not isinstance(devices, list) or not devices or not all(
                    isinstance(g, list) and g and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in g) for g in devices):
                raise UserError(f"{where}: launcher.devices must be a list of GPU id lists, one per parallel cell, "
                                "e.g. [[0, 1], [2, 3]].")
            flat = [d for g in devices for d in g]
            if len(set(flat)) != len(flat):
                raise UserError(f"{where}: launcher.devices lists a GPU twice ({devices}); parallel cells need "
                                "their own GPUs.")
        self.devices: list[list[int]] | None = devices

    # ------------------------------------------------------------------ what a subclass says
    @property
    def processes(self) -> int:
        """Processes per job (the data-parallel world size a job trains with)."""
        return 1

    def identity(self) -> dict[str, Any]:
        """What a resumed job must keep (recorded in the output folder): resuming under another kind or
        process count is refused while jobs are unfinished."""
        return {"kind": self.kind, "processes": self.processes}

    def command(self, job: Job, slot: Slot) -> list[str]:
        """The command that runs `job` in `slot`."""
        return [sys.executable, "-m", job.module, str(job.spec_path)]

    def environment(self, slot: Slot) -> dict[str, str]:
        """Environment variables of a job in `slot`: its GPUs, its CPU threads."""
        env: dict[str, str] = {}
        if slot.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in slot.devices)
        if slot.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
        return env

    # ------------------------------------------------------------------ lanes
    def slots(self, check: bool = True) -> list[Slot]:
        """The lanes jobs run in: `devices` groups, else CUDA_VISIBLE_DEVICES split into `max_parallel` groups of
        `processes` GPUs (or the GPUs shared out), else the CPU cores split between the lanes. `check=False` (a
        dry run for another machine) does not compare them with this machine's devices."""
        k, n = self.max_parallel, self.processes
        where = f"{self.where}: launcher"
        if self.devices is not None:
            if k > len(self.devices):
                raise UserError(f"{where}: max_parallel {k} is more than the {len(self.devices)} device group(s) in "
                                "devices; give one group per parallel cell or lower max_parallel.")
            groups = self.devices[:k]
            if n > 1 and any(len(g) != n for g in groups):
                raise UserError(f"{where}: each devices group needs num_processes = {n} GPUs, got {groups}.")
            if check:
                gpus = visible_gpus()
                missing = sorted({d for g in groups for d in g} - set(gpus))
                if missing:
                    raise UserError(f"{where}: devices names GPU(s) {missing} but this machine shows "
                                    f"{gpus or 'no GPU'}; list only visible GPUs.")
            return [Slot(i, list(g), None) for i, g in enumerate(groups)]
        gpus = visible_gpus() if check else []
        if gpus:
            if k * n > len(gpus):
                raise UserError(f"{where}: {k} parallel cell(s) x {n} process(es) need {k * n} GPUs but "
                                f"{len(gpus)} are visible; lower max_parallel or num_processes.")
            per = n if n > 1 else len(gpus) // k
            return [Slot(i, gpus[i * per:(i + 1) * per]) for i in range(k)]
        if not check:   # the CPU threads are split on the machine that runs the study
            return [Slot(i) for i in range(k)]
        cores = cpu_cores()
        if k * n > cores:
            raise UserError(f"{where}: {k} parallel cell(s) x {n} process(es) need {k * n} CPU cores but this "
                            f"machine gives {cores}; lower max_parallel or num_processes.")
        threads = max(1, cores // (k * n)) if k > 1 or n > 1 else None
        return [Slot(i, None, threads) for i in range(k)]

    def check(self, jobs: int) -> None:
        """Everything that can be refused before a job starts (a subclass adds its own checks)."""
        self.slots()

    # ------------------------------------------------------------------ running
    def shell_line(self, job: Job, slot: Slot) -> str:
        """The command of `job` in `slot` as one shell line (dry runs print it)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.environment(slot).items())
        return (env + " " if env else "") + shlex.join(self.command(job, slot))

    def dry_run_lines(self, jobs: list[Job], slots: list[Slot]) -> list[str]:
        """What a dry run prints: the command of each job (jobs take the lanes in turn)."""
        lines = [f"commands ({self.kind}):"] if jobs else []
        for i, job in enumerate(jobs):
            lines.append(f"  {job.name}: {self.shell_line(job, slots[i % len(slots)])}")
        return lines

    def job_states(self, folder: Path, names: list[str]) -> dict[str, tuple[str, str]]:
        """{job name: (pending | running | failed | done, detail)} of jobs handed to a scheduler from `folder`
        (`--status`); jobs on this machine have no state beyond their result files."""
        return {}

    def run(self, jobs: list[Job], on_start: Callable[[Job, Slot], None], on_finish: Callable[[Outcome], None],
            folder: Path | None = None, detach: bool = False) -> None:
        """Run `jobs` on this machine, `max_parallel` at a time, each lane with its devices and threads; a job
        that fails is reported through `on_finish` like the others, and the others go on. `folder` (the
        experiment's output folder) keeps a scheduler's bookkeeping; `detach` returns once jobs are submitted
        (refused for launchers that run jobs as children of this process)."""
        if detach:
            raise UserError(f"--detach needs a launcher that hands cells to a scheduler (slurm); the {self.kind} "
                            "launcher runs them as children of this process.")
        slots = self.slots()
        todo: queue.Queue[Job] = queue.Queue()
        for job in jobs:
            todo.put(job)
        errors: list[BaseException] = []
        procs: dict[int, subprocess.Popen] = {}

        def lane(slot: Slot) -> None:
            while not errors:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    on_start(job, slot)
                    on_finish(self._run_one(job, slot, procs))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the driver thread
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=lane, args=(slot,), daemon=True) for slot in slots[:max(1, len(jobs))]]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            errors.append(KeyboardInterrupt())
            for proc in list(procs.values()):
                _terminate(proc)
            raise
        if errors:
            raise errors[0]

    def _run_one(self, job: Job, slot: Slot, procs: dict[int, subprocess.Popen]) -> Outcome:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        # OpenMP threads that spin while they wait took 84% of a cell's CPU time on a 2-core machine shared
        # with other jobs (py-spy: libgomp spin loops, 8% in sgemm); passive waiting made it ~4x faster.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               **self.environment(slot)}
        started = time.time()
        with open(job.log_path, "a", encoding="utf-8") as log:
            log.write(f"# {self.shell_line(job, slot)}\n")
            log.flush()
            proc = subprocess.Popen(self.command(job, slot), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent, env=env, start_new_session=True)
            procs[slot.index] = proc
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                procs.pop(slot.index, None)
        # Linux: the child's ru_maxrss covers the children it waited for (an accelerate launcher's workers), KiB
        peak = usage.ru_maxrss / 1024
        return Outcome(job, os.waitstatus_to_exitcode(status), started, time.time(), round(peak, 1), slot.index)


def _terminate(proc: subprocess.Popen) -> None:
    """Stop a job's whole process group (an `accelerate launch` starts workers of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the job gets SIGTERM when the driver dies (kill -9 included)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where} must be an integer >= 1, got {value!r}.")
    return value


def check_global_batch(batch: int, processes: int, where: str) -> int:
    """The per-process batch of a cell or stage trained by `processes` processes: train_batch_size is the
    global batch under every launcher, so it must divide evenly."""
    if batch % processes:
        raise UserError(f"{where}: train_batch_size {batch} is the global batch and must divide by the launcher's "
                        f"{processes} processes; use a multiple of {processes} or another num_processes.")
    return batch // processes


def load_launcher(value: Any, where: str, root: Path, kind: str | None = None) -> Launcher:
    """The `launcher:` section of the file `where` (folder `root`); `kind` (the command line's --launcher)
    replaces the file's kind. Unknown kinds and fields are refused with a did-you-mean hint."""
    from llm2emb.experiment import launchers as _registry  # noqa: F401 - fills LAUNCHERS

    if value is None:
        value = {}
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: launcher must be a mapping such as {{kind: accelerate, num_processes: 2}}.")
    options = dict(value)
    chosen = kind or options.get("kind") or "local"
    source = "--launcher" if kind else f"{where}: launcher.kind"
    if chosen not in LAUNCHERS:
        raise UserError(f"{source}: unknown launcher {chosen!r}.{did_you_mean(str(chosen), LAUNCHERS)} "
                        f"Launchers: {', '.join(LAUNCHERS)}.")
    cls = LAUNCHERS[chosen]
    allowed = COMMON_FIELDS + cls.FIELDS
    if kind is None or kind == options.get("kind"):
        # fields of another kind are refused, unless --launcher switched kinds (the file keeps its own options)
        for key in options:
            if key not in allowed:
                raise UserError(f"{where}: launcher.{key} is not a field of the {chosen} launcher."
                                f"{did_you_mean(str(key), allowed)} Its fields: {', '.join(allowed)}.")
    else:
        options = {k: v for k, v in options.items() if k in allowed}
    options["kind"] = chosen
    return cls(options, where, root)
