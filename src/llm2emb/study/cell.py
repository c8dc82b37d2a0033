"""One study cell, run in its own process: `python -m llm2emb.study.cell SPEC.json`.

Trains (or resumes, or finds finished) the cell's run, evaluates its final model on the study's tasks (and
at each Matryoshka dim), and writes the cell record atomically, last: a cell without its record is not done.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm2emb.atomic import write_json_atomic
from llm2emb.experiment.evaluation import compact_per_item, task_labels  # noqa: F401 - also imported from here
from llm2emb.layout import FINAL_DIR, METRICS_FILE, SUMMARY_FILE


def _curve(run_dir: Path) -> list[dict[str, Any]]:
    """The periodic evaluations logged during training (metrics.jsonl entries of type "eval")."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("type") == "eval":
            out.append(entry)
    return out


def world_size() -> tuple[int, int]:
    """(processes, this process's rank) of the launch: torchrun / accelerate set WORLD_SIZE and RANK."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def run_cell(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Train the cell and evaluate it (every process of a multi-process launch: data-parallel encoding); returns
    the record on the main process, None on the others."""
    from llm2emb.config import config_from_dict
    from llm2emb.eval.evaluate import evaluate_embedder
    from llm2emb.eval.tasks import TaskOptions
    from llm2emb.model.embedder import Embedder
    from llm2emb.model.precision import encode_setting
    from llm2emb.experiment.launchers.base import check_global_batch
    from llm2emb.train.trainer import train

    cfg = config_from_dict(spec["config"], spec["cell"]).validate(spec["cell"], untrained=spec["config"].get(
        "train_steps") == 0)
    world, _ = world_size()
    if world != spec.get("processes", world):
        from llm2emb.errors import UserError

        raise UserError(f"cell {spec['cell']} was planned for {spec['processes']} process(es) but runs in {world}; "
                        "start it through the study (its launcher sets the process count).")
    if cfg.train_steps == 0:   # the base model, tokenised and pooled as the recipe says
        embedder = Embedder.from_pretrained(
            cfg.model_path, pooling=cfg.pooling_mode, bidirectional=cfg.bi_attn_enabled,
            skip_instruction=cfg.skip_instruction, instruction_separator=cfg.instruction_separator,
            end_token=cfg.end_token, input_strategy=cfg.input_strategy, max_length=cfg.max_seq_length,
            attn_implementation=cfg.attn_implementation, summary_token=cfg.summary_token,
            summary_token_position=cfg.summary_token_position, summary_token_init=cfg.summary_token_init)
        source, summary = str(cfg.model_path), {"steps": 0, "train_seconds": 0.0}
    else:
        # the study's train_batch_size is the global batch: each process trains on its share of every step's rows
        cfg.train_batch_size = check_global_batch(cfg.train_batch_size, world, spec["cell"])
        train(cfg, show_progress=False)
        summary = json.loads((cfg.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        embedder = Embedder.from_pretrained(cfg.run_dir / FINAL_DIR)
        source = str(cfg.run_dir / FINAL_DIR)
    from llm2emb.eval.distributed import join_process_group

    rank, _ = join_process_group()   # every process encodes its shard of each task's texts; the main one writes

    ev = spec["eval"]
    tasks = ev["tasks"]
    labels = task_labels([t["spec"] for t in tasks], [t.get("name") for t in tasks])
    embedder.config.precision = encode_setting(ev.get("precision"))  # Embedder.encode / encode_heads use it
    eval_precision = embedder.compute_precision().name
    dims = [None] + [d for d in ev.get("dims") or [] if d < embedder.embedding_dim]
    metrics: dict[str, dict[str, float]] = {}
    main: dict[str, dict[str, Any]] = {}
    per_item: dict[str, Any] = {}
    started = time.perf_counter()
    for task, label in zip(tasks, labels):
        shared: dict = {}   # one encoding per text list, truncated for each Matryoshka dim
        def pick(key: str) -> Any:
            return task.get(key) if task.get(key) is not None else ev.get(key)
        for dim in dims:
            options = TaskOptions(limits=pick("limits"), seed=ev.get("seed", 42),
                                  query_instruction=pick("query_instruction"), batch_size=pick("batch_size") or 32,
                                  max_length=pick("max_length"), dim=dim, split=pick("split"), cache=False,
                                  show_progress=False)
            row = label if dim is None else f"{label}@{dim}"
            (record,) = evaluate_embedder(embedder, [task["spec"]], label=spec["cell"], options=options,
                                          output_dir=cfg.run_dir / "eval" if rank == 0 else None,
                                          source=source,
                                          shared=shared)
            metrics[row] = record["metrics"]
            main[row] = {"metric": record["main_score"], "value": record["metrics"].get(record["main_score"]),
                         "kind": record["task"]["kind"]}
            per_item[row] = compact_per_item(record)
    if rank != 0:
        return None
    last = summary.get("last_train") or {}
    return {
        "cell": spec["cell"], "recipe": spec["recipe"], "seed": spec["seed"], "hash": spec["hash"],
        "eval_hash": spec.get("eval_hash", ""),
        "status": "done", "steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
        "samples_per_second": summary.get("samples_per_second"), "final_loss": last.get("loss"),
        "skipped_steps": summary.get("skipped_steps", 0), "eval_seconds": round(time.perf_counter() - started, 1),
        "eval_precision": eval_precision,
        "metrics": metrics, "main": main, "per_item": per_item, "curve": _curve(cfg.run_dir),
        "config": spec["config"], "run_dir": str(cfg.run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    from llm2emb.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        record = run_cell(spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if record is not None:
        write_json_atomic(Path(spec["result"]), record)
    from llm2emb.eval.distributed import finish

    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
