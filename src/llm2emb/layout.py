"""The on-disk layout of training runs and saved models, and the one resolver of "which model does this
path mean" used by `llm2emb eval`, `export`, `encode` (and the trainer for its own checkpoints).

A run (`output_dir/experiment_id/`, written by `llm2emb train`):
    config.json                          {"config": resolved training config (seed field names), versions, ...}
    metrics.jsonl                        training / validation log
    checkpoints/step_N/model/            Embedder folder of step N
    checkpoints/step_N/state/            optimizer, scheduler, RNG, trainable weights (accelerate)
    checkpoints/step_N/trainer_state.json   written last: marks the checkpoint complete
    checkpoints/.step_N.partial/         a checkpoint being written (removed on the next start)
    final/                               Embedder folder of the finished run (LoRA kept as an adapter)
    final_merged/                        the same with the adapter folded in (optional)
    train_summary.json                   written after final/: the run is complete
    eval/*.json                          `llm2emb eval` results of the run
An Embedder folder holds `llm2emb_config.json` (+ backbone / adapter files, `modules.safetensors`).

A run resolves to `final/`, else to its newest complete checkpoint. Anything else (an Embedder folder, a
Hugging Face folder, a .gguf file, a built-in alias, a hub id) passes through unchanged.

This module is a leaf: it imports nothing from llm2emb but `errors`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError

RUN_CONFIG = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
MERGED_DIR = "final_merged"
SUMMARY_FILE = "train_summary.json"
EVAL_DIR = "eval"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MODEL_DIR = "model"
CHECKPOINT_STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
EMBEDDER_CONFIG = "llm2emb_config.json"
EMBEDDER_MODULES = "modules.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step}"


def partial_checkpoint_name(step: int) -> str:
    return f".step_{step}.partial"


def is_partial_checkpoint(name: str) -> bool:
    return name.startswith(".step_") and name.endswith(".partial")


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named step_N, else None."""
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_embedder_folder(path: Path) -> bool:
    return (Path(path) / EMBEDDER_CONFIG).is_file()


def read_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """trainer_state.json of a checkpoint folder, or None when the checkpoint is incomplete."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not (checkpoint / CHECKPOINT_STATE_DIR).is_dir():
        return None
    return state


def is_complete_checkpoint(checkpoint: Path) -> bool:
    return read_trainer_state(checkpoint) is not None and is_embedder_folder(Path(checkpoint) / CHECKPOINT_MODEL_DIR)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and is_complete_checkpoint(child):
            found.append((step, child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _training_config(data: object) -> dict | None:
    """The resolved training config inside a run's config.json (the trainer nests it under "config")."""
    if not isinstance(data, dict) or "model_type" in data:
        return None
    inner = data.get("config")
    if isinstance(inner, dict) and "model_path" in inner:
        return inner
    return data if "model_path" in data else None


def read_run_config(run_dir: Path) -> dict | None:
    """The run's resolved training config, or None when `run_dir` has no run config.json."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Run config {path} is not valid JSON ({exc}); fix or remove it.") from exc
    return _training_config(data)


def looks_like_run(path: Path) -> bool:
    """A run folder has final/ or checkpoints/, or at least a training config (no HF `model_type`)."""
    path = Path(path)
    if (path / FINAL_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir():
        return True
    if not (path / RUN_CONFIG).is_file() or is_embedder_folder(path):
        return False
    try:
        return read_run_config(path) is not None
    except UserError:
        return False


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are (`model_path`) and, when known, the training run they came from."""

    model_path: str
    run_dir: Path | None = None
    checkpoint_step: int | None = None   # None: the run's final model or not part of a run

    @property
    def description(self) -> str:
        if self.run_dir is None:
            return self.model_path
        where = "final model" if self.checkpoint_step is None else f"checkpoint step {self.checkpoint_step}"
        return f"{where} of run {self.run_dir}"

    def run_config(self) -> dict | None:
        """The run's resolved training config (config.json), or None outside a run."""
        return None if self.run_dir is None else read_run_config(self.run_dir)


def _run_of_embedder_folder(path: Path) -> tuple[Path | None, int | None]:
    """`run/final` -> (run, None); `run/checkpoints/step_N/model` -> (run, N); otherwise (None, None)."""
    path = path.resolve()
    if path.name in (FINAL_DIR, MERGED_DIR) and (path.parent / RUN_CONFIG).is_file():
        return path.parent, None
    if path.name == CHECKPOINT_MODEL_DIR and path.parent.parent.name == CHECKPOINTS_DIR:
        step = checkpoint_step(path.parent)
        if step is not None:
            return path.parents[2], step
    return None, None


def resolve_model_source(model: str | Path) -> ModelSource:
    """Resolve a `--model` argument (run dir, checkpoint dir, Embedder folder or any model) to a ModelSource."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return ModelSource(model_path=str(model))
    if is_embedder_folder(path):
        run_dir, step = _run_of_embedder_folder(path)
        return ModelSource(str(path), run_dir, step)
    step = checkpoint_step(path)
    if (path / CHECKPOINT_MODEL_DIR).is_dir() or (step is not None and path.parent.name == CHECKPOINTS_DIR):
        if not is_complete_checkpoint(path):
            raise UserError(f"Checkpoint {path} is incomplete (no {TRAINER_STATE}, {CHECKPOINT_STATE_DIR}/ or "
                            f"{CHECKPOINT_MODEL_DIR}/{EMBEDDER_CONFIG}): it was interrupted while saving; pass the "
                            "run folder to use its newest complete checkpoint.")
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
        return ModelSource(str(path / CHECKPOINT_MODEL_DIR), run_dir, step)
    if looks_like_run(path):
        if is_embedder_folder(path / FINAL_DIR):
            return ModelSource(str(path / FINAL_DIR), path, None)
        checkpoints = complete_checkpoints(path)
        if checkpoints:
            step, newest = checkpoints[-1]
            return ModelSource(str(newest / CHECKPOINT_MODEL_DIR), path, step)
        raise UserError(f"Run {path} has no final model ({FINAL_DIR}/) and no complete checkpoint "
                        f"({CHECKPOINTS_DIR}/step_N/ with {TRAINER_STATE}) yet; let training save one, "
                        "or pass a model folder.")
    return ModelSource(str(path))


def check_job_folder(folder: Path, marker: str, name: str, kind: str) -> None:
    """A study / pipeline output folder holds one job: refuse one whose `marker` file names another, or a
    non-empty folder without the marker."""
    folder = Path(folder)
    path = folder / marker
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != name:
            raise UserError(f"Output folder {folder} holds {kind} {found!r}, not {name!r}; choose another --output, "
                            "or delete that folder.")
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"Output folder {folder} is not empty and holds no {kind}; choose another --output.")
