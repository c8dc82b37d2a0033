"""Running a pipeline: stages in order, each from the result of the stage it names, every result evaluated.

Output folder layout:
    spec.json                 the pipeline's name (a folder holds one pipeline)
    pipeline.json             every stage's record (rewritten after each stage), report.md, report.png
    data/<stage>/             the stage's raw input, SimCSE rows, prepared data (+ teacher columns)
    stages/<stage>/key.json   what the stage is (its key), written when it starts
    stages/<stage>/input/     the model made for the stage, when it needs one (see pipeline.models)
    stages/<stage>/stage.json the finished stage: key, result, training summary, evaluation (written last)
    runs/<stage>/             a training stage's run (checkpoints, final/); merged/<stage>/ a merge stage's model
    eval/<stage>/             evaluation records

A stage's key is a hash of what decides its result: its training config (bookkeeping fields such as log or
checkpoint frequency excluded), data (paths, sizes, times), SimCSE / dropout / teacher / start settings or
merge settings, and the keys of the stages it starts from or merges. A stage whose stage.json has its key
is done (only its evaluation is redone when the eval settings changed); one whose key changed is cleared and
run again -- and with it every stage that uses its result, whose keys change in turn. An interrupted stage
resumes inside, through the trainer's checkpoints (its key.json must still match).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from llm2emb.allocator import release_freed_memory
from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError
from llm2emb.layout import check_job_folder
from llm2emb.pipeline.spec import START, Pipeline, Stage, root_model

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
PIPELINE_FILE = "pipeline.json"
STAGE_FILE = "stage.json"
KEY_FILE = "key.json"
VERSION = 1


def _hash(data: Any) -> str:
    from llm2emb.experiment.fields import config_hash

    return config_hash(data)


def _model_fingerprint(model: str) -> str:
    from llm2emb.pipeline.models import model_fingerprint

    return model_fingerprint(model)


class PipelineRunner:
    def __init__(self, pipeline: Pipeline, output: str | Path) -> None:
        self.pipeline = pipeline
        self.output = Path(output).expanduser()
        self.keys: dict[str, str] = {}
        self.results: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.compared: dict[tuple, dict[str, Any]] = {}   # baseline comparisons already computed (report.py)

    # ------------------------------------------------------------------ output folder
    def check_output(self) -> None:
        check_job_folder(self.output, SPEC_FILE, self.pipeline.name, "pipeline")
        if any(self.output.glob(f"seed-*/{SPEC_FILE}")):
            raise UserError(f"Output folder {self.output} holds a seeds run of pipeline {self.pipeline.name!r}; give "
                            "the same seeds (--seeds) to continue it, or choose another --output.")

    def claim_output(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output / SPEC_FILE, {"name": self.pipeline.name, "file": str(self.pipeline.path),
                                                    "stages": [s.name for s in self.pipeline.stages]})

    def stage_dir(self, name: str) -> Path:
        return self.output / "stages" / name

    # ------------------------------------------------------------------ keys
    def stage_key(self, stage: Stage) -> str:
        from llm2emb.pipeline.data import data_fingerprint
        from llm2emb.pipeline.spec import RUNNER_FIELDS
        from llm2emb.train.run_info import RESUMABLE_FIELDS

        what: dict[str, Any] = {"version": VERSION, "kind": stage.kind,
                                "uses": {ref: self.keys[ref] for ref in stage.references()}}
        if stage.merge is not None:
            what["merge"] = asdict(stage.merge)
            if stage.merge.base and not stage.merge.base_is_stage:
                what["base_model"] = _model_fingerprint(stage.merge.base)
        else:
            what["config"] = {k: v for k, v in stage.config.items()
                              if k not in RESUMABLE_FIELDS and k not in RUNNER_FIELDS}
            what["data"] = data_fingerprint(stage.data)
            what["data_settings"] = self.pipeline.data
            what.update(simcse=stage.simcse, dropout=stage.dropout, start=stage.start)
            if stage.model is not None:
                what["model"] = {"model": stage.model, "fingerprint": _model_fingerprint(stage.model)}
            if stage.teacher is not None:
                teacher = asdict(stage.teacher)
                if stage.teacher.stage is None:       # a stage teacher is in "uses" through its key
                    teacher["fingerprint"] = _model_fingerprint(stage.teacher.model)
                what["teacher"] = teacher
        return _hash(what)

    def eval_key(self) -> str:
        """Hash of the evaluation settings, with the precision auto resolves to here (`eval_identity`)."""
        from llm2emb.experiment.evaluation import eval_identity

        return _hash(eval_identity(self.pipeline.eval))

    # ------------------------------------------------------------------ running
    def run(self) -> dict[str, Any]:
        from llm2emb.pipeline.report import write_reports

        self.check_output()
        if self.pipeline.launcher is not None and not self.pipeline.launcher.in_driver:
            self.pipeline.launcher.check(1)      # devices, config file, cluster: before any stage runs
        self.claim_output()
        pipeline = self.pipeline
        self.keys[START] = _hash({"model": pipeline.model, "fingerprint": _model_fingerprint(pipeline.model)})
        self.results[START] = pipeline.model
        from llm2emb.pipeline.models import dropout_values, local_folder

        # dropout values of every model a stage grows from (stages after a SimCSE stage go back to them)
        self.start_dropout = {model: dropout_values(local_folder(model)) for model in
                              {pipeline.model, *(s.model for s in pipeline.stages if s.model is not None)}}
        total = len(pipeline.stages)
        if pipeline.eval_start:
            self.records[START] = self._evaluate_start()
            write_reports(self)
        for i, stage in enumerate(pipeline.stages, 1):
            key = self.stage_key(stage)
            self.keys[stage.name] = key
            record = self._finished(stage, key)
            if record is not None:
                print(f"[{i}/{total}] {stage.name}: done (skipped)", flush=True)
                if self._needs_eval(record):
                    record = self._with_eval(record, record["result"], stage.name)
                    write_json_atomic(self.stage_dir(stage.name) / STAGE_FILE, record)
            else:
                self._clear_if_stale(stage, key)
                write_json_atomic(self.stage_dir(stage.name) / KEY_FILE, {"key": key})
                print(f"[{i}/{total}] {stage.name}: {self._describe(stage)}", flush=True)
                started = time.perf_counter()
                record = self._run_merge(stage) if stage.merge is not None else self._run_training(stage)
                record.update(name=stage.name, kind=stage.kind, key=key, status="done",
                              wall_seconds=round(time.perf_counter() - started, 1))
                record = self._with_eval(record, record["result"], stage.name)
                write_json_atomic(self.stage_dir(stage.name) / STAGE_FILE, record)
            self.results[stage.name] = record["result"]
            self.records[stage.name] = record
            release_freed_memory()      # the stage's model, optimizer and activations: not carried into the next
            print(f"      {_summary(record)}", flush=True)
            write_reports(self)
        return write_reports(self)

    def _describe(self, stage: Stage) -> str:
        if stage.merge is not None:
            return f"merging {', '.join(stage.merge.stages)} ({stage.merge.method})"
        steps = stage.config.get("train_steps", -1)
        mntp = stage.config.get("mntp_mask_probability") or 0
        extra = [x for x, on in (("SimCSE", stage.simcse), (f"MNTP {mntp}", mntp),
                                 (f"dropout {stage.dropout}", stage.dropout), ("teacher", stage.teacher is not None),
                                 ("LoRA", stage.trains_lora)) if on]
        return (f"training from {stage.model or stage.source} ({steps} steps"
                + (f", {', '.join(extra)}" if extra else "") + ")")

    def _finished(self, stage: Stage, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads((self.stage_dir(stage.name) / STAGE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("key") != key or record.get("status") != "done":
            return None
        if not Path(record.get("result", "")).exists():
            moved = self._moved_result(stage, record.get("result", ""))
            if moved is None:
                return None
            record["result"] = moved
        return record

    def _moved_result(self, stage: Stage, result: str) -> str | None:
        """A finished stage's result in this folder when the folder was moved (records keep absolute paths),
        e.g. a single-seed run moved into a seeds run's seed-<n>/."""
        from llm2emb.layout import FINAL_DIR

        for candidate in (self.output / "runs" / stage.name / FINAL_DIR, self.output / "merged" / stage.name):
            tail = candidate.relative_to(self.output).parts
            if candidate.exists() and Path(result).parts[-len(tail):] == tail:
                return str(candidate)
        return None

    def _clear_if_stale(self, stage: Stage, key: str) -> None:
        """A stage whose key changed starts over: its old run, input, result and evaluation go."""
        saved = None
        try:
            saved = json.loads((self.stage_dir(stage.name) / KEY_FILE).read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError):
            pass
        stale = saved is not None and saved != key
        leftovers = [self.output / "runs" / stage.name, self.output / "merged" / stage.name,
                     self.output / "eval" / stage.name, self.stage_dir(stage.name)]
        if stale or (saved is None and any(p.exists() for p in leftovers)):
            logger.info("stage %s changed (or its input did); running it again", stage.name)
            for path in leftovers + [self.output / "tensorboard" / stage.name]:
                shutil.rmtree(path, ignore_errors=True)
        else:
            (self.stage_dir(stage.name) / STAGE_FILE).unlink(missing_ok=True)

    def _source_result(self, name: str) -> str:
        return self.results[name]

    def _run_training(self, stage: Stage) -> dict[str, Any]:
        from llm2emb.config import config_from_dict
        from llm2emb.layout import FINAL_DIR, SUMMARY_FILE
        from llm2emb.pipeline.data import prepare_stage_data
        from llm2emb.pipeline.models import prepare_stage_input

        source = stage.model or self._source_result(stage.source)
        start_values = self.start_dropout[root_model(self.pipeline.stages, stage.name, self.pipeline.model)]
        if stage.teacher is not None and stage.teacher.stage is not None:   # the teacher is an earlier result
            stage = replace(stage, teacher=replace(stage.teacher, model=self._source_result(stage.teacher.stage)))
        made = prepare_stage_input(source, self.stage_dir(stage.name) / "input", dropout=stage.dropout,
                                   start_values=start_values, start=stage.start, trains_lora=stage.trains_lora,
                                   source_is_stage=stage.source != START)
        _, prepared = prepare_stage_data(stage, made.model_path, stage.config, self.pipeline.data,
                                         self.output / "data" / stage.name)
        release_freed_memory()          # a teacher that embedded the data is gone before training starts
        values = {**stage.config, "model_path": made.model_path, "train_data_path": prepared,
                  "output_dir": str(self.output / "runs"), "experiment_id": stage.name,
                  "tb_dir": str(self.output / "tensorboard"), "lora_adapter_path": made.lora_adapter_path}
        # one tracker run per stage (report_to / run_name do not change a stage's identity)
        values["run_name"] = (f"{values['run_name']}/" if values.get("run_name") else "") + \
            f"{self.pipeline.name}/{stage.name}" + (f"/seed-{values['seed']}" if "seed" in values else "")
        if stage.teacher is not None and stage.teacher.on_the_fly:
            values.update(teacher_model=stage.teacher.model, teacher_instructions=stage.teacher.instructions,
                          teacher_max_length=stage.teacher.max_length)
        where = f"{self.pipeline.path}: stage {stage.name!r}"
        cfg = config_from_dict(values, where).validate(where)
        steps = cfg.train_steps if cfg.train_steps > 0 else None
        if steps and (cfg.checkpointing_steps == 0 or cfg.checkpointing_steps >= steps):
            cfg.checkpointing_steps = max(1, steps // 4)    # a killed stage loses at most a quarter of its steps
            cfg.save_total_limit = cfg.save_total_limit or 1
        self._train(stage.name, cfg)
        summary = json.loads((cfg.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        last = summary.get("last_train") or {}
        return {"result": str(cfg.run_dir / FINAL_DIR), "source": stage.source, "model_path": made.model_path,
                "train_data_path": prepared, "steps": summary.get("steps"),
                "train_seconds": summary.get("train_seconds"), "final_loss": last.get("loss"),
                "lora": stage.trains_lora, "simcse": stage.simcse, "dropout": stage.dropout,
                "teacher": stage.teacher.model if stage.teacher else None}

    def _train(self, name: str, cfg) -> None:
        """Train a stage's config: inside this process under the local launcher (as `llm2emb train`), else as
        its own job (`python -m llm2emb.pipeline.stage`) started by the pipeline's launcher, with the GLOBAL
        batch in its spec; a failed job stops the pipeline with its error line and log."""
        from llm2emb.experiment.launchers import Job
        from llm2emb.layout import SUMMARY_FILE

        launcher = self.pipeline.launcher
        if launcher is None or launcher.in_driver:
            from llm2emb.train.trainer import train

            train(cfg, show_progress=False)
            return
        self._check_resume_processes(name, cfg, launcher.processes)
        spec_path = self.stage_dir(name) / "train.spec.json"
        write_json_atomic(spec_path, {"stage": name, "config": cfg.to_dict(), "processes": launcher.processes})
        job = Job(name, "llm2emb.pipeline.stage", spec_path, self.output / "logs" / f"{name}.log",
                  cfg.run_dir / SUMMARY_FILE)
        outcomes: list = []
        launcher.run([job], lambda job, slot: None, outcomes.append, folder=self.output)
        (outcome,) = outcomes
        if outcome.code != 0 or not job.result_path.exists():
            try:
                lines = job.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            except OSError:
                lines = []
            errors = [line for line in lines if line.startswith("error:")]
            tail = (errors or lines[-1:] or [""])[-1][:300]
            raise UserError(f"Stage {name!r} failed under the {launcher.kind} launcher (exit code {outcome.code}): "
                            f"{tail} (log: {job.log_path}).")

    def _check_resume_processes(self, name: str, cfg, processes: int) -> None:
        """An unfinished stage resumes only with the process count that wrote its checkpoints: refused before
        launching (the trainer would refuse too, but only inside the job)."""
        try:
            saved = json.loads((cfg.run_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        before = int((saved.get("launch") or {}).get("num_processes", 1))
        if before != processes and (cfg.run_dir / "checkpoints").is_dir():
            raise UserError(f"Stage {name!r} was started with {before} process(es) and is unfinished; run it with "
                            f"{before} process(es) again (the launcher's num_processes) to resume, or delete "
                            f"{cfg.run_dir} to start it over.")

    def _run_merge(self, stage: Stage) -> dict[str, Any]:
        from llm2emb.merge import merge_models

        spec = stage.merge
        base = None
        if spec.base is not None:
            base = self._source_result(spec.base) if spec.base_is_stage else spec.base
        inputs = [self._source_result(name) for name in spec.stages]
        result = merge_models(inputs, self.output / "merged" / stage.name, method=spec.method, weights=spec.weights,
                              base=base, options=spec.options, adapter_level=spec.adapter_level, any_base=True,
                              overwrite=True)
        return {"result": str(result.path), "merged": list(spec.stages), "method": spec.method,
                "weights": result.weights, "base": result.base, "train_seconds": 0.0, "steps": 0}

    # ------------------------------------------------------------------ evaluation
    def _evaluate_start(self) -> dict[str, Any]:
        path = self.stage_dir(START) / STAGE_FILE
        key = self.keys[START]
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if record is None or record.get("key") != key or self._needs_eval(record):
            print(f"[0/{len(self.pipeline.stages)}] start ({self.pipeline.model}): evaluating", flush=True)
            record = self._with_eval({"name": START, "kind": "start", "key": key, "status": "done",
                                      "result": self.pipeline.model, "steps": 0, "train_seconds": 0.0},
                                     self.pipeline.model, START)
            write_json_atomic(path, record)
        return record

    def _needs_eval(self, record: dict[str, Any]) -> bool:
        """Evaluated with other settings, or (with a baseline) without the per-item results its intervals need
        (a record from an older llm2emb)."""
        rows = (record.get("eval") or {}).values()
        return record.get("eval_key") != self.eval_key() or bool(
            self.pipeline.baseline and not all(row.get("per_item") for row in rows))

    def _with_eval(self, record: dict[str, Any], model: str, label: str) -> dict[str, Any]:
        from llm2emb.model.precision import resolved_encode_precision

        record = dict(record)
        started = time.perf_counter()
        record["eval"] = evaluate_model(model, self.pipeline.eval, label, self.output / "eval" / label)
        record["eval_key"] = self.eval_key()
        record["eval_precision"] = resolved_encode_precision(self.pipeline.eval.precision)
        record["eval_seconds"] = round(time.perf_counter() - started, 1)
        return record


def evaluate_model(model: str, spec, label: str, output_dir: Path) -> dict[str, dict[str, Any]]:
    """{row: {metric, value, kind, metrics}} of `model` on the eval tasks (rows: task labels, @dim rows for
    Matryoshka dims), through the shared eval loop (`llm2emb.eval.evaluate.evaluate_embedder`)."""
    from llm2emb.eval.evaluate import evaluate_embedder
    from llm2emb.eval.tasks import TaskOptions
    from llm2emb.model.embedder import Embedder
    from llm2emb.experiment.evaluation import compact_per_item, task_labels
    from llm2emb.model.precision import encode_setting

    shutil.rmtree(output_dir, ignore_errors=True)
    embedder = Embedder.from_pretrained(model, precision=encode_setting(spec.precision))
    labels = task_labels([t.spec for t in spec.tasks], [t.name for t in spec.tasks])
    dims = [None] + [d for d in spec.dims if d < embedder.embedding_dim]
    rows: dict[str, dict[str, Any]] = {}
    for task, row_label in zip(spec.tasks, labels):
        shared: dict = {}
        def pick(key: str) -> Any:
            value = getattr(task, key)
            return value if value is not None else getattr(spec, key)
        for dim in dims:
            options = TaskOptions(limits=pick("limits"), seed=spec.seed, query_instruction=pick("query_instruction"),
                                  batch_size=pick("batch_size") or 32, max_length=pick("max_length"), dim=dim,
                                  split=pick("split"), cache=False, show_progress=False)
            (record,) = evaluate_embedder(embedder, [task.spec], label=label, options=options, output_dir=output_dir,
                                          source=str(model), shared=shared)
            row = row_label if dim is None else f"{row_label}@{dim}"
            rows[row] = {"metric": record["main_score"], "value": record["metrics"].get(record["main_score"]),
                         "kind": record["task"]["kind"], "metrics": record["metrics"],
                         "per_item": compact_per_item(record)}      # for the baseline's paired intervals
    return rows


def _summary(record: dict[str, Any]) -> str:
    scores = ", ".join(f"{row} {v['metric']} {v['value']:.4f}" for row, v in (record.get("eval") or {}).items()
                       if isinstance(v.get("value"), (int, float)))
    cost = f"{record.get('steps') or 0} steps in {record.get('train_seconds') or 0:.0f}s"
    return f"{cost}; {scores}" if scores else cost
