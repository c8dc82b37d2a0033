"""A pipeline over seeds (`seeds: [1, 2, 3]` or `--seeds`): the whole pipeline once per seed, every training
stage's seed set to it, and one report of every stage as mean +- std over the seeds.

Output folder layout:
    spec.json                 the pipeline's name and seeds (a folder holds one pipeline)
    seed-<n>/                 one pipeline run per seed, in `llm2emb.pipeline.runner`'s layout (resumes as it does)
    pipeline.json, report.md, report.png   the stages over the seeds done so far (rewritten after every seed)

The start row does not depend on the seed: it is evaluated once and its record shared with the other seeds.
Evaluation samples (eval.limits, eval.seed) are the same for every seed, so the change from the baseline is a
paired bootstrap over the task's queries / pairs with the statistic averaged over seeds (as in a study). A
single-seed run's folder can join a seeds run: move it to `<output>/seed-<its seed>/` (e.g. seed-42 for
configs/quickstart.json) and its finished stages are reused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError
from llm2emb.layout import check_job_folder
from llm2emb.pipeline.runner import SPEC_FILE, STAGE_FILE, PipelineRunner
from llm2emb.pipeline.spec import START, Pipeline, seeded

SEED_DIR = "seed-{seed}"


class SeedsRunner:
    def __init__(self, pipeline: Pipeline, output: str | Path) -> None:
        if not pipeline.seeds:
            raise ValueError("SeedsRunner needs a pipeline with seeds")
        self.pipeline = pipeline
        self.output = Path(output).expanduser()
        self.runners: dict[int, PipelineRunner] = {
            seed: PipelineRunner(seeded(pipeline, seed), self.output / SEED_DIR.format(seed=seed))
            for seed in pipeline.seeds}
        self.compared: dict[tuple, dict[str, Any]] = {}   # baseline comparisons already computed (report.py)

    def check_output(self) -> None:
        seed_dirs = {SEED_DIR.format(seed=seed) for seed in self.runners}
        only_seed_dirs = (not (self.output / SPEC_FILE).exists() and self.output.is_dir()
                          and all(p.name in seed_dirs for p in self.output.iterdir()))
        if not only_seed_dirs:          # a folder of moved-in seed runs is a seeds run about to start
            check_job_folder(self.output, SPEC_FILE, self.pipeline.name, "pipeline")
        if (self.output / "stages").exists():
            raise UserError(f"Output folder {self.output} holds a single-seed run of pipeline {self.pipeline.name!r}; "
                            "choose another --output, or move that folder to <output>/seed-<its seed>/ to reuse it "
                            "in a seeds run.")
        for runner in self.runners.values():
            runner.check_output()

    def claim_output(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output / SPEC_FILE, {"name": self.pipeline.name, "file": str(self.pipeline.path),
                                                    "seeds": self.pipeline.seeds,
                                                    "stages": [s.name for s in self.pipeline.stages]})

    def run(self) -> dict[str, Any]:
        from llm2emb.pipeline.report import write_seed_reports

        self.check_output()
        self.claim_output()
        seeds = self.pipeline.seeds
        for i, seed in enumerate(seeds, 1):
            print(f"== seed {seed} ({i}/{len(seeds)}): {self.runners[seed].output}", flush=True)
            self._share_start(seed)
            self.runners[seed].run()
            write_seed_reports(self)
        return write_seed_reports(self)

    def _share_start(self, seed: int) -> None:
        """Give this seed's run the start record another seed already made (the runner still checks its key
        and evaluation settings, and evaluates again when they differ)."""
        runner = self.runners[seed]
        target = runner.stage_dir(START) / STAGE_FILE
        if target.exists() or not self.pipeline.eval_start:
            return
        runner.claim_output()           # the seed's folder is a pipeline folder before anything goes in
        for other, other_runner in self.runners.items():
            source = other_runner.stage_dir(START) / STAGE_FILE
            if other != seed and source.exists():
                try:
                    json.loads(source.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                return

    def records(self) -> dict[int, dict[str, dict[str, Any]]]:
        """{seed: {stage: record}} of the seeds run so far in this process (a resumed seed's finished stages
        are read back by its runner, so a re-run reports every seed)."""
        return {seed: dict(runner.records) for seed, runner in self.runners.items() if runner.records}
