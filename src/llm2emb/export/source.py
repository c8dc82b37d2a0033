"""Find the model behind a `--model` argument: a training run, one of its checkpoints, or any model.

Run layout written by `llm2emb train` (`output_dir/experiment_id/`):
    config.json                      {"config": resolved training config (the seed's field names), versions, ...}
    final/                           Embedder folder of the finished run (LoRA kept as an adapter)
    checkpoints/step_N/model/        Embedder folder of step N
    checkpoints/step_N/trainer_state.json   written last: marks the checkpoint complete (see train.checkpoint)
    metrics.jsonl, train_summary.json, eval/*.json    training log and `llm2emb eval` results

A run resolves to `final/`, else to its newest complete checkpoint (completeness as the trainer defines it). Anything else (an Embedder folder,
a Hugging Face folder, a .gguf file, a built-in alias, a hub id) is passed through to `Embedder.from_pretrained`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llm2emb.errors import UserError
from llm2emb.model.embedder import CONFIG_NAME
from llm2emb.train import checkpoint as ckpt

FINAL_DIR = "final"
CHECKPOINTS_DIR = ckpt.CHECKPOINTS
CHECKPOINT_MODEL_DIR = ckpt.MODEL_DIR
CHECKPOINT_COMPLETE = ckpt.TRAINER_STATE
RUN_CONFIG = "config.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


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
        if self.run_dir is None:
            return None
        return read_run_config(self.run_dir)


def _training_config(data: object) -> dict | None:
    """The resolved training config inside a run's config.json (the trainer nests it under "config")."""
    if not isinstance(data, dict) or "model_type" in data:
        return None
    inner = data.get("config")
    if isinstance(inner, dict) and "model_path" in inner:
        return inner
    return data if "model_path" in data else None


def read_run_config(run_dir: Path) -> dict | None:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Run config {path} is not valid JSON ({exc}); fix or remove it.") from exc
    return _training_config(data)


def _is_embedder_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def _looks_like_run(path: Path) -> bool:
    """A run dir has final/ or checkpoints/, or at least a training config (no HF `model_type`)."""
    if (path / FINAL_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir():
        return True
    config = path / RUN_CONFIG
    if not config.is_file() or _is_embedder_folder(path):
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return _training_config(data) is not None


def _checkpoint_step(path: Path) -> int | None:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


def _is_complete(checkpoint: Path) -> bool:
    return ckpt.read_trainer_state(checkpoint) is not None and _is_embedder_folder(checkpoint / CHECKPOINT_MODEL_DIR)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint dir) of every complete checkpoint that holds a model, oldest first."""
    return [(step, path) for step, path in ckpt.complete_checkpoints(run_dir)
            if _is_embedder_folder(path / CHECKPOINT_MODEL_DIR)]


def _run_of_embedder_folder(path: Path) -> tuple[Path | None, int | None]:
    """`run/final` -> (run, None); `run/checkpoints/step_N/model` -> (run, N); otherwise (None, None)."""
    path = path.resolve()
    if path.name == FINAL_DIR and (path.parent / RUN_CONFIG).is_file():
        return path.parent, None
    if path.name == CHECKPOINT_MODEL_DIR and path.parent.parent.name == CHECKPOINTS_DIR:
        step = _checkpoint_step(path.parent)
        if step is not None:
            return path.parents[2], step
    return None, None


def resolve_model_source(model: str) -> ModelSource:
    """Resolve `--model` (run dir, checkpoint dir, Embedder folder or any model path) to a `ModelSource`."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return ModelSource(model_path=str(model))
    if _is_embedder_folder(path):
        run_dir, step = _run_of_embedder_folder(path)
        return ModelSource(str(path), run_dir, step)
    # A checkpoint dir: checkpoints/step_N with model/ and the completion marker.
    step = _checkpoint_step(path)
    if (path / CHECKPOINT_MODEL_DIR).is_dir() or (step is not None and path.parent.name == CHECKPOINTS_DIR):
        if not _is_complete(path):
            raise UserError(f"Checkpoint {path} is incomplete (no {CHECKPOINT_COMPLETE}, state/ or "
                            f"{CHECKPOINT_MODEL_DIR}/{CONFIG_NAME}): it was interrupted while saving; pass the run "
                            "dir to use its newest complete checkpoint.")
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
        return ModelSource(str(path / CHECKPOINT_MODEL_DIR), run_dir, step)
    if _looks_like_run(path):
        if _is_embedder_folder(path / FINAL_DIR):
            return ModelSource(str(path / FINAL_DIR), path, None)
        checkpoints = complete_checkpoints(path)
        if checkpoints:
            step, newest = checkpoints[-1]
            return ModelSource(str(newest / CHECKPOINT_MODEL_DIR), path, step)
        raise UserError(f"Run {path} has no final model ({FINAL_DIR}/) and no complete checkpoint "
                        f"({CHECKPOINTS_DIR}/step_N/ with {CHECKPOINT_COMPLETE}); let training save one, "
                        "or pass a model folder.")
    return ModelSource(str(path))
