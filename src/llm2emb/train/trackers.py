"""Starting the experiment trackers of a training run; the registry (`TRACKERS`, `register_tracker`,
`check_report_to`) lives in `llm2emb/trackers.py`, below `config`, and is re-exported here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm2emb.trackers import (TRACKERS, TrackerKind, check_report_to, mlflow_tracking_uri, register_tracker,
                              run_name)

if TYPE_CHECKING:
    from llm2emb.config import TrainConfig

__all__ = ["TRACKERS", "TrackerKind", "check_report_to", "mlflow_tracking_uri", "register_tracker", "run_name",
           "start_trackers"]


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def start_trackers(cfg: "TrainConfig", run_dir: Path) -> list[Any]:
    """Started accelerate trackers for `cfg.report_to` (main process only), with the config as parameters
    (TensorBoard keeps its events free of hyperparameter tables, as before)."""
    check_report_to(cfg.report_to)
    trackers = []
    for name in cfg.report_to:
        tracker = TRACKERS[name].make(cfg, run_dir)
        tracker.start()
        if name != "tensorboard":
            tracker.store_init_configuration({k: _hparam(v) for k, v in cfg.to_dict().items()})
        trackers.append(tracker)
    return trackers
