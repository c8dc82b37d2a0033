"""`llm2emb pipeline PIPELINE.yaml [--output DIR] [--seeds N ...]`: staged training with an evaluation after every
stage, optionally once per seed."""
from __future__ import annotations

import argparse

from llm2emb.commands._args import (add_dry_run_argument, add_list_fields_argument, add_set_argument,
                                    print_field_sections)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline", help="run training stages in order (SimCSE, supervised, distillation, merges), evaluating each",
        description="Run the stages of a pipeline file in order: each training stage starts from the previous "
                    "stage's result (full weights; a LoRA adapter merged or continued, as the stage says), a merge "
                    "stage merges earlier results. Every result is evaluated on the pipeline's eval tasks; "
                    "report.md / report.png compare the stages. Re-running resumes: finished stages are skipped, "
                    "a stage whose config or input changed runs again with the stages that use it, an interrupted "
                    "stage resumes from its checkpoint. The file is checked completely before any stage starts.")
    p.add_argument("pipeline", nargs="?", help="pipeline file (YAML or JSON), e.g. pipelines/demo_staged.yaml")
    p.add_argument("--output", "-o", default=None, help="output folder (default: pipeline_runs/<name>)")
    add_set_argument(p, help="training config fields for every training stage, after the stage's own settings "
                             "(e.g. --set train_steps=4 learning_rate=1e-4 for a quick check)")
    add_list_fields_argument(p, "a pipeline file")
    p.add_argument("--eval-task", action="append", default=[], metavar="TASK",
                   help="also evaluate every result on TASK (a task folder or file, as in llm2emb eval --tasks), "
                        "e.g. ../shared/data/eval/stsb_en/dev.tsv; repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="run the whole pipeline once per seed (every training stage's seed; replaces the file's "
                        "seeds) into OUTPUT/seed-<n>/ and report every stage as mean +- std over the seeds")
    p.add_argument("--launcher", default=None, metavar="KIND",
                   help="how training stages run: local (default, inside this process), accelerate, ...; replaces "
                        "the pipeline file's launcher.kind")
    add_dry_run_argument(p, "the pipeline file, every stage's config, model references and data",
                         prints="the stages and the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.pipeline import default_output, load_pipeline
    from llm2emb.config import parse_overrides
    from llm2emb.errors import UserError
    from llm2emb.pipeline.runner import PipelineRunner
    from llm2emb.pipeline.seeds import SeedsRunner

    if args.list_fields:
        from llm2emb.pipeline.spec import field_sections

        print_field_sections(field_sections())
        return 0
    if not args.pipeline:
        raise UserError("llm2emb pipeline needs a pipeline file, e.g. llm2emb pipeline pipelines/demo_staged.yaml.")
    pipeline = load_pipeline(args.pipeline, parse_overrides(args.overrides), eval_tasks=args.eval_task, seeds=args.seeds,
                             launcher_kind=args.launcher)
    output = args.output or default_output(pipeline)
    runner = SeedsRunner(pipeline, output) if pipeline.seeds else PipelineRunner(pipeline, output)
    runner.check_output()
    if args.dry_run:
        print(f"pipeline {pipeline.name}: {len(pipeline.stages)} stages from {pipeline.model}, "
              f"{len(pipeline.eval.tasks)} eval task(s), output {output}")
        if pipeline.seeds:
            print(f"  seeds {', '.join(map(str, pipeline.seeds))}: one run each in {output}/seed-<n>/")
        launcher = pipeline.launcher
        if launcher is not None and not launcher.in_driver:
            print(f"  training stages run under the {launcher.kind} launcher, {launcher.processes} process(es) each "
                  "(train_batch_size is the global batch), as python -m llm2emb.pipeline.stage")
        describe = PipelineRunner(pipeline, output)._describe
        for i, stage in enumerate(pipeline.stages, 1):
            print(f"  {i}. {stage.name}: {describe(stage)}")
        return 0
    result = runner.run()
    print(f"pipeline {pipeline.name}: {len(result['stages'])} rows in {output}/report.md")
    return 0
