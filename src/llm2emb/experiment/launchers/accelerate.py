"""`accelerate`: each job as `accelerate launch --config_file FILE [--num_processes N] -m MODULE SPEC`, i.e.
DDP, DeepSpeed ZeRO or FSDP exactly as `llm2emb train` runs under them.

    launcher: {kind: accelerate, config_file: ../configs/accelerate_config.yaml, num_processes: 8}

The recipe's `train_batch_size` is the GLOBAL batch: each of the N processes trains on train_batch_size / N rows
per step (refused when it does not divide), so a cell trains the same batches whatever N is. On a machine
without CUDA, several processes need a config that goes through torchrun (`distributed_type: MULTI_GPU`, as
configs/accelerate_cpu.yaml): accelerate 1.x starts ONE process for MULTI_CPU / --cpu. FSDP and DeepSpeed need
CUDA (on CPU accelerate drops them and would train plain DDP).
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.experiment.launchers.base import Job, Launcher, Slot, _positive_int, register_launcher, visible_gpus

#: the first rendezvous port; parallel lanes use the next ones
DEFAULT_PORT = 29500


@register_launcher("accelerate")
class AccelerateLauncher(Launcher):
    FIELDS = ("config_file", "num_processes", "main_process_port")

    def __init__(self, options: Mapping[str, Any], where: str, root: Path) -> None:
        super().__init__(options, where, root)
        value = options.get("config_file")
        if not isinstance(value, str) or not value:
            raise UserError(f"{where}: launcher.config_file is missing; the accelerate launcher needs an accelerate "
                            "config such as configs/accelerate_config.yaml (DDP) or configs/accelerate_cpu.yaml.")
        path = Path(value).expanduser()
        self.config_file = path if path.is_absolute() else (root / path).resolve()
        if not self.config_file.is_file():
            raise UserError(f"{where}: launcher.config_file {self.config_file} does not exist; give an accelerate "
                            "config file (`accelerate config`, or configs/accelerate_config.yaml).")
        self.config = _read_yaml(self.config_file, where)
        n = options.get("num_processes", self.config.get("num_processes", 1))
        self.num_processes = _positive_int(n, f"{where}: launcher.num_processes")
        self.port = _positive_int(options.get("main_process_port", self.config.get("main_process_port")
                                              or DEFAULT_PORT), f"{where}: launcher.main_process_port")
        self.distributed_type = str(self.config.get("distributed_type", "NO")).upper()
        self.deepspeed_config = self._deepspeed_config(where)

    def _deepspeed_config(self, where: str) -> Path | None:
        """The DeepSpeed JSON a DEEPSPEED accelerate config names. accelerate reads a relative path from the
        working directory (the seed's configs say configs/deepspeed_zero2.json, i.e. the repository root); it
        is resolved here (working directory, else beside the accelerate config, else its parent folder) and
        passed as an absolute --deepspeed_config_file, so cells run from any directory."""
        value = (self.config.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if not value or str(value).lower() == "none":
            return None
        path = Path(str(value)).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, self.config_file.parent / path,
                                                        self.config_file.parent.parent / path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        raise UserError(f"{where}: launcher.config_file {self.config_file.name} names the DeepSpeed config {value}, "
                        f"which is neither in {Path.cwd()} nor beside the accelerate config; fix the path.")

    @property
    def processes(self) -> int:
        return self.num_processes

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "distributed_type": self.distributed_type}

    def check(self, jobs: int, cuda: bool | None = None) -> None:
        super().check(jobs)
        cuda = bool(visible_gpus()) if cuda is None else cuda
        if not cuda and self.distributed_type == "FSDP":
            raise UserError(f"{self.where}: launcher.config_file {self.config_file.name} uses FSDP, which needs CUDA "
                            "GPUs in this version; use configs/accelerate_cpu.yaml (DDP) on CPU.")
        if not cuda and self.distributed_type == "DEEPSPEED":
            # seen here with deepspeed 0.19.8 built for CPU: accelerate launches through DeepSpeed's launcher, but
            # the trainer's Accelerator(cpu=True) then runs MULTI_CPU (plain DDP) without a DeepSpeed engine
            raise UserError(f"{self.where}: launcher.config_file {self.config_file.name} uses DeepSpeed, which "
                            "accelerate drops on a machine without CUDA (the cells would train as plain DDP); use "
                            "configs/accelerate_cpu.yaml on CPU.")
        if not cuda and self.num_processes > 1 and self.distributed_type in ("MULTI_CPU", "NO"):
            raise UserError(f"{self.where}: launcher.config_file {self.config_file.name} has distributed_type "
                            f"{self.distributed_type}, with which accelerate starts one process on a machine without "
                            f"CUDA, not {self.num_processes}; use a torchrun config such as configs/accelerate_cpu.yaml.")

    def command(self, job: Job, slot: Slot) -> list[str]:
        cmd = [*accelerate_command(), "launch", "--config_file", str(self.config_file),
               "--num_processes", str(self.num_processes)]
        if self.deepspeed_config is not None:
            cmd += ["--deepspeed_config_file", str(self.deepspeed_config)]
        if self.num_processes > 1:
            cmd += ["--main_process_port", str(self.port + slot.index)]
            if slot.devices is not None:
                cmd += ["--gpu_ids", ",".join(str(d) for d in slot.devices)]
        return cmd + ["-m", job.module, str(job.spec_path)]


def accelerate_command() -> list[str]:
    """`accelerate` beside this Python (the same environment), else on the PATH, else the module."""
    beside = Path(sys.executable).parent / "accelerate"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("accelerate")
    return [found] if found else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    import json

    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{where}: launcher.config_file {path} is not a readable accelerate config ({exc}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: launcher.config_file {path} is not an accelerate config (a YAML mapping).")
    return data
