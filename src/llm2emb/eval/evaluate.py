"""Evaluate one model on a list of tasks and write one result record per task: the loop behind
`llm2emb eval`, studies and periodic evaluation during training.

    from llm2emb.eval.evaluate import evaluate_embedder
    records = evaluate_embedder(embedder, ["builtin:stdlib", "data/stsb_en/dev.tsv"], label="my run",
                                output_dir="eval_results", options=TaskOptions(limits=100))
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from llm2emb.eval.results import make_record, now_iso, versions, write_record
from llm2emb.eval.tasks import Task, TaskOptions, resolve_task

logger = logging.getLogger(__name__)


def evaluate_tasks(encoder, tasks: Sequence[Task | str], options: TaskOptions, *, label: str,
                   model_info: dict[str, Any], config_path: str | None = None,
                   output_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Run every task with `encoder` (anything the task kinds accept); returns the records, also written to
    `output_dir` (one JSON per task) when given."""
    records = []
    env = versions()
    for task in tasks:
        task = resolve_task(task) if isinstance(task, str) else task
        started, start = now_iso(), time.perf_counter()
        logger.info("evaluating %s on %s (%s)", label, task.name, task.kind.name)
        outcome = task.kind.run(encoder, task.target, options)
        record = make_record(
            label=label, model=model_info, config=config_path, task=task, outcome=outcome, limits=options.limits,
            seed=options.seed, query_instruction=options.query_instruction, batch_size=options.batch_size,
            max_length=options.max_length, dim=options.dim, started=started, seconds=time.perf_counter() - start,
            versions=env)
        if output_dir is not None:
            record["path"] = str(write_record(record, Path(output_dir)))
        records.append(record)
    return records


def evaluate_embedder(embedder, tasks: Sequence[Task | str], *, label: str, options: TaskOptions | None = None,
                      output_dir: str | os.PathLike[str] | None = None, source: str = "",
                      config_path: str | None = None, shared: dict | None = None) -> list[dict[str, Any]]:
    """`evaluate_tasks` for an `Embedder` (at `options.dim` when set). Calls that pass the same `shared`
    dict encode each text list once and derive every Matryoshka dim from it."""
    from llm2emb.eval.encoders import EmbedderEncoder

    options = options or TaskOptions(show_progress=False)
    if getattr(embedder, "representation", None) is not None:  # multi_vector / sparse / hybrid
        from llm2emb.eval.representations import RepresentationEncoder

        encoder = RepresentationEncoder(embedder, dim=options.dim, name=source or label)
    else:
        encoder = EmbedderEncoder(embedder, dim=options.dim, name=source or label, shared=shared)
    info = {"source": source, "kind": "llm2emb", "fingerprint": encoder.fingerprint(), **encoder.describe()}
    return evaluate_tasks(encoder, tasks, options, label=label, model_info=info, config_path=config_path,
                          output_dir=output_dir)
