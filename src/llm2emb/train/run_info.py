"""What is saved beside every run (`output_dir/experiment_id/config.json`): the resolved config, library
versions, the git commit and the launch settings; and the guard that stops a run from writing into a
folder that holds a different experiment."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from llm2emb.config import TrainConfig
from llm2emb.errors import UserError
from llm2emb.layout import RUN_CONFIG

LIBRARIES = ("llm2emb", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
             "pyarrow", "deepspeed")
# Fields that may change between a run and its resumption without changing what is trained.
# gradient checkpointing changes memory and time, not the result: a run may resume with it switched
RESUMABLE_FIELDS = frozenset({"log_interval", "checkpointing_steps", "save_total_limit", "validation_steps",
                              "tb_dir", "report_to", "run_name", "output_dir", "cache_dir", "num_processes", "lora_merge_on_save",
                              "gradient_checkpointing", "gradient_checkpointing_auto"})


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(start: Path | None = None) -> str | None:
    """Commit of the llm2emb source tree (with '-dirty' when it has local changes), or None outside git."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(cfg: TrainConfig, launch: dict[str, Any]) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "versions": library_versions(), "git_commit": git_commit(),
            "launch": launch, "command": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_run_dir(cfg: TrainConfig) -> bool:
    """Raise if run_dir holds a different experiment; return True when it holds this one (resume)."""
    path = cfg.run_dir / RUN_CONFIG
    if not path.exists():
        if cfg.run_dir.exists() and any(cfg.run_dir.iterdir()):
            raise UserError(f"Output folder {cfg.run_dir} exists and is not an llm2emb run (no {RUN_CONFIG}); "
                            "choose another experiment_id or output_dir, or empty it.")
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); choose another experiment_id or output_dir, "
                        "or delete that folder.") from exc
    current = cfg.to_dict()
    # A field added in a newer llm2emb is absent from older runs: they ran with its default.
    defaults = TrainConfig().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} there, {current.get(k)!r} now)" for k in differing[:4])
        raise UserError(f"Output folder {cfg.run_dir} holds a different experiment: {shown}"
                        f"{' ...' if len(differing) > 4 else ''}; choose another experiment_id or output_dir, "
                        "or delete that folder to start over.")
    return True
