"""Running a study: prepare data once per tokenizer, then train and evaluate every (recipe, seed) cell.

Output folder layout:
    study.json            every cell's record + summary + comparisons (rewritten after each cell)
    report.md, report.png, curves.png
    spec.json             the study's name and resolved recipes (a folder holds one study)
    data/<tokenizer>/     prepared training data, shared by the cells that use that tokenizer
    cells/<cell>.json     one finished cell: config hash, metrics, per-item scores, cost (written last)
    runs/<cell>/          the cell's training run (checkpoints, final/, eval/*.json records)
    logs/<cell>.log       the cell's output
    launcher.json         the launcher kind and process count the unfinished cells were started with

Each cell runs in its own process (`python -m llm2emb.study.cell`), started by the study's launcher
(`llm2emb.experiment.launchers`: local, accelerate, slurm, ...; `max_parallel` cells side by side), so its peak
memory is its own and a failing cell cannot take the study down. A cell whose cells/<cell>.json exists with the same config hash is
skipped; a changed config deletes the old run and trains again; an interrupted cell resumes through the
trainer's exact resume.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError
from llm2emb.layout import EVAL_DIR, FINAL_DIR, SUMMARY_FILE, check_job_folder
from llm2emb.study.spec import Study, config_hash

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
STUDY_FILE = "study.json"
CELLS_DIR = "cells"
RUNS_DIR = "runs"
LOGS_DIR = "logs"
DATA_DIR = "data"
LAUNCH_FILE = "launcher.json"   # the launcher kind and process count of the unfinished cells
#: train_data_path of a `train_steps: 0` cell (it trains on nothing)
UNTRAINED_DATA = "(untrained)"


@dataclass
class Cell:
    recipe: str
    seed: int
    config: dict[str, Any]   # the resolved training config (TrainConfig.to_dict())
    hash: str                # of the fields that decide the trained model (not logging / checkpoint frequency)
    eval_hash: str = ""      # of the evaluation settings: a change re-evaluates without retraining

    @property
    def name(self) -> str:
        return f"{self.recipe}.seed{self.seed}"


def result_hash(config: dict[str, Any]) -> str:
    """Hash of what decides a cell's result: resumable bookkeeping fields (log / checkpoint frequency,
    paths) do not count, so changing them never re-runs a finished cell; nor do fields at their default, so a
    field added by a newer llm2emb (its default keeps the old behaviour) leaves finished cells finished."""
    from llm2emb.config import TrainConfig
    from llm2emb.train.run_info import RESUMABLE_FIELDS

    defaults = TrainConfig().to_dict()
    return config_hash({k: v for k, v in config.items()
                        if k not in RESUMABLE_FIELDS and (k not in defaults or v != defaults[k])})


class StudyRunner:
    def __init__(self, study: Study, output: str | Path, only: list[str] | None = None) -> None:
        self.study = study
        self.output = Path(output).expanduser()
        names = [r.name for r in study.recipes]
        self.only = only or names
        unknown = [o for o in self.only if o not in names]
        if unknown:
            from llm2emb.errors import did_you_mean

            raise UserError(f"--only {unknown[0]!r} is not a recipe of {study.path.name}; its recipes are "
                            f"{', '.join(names)}.{did_you_mean(unknown[0], names)}")

    # ------------------------------------------------------------------ checks
    def check_output(self) -> None:
        """A folder holds one study: refuse one written by a study of another name."""
        check_job_folder(self.output, SPEC_FILE, self.study.name, "study")

    def claim_output(self) -> None:
        """Mark the output folder as this study's (after `check_output`)."""
        self.output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output / SPEC_FILE, {
            "name": self.study.name, "study_file": str(self.study.path),
            "recipes": [r.name for r in self.study.recipes], "seeds": self.study.seeds})

    # ------------------------------------------------------------------ data
    def _tokenizer_key(self, config: dict[str, Any]) -> tuple[str, ...]:
        from llm2emb.model.summary_token import data_setting

        key = (str(config["model_path"]), str(config.get("end_token", "auto")))
        strategy = config.get("input_strategy", "plain")
        key = key if strategy == "plain" else (*key, str(strategy))
        summary = data_setting(config)  # pooling cls: the summary token and where it goes
        return key if summary is None else (*key, "summary", *summary)

    def data_paths(self, configs: list[dict[str, Any]], prepare: bool) -> dict[tuple[str, str], str]:
        """train_data_path per (model, end token); raw input is prepared once for each (skipped when done)."""
        from llm2emb.eval.results import slug

        data = self.study.data
        keys = sorted({self._tokenizer_key(c) for c in configs})
        if data.train_data_path:
            return {key: data.train_data_path for key in keys}
        raw = data.input
        if isinstance(raw, str) and raw.startswith("builtin:"):
            raw = self._builtin_train(raw) if prepare else raw
        elif prepare and (isinstance(raw, list) or data.manifest):
            raw = self._raw_folder()
        out: dict[tuple[str, str], str] = {}
        for key in keys:
            model, end_token, *rest = key
            summary = tuple(rest[rest.index("summary") + 1:]) if "summary" in rest else None
            strategy = rest[:rest.index("summary")] if summary else rest
            target = self.output / DATA_DIR / slug("-".join([Path(model).name, end_token, *rest]))
            out[key] = str(target)
            if prepare:
                from llm2emb.data.tokenize import prepare as prepare_data

                lengths = [int(c["max_seq_length"]) for c in configs if self._tokenizer_key(c) == key]
                kwargs: dict[str, Any] = {"max_seq_length": data.max_seq_length or max(lengths),
                                          "workers": data.workers, "progress": False, "end_token": end_token,
                                          "input_strategy": strategy[0] if strategy else "plain"}
                if summary:
                    kwargs["summary_token"], kwargs["summary_token_position"] = summary
                if data.instruction_separator is not None:
                    kwargs["instruction_separator"] = data.instruction_separator
                print(f"preparing {raw} for {model} -> {target}", flush=True)
                prepare_data(model, raw, target, **kwargs)
        return out

    def _raw_folder(self) -> str:
        """data.input as one folder `prepare` reads: links to the listed files plus data.manifest."""
        data = self.study.data
        files = data.input if isinstance(data.input, list) else [data.input]
        folder = self.output / DATA_DIR / "raw"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for item in files:
            source = Path(item)
            for path in ([p for p in sorted(source.iterdir()) if p.is_file()] if source.is_dir() else [source]):
                if path.name != "manifest.json":
                    (folder / path.name).symlink_to(path.resolve())
        if data.manifest:
            write_json_atomic(folder / "manifest.json", data.manifest)
        return str(folder)

    @staticmethod
    def _builtin_train(name: str) -> str:
        from llm2emb.data.builtin import builtin_train_dir
        from llm2emb.model.loading import llm2emb_home

        return str(builtin_train_dir(name, llm2emb_home()))

    # ------------------------------------------------------------------ cells
    def cells(self, prepare: bool = False, only: list[str] | None = None) -> list[Cell]:
        """The cells of the selected recipes (`only`, default the runner's `--only`), seed-major."""
        from llm2emb.config import config_from_dict

        study = self.study
        selected = self.only if only is None else only
        recipes = [r for r in study.recipes if r.name in selected]
        from llm2emb.study.spec import untrained

        merged = {r.name: study.recipe_config(r) for r in recipes}
        paths = self.data_paths([c for c in merged.values() if not untrained(c)], prepare)
        cells = []
        # seed-major order: a study stopped early still has every recipe at its first seeds
        for seed in study.seeds:
            for recipe in recipes:
                fixed = untrained(merged[recipe.name])
                if fixed and seed != study.seeds[0]:
                    continue   # the untrained base model: one cell, nothing in it depends on the seed
                name = f"{recipe.name}.seed{seed}"
                data_path = UNTRAINED_DATA if fixed else paths[self._tokenizer_key(merged[recipe.name])]
                values = {**merged[recipe.name], "seed": seed, "experiment_id": name, "train_data_path": data_path,
                          "output_dir": str(self.output / RUNS_DIR), "tb_dir": str(self.output / "tensorboard")}
                # one tracker run per cell named after study, recipe and seed (report_to / run_name do not
                # change a cell's identity: run_info.RESUMABLE_FIELDS)
                values["run_name"] = (f"{values['run_name']}/" if values.get("run_name") else "") + \
                    f"{study.name}/{recipe.name}/seed-{seed}"
                cfg = config_from_dict(values, f"recipe {recipe.name!r}").validate(f"recipe {recipe.name!r}",
                                                                                   untrained=fixed)
                steps = cfg.train_steps if cfg.train_steps > 0 else None
                if steps and (cfg.checkpointing_steps == 0 or cfg.checkpointing_steps >= steps):
                    # a killed study should lose at most a quarter of a cell (does not change the result)
                    cfg.checkpointing_steps = max(1, steps // 4)
                    cfg.save_total_limit = cfg.save_total_limit or 1
                config = cfg.to_dict()
                cells.append(Cell(recipe.name, seed, config, result_hash(config), config_hash(_eval_dict(study))))
        return cells

    def cell_file(self, cell: Cell) -> Path:
        return self.output / CELLS_DIR / f"{cell.name}.json"

    def finished(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's record when it finished with this config, else None."""
        try:
            record = json.loads(self.cell_file(cell).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        fresh = record.get("hash") == cell.hash and record.get("eval_hash") == cell.eval_hash
        return record if fresh and record.get("status") == "done" else None

    def _clear_stale(self, cell: Cell) -> None:
        """A cell whose config changed starts over: its old run must never be resumed or mixed in."""
        path = self.cell_file(cell)
        run_dir = self.output / RUNS_DIR / cell.name
        try:
            saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            old = dict(saved["config"])
            # the run records its per-process batch; the cell's config holds the global one
            old["train_batch_size"] = old["train_batch_size"] * int((saved.get("launch") or {}).get("num_processes", 1))
        except (OSError, ValueError, KeyError, TypeError):
            old = None
        if old is not None and result_hash(old) != cell.hash:
            logger.info("cell %s: the config changed; training it again", cell.name)
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(self.output / "tensorboard" / cell.name, ignore_errors=True)
        if path.exists() and self.finished(cell) is None:
            path.unlink()
            shutil.rmtree(run_dir / EVAL_DIR, ignore_errors=True)  # records of other eval settings

    def measured_step_seconds(self) -> dict[str, float]:
        """Seconds per training step of each recipe, from its finished cells in the output folder."""
        out: dict[str, list[float]] = {}
        for path in sorted((self.output / CELLS_DIR).glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if record.get("status") == "done" and record.get("steps") and record.get("train_seconds"):
                out.setdefault(record["recipe"], []).append(record["train_seconds"] / record["steps"])
        return {recipe: sum(v) / len(v) for recipe, v in out.items()}

    def report_cells(self, records: dict[str, dict[str, Any]],
                     every_cell: list[Cell] | None = None) -> list[dict[str, Any]]:
        """The records a report is built from, in the study's order: this run's `records` plus every finished
        cell of the recipes `--only` left out, so a partial run never drops their rows or the baseline
        comparisons from report.md / study.json."""
        if every_cell is None:
            every_cell = self.cells(prepare=False, only=[r.name for r in self.study.recipes])
        out = []
        for cell in every_cell:
            record = records.get(cell.name)
            if record is None and cell.recipe not in self.only:
                record = self.finished(cell)
            if record is not None:
                out.append(record)
        return out

    # ------------------------------------------------------------------ launching
    @property
    def launcher(self):
        """The study's launcher (`launcher:` in the file, --launcher); local when none was loaded."""
        if self.study.launcher is None:
            from llm2emb.experiment.launchers import load_launcher

            self.study.launcher = load_launcher(None, str(self.study.path), self.study.path.parent)
        return self.study.launcher

    def check_launch(self, cells: list[Cell]) -> None:
        """Before anything runs: the launcher's own checks (devices, config file, cluster) and, while cells are
        unfinished, the same launcher kind and process count as the one that started them (a checkpoint resumes
        only with the world size that wrote it)."""
        launcher = self.launcher
        pending = [c for c in cells if self.finished(c) is None]
        launcher.check(len(pending))
        try:
            before = json.loads((self.output / LAUNCH_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        now = launcher.identity()
        if before == now:
            return
        started = [c.name for c in pending if (self.output / RUNS_DIR / c.name / "checkpoints").is_dir()]
        if started:
            raise UserError(f"{self.output}: cell(s) {', '.join(started)} were started under the {before.get('kind')} "
                            f"launcher with {before.get('processes')} process(es) and are unfinished; run the study "
                            f"with that launcher (--launcher {before.get('kind')}, num_processes "
                            f"{before.get('processes')}) to resume them, or delete their runs/ folders to start over.")

    def job(self, cell: Cell, write: bool = True):
        """The cell as a launcher job: its spec file (config with the GLOBAL batch; written unless `write` is
        False, for a dry run), log and result paths."""
        from llm2emb.experiment.launchers import Job

        spec_path = self.output / CELLS_DIR / f".{cell.name}.spec.json"
        if write:
            write_json_atomic(spec_path, {"cell": cell.name, "recipe": cell.recipe, "seed": cell.seed,
                                          "hash": cell.hash, "eval_hash": cell.eval_hash, "config": cell.config,
                                          "eval": _eval_dict(self.study), "result": str(self.cell_file(cell)),
                                          "processes": self.launcher.processes})
        return Job(cell.name, "llm2emb.study.cell", spec_path, self.output / LOGS_DIR / f"{cell.name}.log",
                   self.cell_file(cell))

    # ------------------------------------------------------------------ running
    def status(self) -> list[tuple[str, str, str]]:
        """(cell, state, detail) of every cell: done (its record), the scheduler's pending / running / failed,
        interrupted (checkpoints, no job), not started."""
        cells = self.cells(prepare=False)
        states = self.launcher.job_states(self.output, [c.name for c in cells])
        out = []
        for cell in cells:
            log = str(self.output / LOGS_DIR / f"{cell.name}.log")
            if self.finished(cell) is not None:
                out.append((cell.name, "done", str(self.cell_file(cell))))
            elif cell.name in states:
                state, detail = states[cell.name]
                out.append((cell.name, "failed" if state == "done" else state, detail))   # done without a record
            elif (self.output / RUNS_DIR / cell.name / "checkpoints").is_dir():
                out.append((cell.name, "interrupted", f"resumes on the next run; log {log}"))
            else:
                out.append((cell.name, "not started", ""))
        return out

    def run(self, detach: bool = False) -> dict[str, Any]:
        """Run every unfinished cell under the study's launcher and write the reports; `detach` (a scheduler's
        launcher) returns once the cells are submitted."""
        from llm2emb.study.report import write_reports

        self.check_output()
        if detach and not self.launcher.detachable:
            raise UserError(f"--detach needs a launcher that hands cells to a scheduler (slurm); the "
                            f"{self.launcher.kind} launcher runs them as children of this process.")
        planned = self.cells(prepare=False)
        check_data_tokenizers(self, planned)
        self.check_launch(planned)
        self.claim_output()
        cells = self.cells(prepare=True)
        every_cell = cells if len(self.only) == len(self.study.recipes) else \
            self.cells(prepare=False, only=[r.name for r in self.study.recipes])
        records: dict[str, dict[str, Any]] = {}
        failed: list[str] = []
        pending: list[Cell] = []
        for i, cell in enumerate(cells, 1):
            done = self.finished(cell)
            if done is not None:
                print(f"[{i}/{len(cells)}] {cell.name}: done (skipped)", flush=True)
                records[cell.name] = done
                continue
            self._clear_stale(cell)
            pending.append(cell)
        launcher = self.launcher
        if pending:
            write_json_atomic(self.output / LAUNCH_FILE, launcher.identity())
        by_name = {c.name: c for c in cells}
        position = {c.name: i for i, c in enumerate(cells, 1)}
        lock = threading.Lock()

        def on_start(job, slot) -> None:
            cell = by_name[job.name]
            run_dir = self.output / RUNS_DIR / cell.name
            trained = (run_dir / SUMMARY_FILE).exists() and (run_dir / FINAL_DIR).is_dir()
            what = "trained already" if trained else f"training {cell.config['train_steps']} steps" \
                if cell.config["train_steps"] else "untrained base model"
            lane = f" [lane {slot.index}]" if launcher.max_parallel > 1 else ""
            with lock:
                print(f"[{position[cell.name]}/{len(cells)}] {cell.name}{lane}: {what}, evaluating "
                      f"{len(self.study.eval.tasks)} task(s)", flush=True)

        def on_finish(outcome) -> None:
            cell = by_name[outcome.job.name]
            record = self._record(cell, outcome)
            with lock:
                records[cell.name] = record
                if record["status"] != "done":
                    failed.append(cell.name)
                    print(f"      {cell.name} FAILED: {record.get('error', '')}", flush=True)
                else:
                    print(f"      {cell.name}: {_summary_line(record)}", flush=True)
                write_reports(self.study, self.output, self.report_cells(records, every_cell))

        launcher.run([self.job(cell) for cell in pending], on_start, on_finish, folder=self.output, detach=detach)
        result = write_reports(self.study, self.output, self.report_cells(records, every_cell))
        if detach:
            waiting = [c.name for c in cells if c.name not in records]
            print(f"{len(waiting)} cell(s) submitted or queued; `llm2emb study {self.study.path} --status` shows "
                  "them, and running the study again collects the finished ones.", flush=True)
            return result
        if failed:
            print(f"{len(failed)} cell(s) failed: {', '.join(failed)} (see {self.output / LOGS_DIR}); the others "
                  "are in the report. Fix the cause and run the study again to redo only those.", flush=True)
        return result

    def _record(self, cell: Cell, outcome) -> dict[str, Any]:
        """The finished cell's record with what the driver measured (wall time, start / end, peak RSS, launcher),
        or a failed record naming the log."""
        log_path = outcome.job.log_path
        if outcome.code == 0 and self.cell_file(cell).exists():
            record = json.loads(self.cell_file(cell).read_text(encoding="utf-8"))
            if outcome.peak_rss_mib is not None:
                record["peak_rss_mib"] = outcome.peak_rss_mib
            record["wall_seconds"] = round(outcome.finished - outcome.started, 1)
            record["started_at"] = round(outcome.started, 3)
            record["finished_at"] = round(outcome.finished, 3)
            record["launcher"] = {**self.launcher.identity(), "lane": outcome.slot, **outcome.extra}
            write_json_atomic(self.cell_file(cell), record)
            outcome.job.spec_path.unlink(missing_ok=True)
            return record
        try:
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            lines = []
        errors = [line for line in lines if line.startswith("error:")]
        tail = (errors or lines[-1:] or [""])[-1]
        return {"cell": cell.name, "recipe": cell.recipe, "seed": cell.seed, "hash": cell.hash, "status": "failed",
                "error": f"exit code {outcome.code}: {tail[:300]}", "log": str(log_path)}


def check_data_tokenizers(runner: StudyRunner, cells: list[Cell]) -> None:
    """Prepared data (data.train_data_path) must match the tokenizer and end token of every recipe's model."""
    if not runner.study.data.train_data_path:
        return  # raw input: the study prepares it for each tokenizer itself
    from llm2emb.data.tokenize import read_prepared, tokenizer_fingerprint
    from llm2emb.model.loading import load_tokenizer, resolve_model_path
    from llm2emb.model.tokenization import resolve_end_tokens

    info = read_prepared(runner.study.data.train_data_path)
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        if cell.config["train_steps"] == 0:
            continue
        key = (str(cell.config["model_path"]), str(cell.config.get("end_token", "auto")))
        if key in seen:
            continue
        seen.add(key)
        tokenizer = load_tokenizer(resolve_model_path(key[0]))
        data_end = info.get("end_token_ids", [info.get("eos_token_id")])
        if info.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer) or \
                list(data_end) != list(resolve_end_tokens(tokenizer, key[1])):
            raise UserError(f"{runner.study.path}: recipe {cell.recipe!r} trains {key[0]!r}, but data.train_data_path "
                            f"{runner.study.data.train_data_path} was prepared for {info.get('tokenizer')!r} (another "
                            "tokenizer or end token); give data.input (raw data) so the study prepares it per "
                            "tokenizer, or prepare the data for this model.")


def _eval_dict(study: Study) -> dict[str, Any]:
    """The evaluation settings a cell gets; their hash decides whether a finished cell is evaluated again."""
    from llm2emb.experiment.evaluation import eval_identity

    return eval_identity(study.eval)


def _summary_line(record: dict[str, Any]) -> str:
    scores = ", ".join(f"{task} {values['value']:.4f}" for task, values in record.get("main", {}).items())
    if not record.get("steps"):
        return f"{scores}; untrained"
    return (f"{scores}; train {record.get('train_seconds') or 0:.0f} s, "
            f"{record.get('samples_per_second') or 0:.2f} samples/s")
