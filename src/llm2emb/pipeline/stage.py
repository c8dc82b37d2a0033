"""One training stage of a pipeline, run in its own process tree: `python -m llm2emb.pipeline.stage SPEC.json`
(or `accelerate launch ... -m llm2emb.pipeline.stage SPEC.json`), as the pipeline's launcher starts it.

The spec holds the stage's resolved training config with the GLOBAL batch; each of the launch's processes trains
on its share. Training resumes from the run's checkpoints like `llm2emb train`; the pipeline driver reads the
run's train_summary.json afterwards (evaluation stays in the driver).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def train_stage(spec: dict[str, Any]) -> None:
    """Train the stage's config (every process of the launch)."""
    from llm2emb.config import config_from_dict
    from llm2emb.errors import UserError
    from llm2emb.experiment.launchers.base import check_global_batch
    from llm2emb.train.trainer import train

    where = f"stage {spec['stage']!r}"
    cfg = config_from_dict(spec["config"], where).validate(where)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != spec.get("processes", world):
        raise UserError(f"{where} was planned for {spec['processes']} process(es) but runs in {world}; start it "
                        "through the pipeline (its launcher sets the process count).")
    cfg.train_batch_size = check_global_batch(cfg.train_batch_size, world, where)
    train(cfg, show_progress=False)


def main(argv: list[str] | None = None) -> int:
    from llm2emb.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        train_stage(spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
