"""The registry of experiment trackers (`report_to`), all through accelerate's tracker classes.

It sits below `config` (which validates `report_to` against it) and `train` (which starts the trackers,
`llm2emb/train/trackers.py`), so that `config` never imports `train`. Only the standard library and `errors`
are imported at module level; each tracker imports accelerate and its library when it starts.

`report_to: [tensorboard, wandb, mlflow]` in a training config (default `[tensorboard]`; `[]`: metrics.jsonl
only) and `run_name` (default: experiment_id) choose where `MetricsWriter` sends every logged value. Adding a
tracker is one `register_tracker(...)` call here. Neither field changes a run's identity (they are in
`run_info.RESUMABLE_FIELDS`): a finished run or study cell is not trained again because its tracker changed.

- tensorboard: events under `tb_dir/experiment_id` (as before).
- wandb: project `$WANDB_PROJECT` (default "llm2emb"), run `run_name`, files under the run folder; offline with
  `WANDB_MODE=offline`.
- mlflow: experiment `$MLFLOW_EXPERIMENT_NAME` (default "llm2emb"), run `run_name`, tracking URI
  `$MLFLOW_TRACKING_URI`, else the local store `sqlite:///<tb_dir>/mlflow.db` (accelerate's tracker sets none;
  MLflow 3 refuses file stores; the `mlflow` extra installs mlflow-skinny plus SQLAlchemy and alembic for sqlite).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm2emb.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from llm2emb.config import TrainConfig


@dataclass(frozen=True)
class TrackerKind:
    name: str
    module: str                                   # the package the tracker needs
    extra: str | None                             # pip install 'llm2emb[extra]' installs it
    make: Callable[["TrainConfig", Path], Any]    # (config, run folder) -> a started accelerate GeneralTracker


TRACKERS: dict[str, TrackerKind] = {}


def register_tracker(kind: TrackerKind) -> TrackerKind:
    TRACKERS[kind.name] = kind
    return kind


def run_name(cfg: "TrainConfig") -> str:
    return cfg.run_name or cfg.experiment_id


def _tensorboard(cfg: "TrainConfig", run_dir: Path):
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker(cfg.experiment_id, str(Path(cfg.tb_dir).expanduser()))


def _wandb(cfg: "TrainConfig", run_dir: Path):
    from accelerate.tracking import WandBTracker

    return WandBTracker(os.environ.get("WANDB_PROJECT", "llm2emb"), name=run_name(cfg), dir=str(run_dir))


def mlflow_tracking_uri(cfg: "TrainConfig") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.tb_dir).expanduser().resolve() / 'mlflow.db'}"


def _mlflow(cfg: "TrainConfig", run_dir: Path):
    import mlflow
    from accelerate.tracking import MLflowTracker

    mlflow.set_tracking_uri(mlflow_tracking_uri(cfg))
    return MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", "llm2emb"), run_name=run_name(cfg),
                         tags={"experiment_id": cfg.experiment_id})


register_tracker(TrackerKind("tensorboard", "tensorboard", None, _tensorboard))
register_tracker(TrackerKind("wandb", "wandb", "wandb", _wandb))
register_tracker(TrackerKind("mlflow", "mlflow", "mlflow", _mlflow))


def check_report_to(names: Iterable[str], source: str = "config") -> None:
    """Unknown tracker: did-you-mean; missing package: the extra to install. One sentence each."""
    for name in names:
        kind = TRACKERS.get(name)
        if kind is None:
            raise UserError(f"{source}: report_to has unknown tracker {name!r}; known: {', '.join(TRACKERS)}."
                            + did_you_mean(name, TRACKERS))
        if importlib.util.find_spec(kind.module) is None:
            install = f"pip install 'llm2emb[{kind.extra}]'" if kind.extra else f"pip install {kind.module}"
            raise UserError(f"{source}: report_to {name!r} needs the {kind.module} package: {install}.")
