"""Staged training: `llm2emb pipeline PIPELINE.yaml` runs ordered stages (training from the previous stage's
result, SimCSE with dropout, distillation from a teacher, merges of earlier results), evaluates every result
and reports them side by side. See `llm2emb.pipeline.spec` for the file and `llm2emb.pipeline.runner` for the
output folder and how re-runs resume.
"""
from __future__ import annotations

from llm2emb.pipeline.spec import Pipeline, Stage, load_pipeline

__all__ = ["Pipeline", "Stage", "load_pipeline", "run_pipeline"]


def run_pipeline(path, output=None, seeds=None):
    """Load, check and run a pipeline file (once per seed when it or `seeds` lists seeds); returns the
    pipeline.json content."""
    from llm2emb.pipeline.runner import PipelineRunner
    from llm2emb.pipeline.seeds import SeedsRunner

    pipeline = load_pipeline(path, seeds=seeds)
    runner = SeedsRunner if pipeline.seeds else PipelineRunner
    return runner(pipeline, output or default_output(pipeline)).run()


def default_output(pipeline: Pipeline) -> str:
    return str(__import__("pathlib").Path("pipeline_runs") / pipeline.name)
