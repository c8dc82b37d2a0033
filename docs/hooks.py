"""MkDocs hook: the reference pages are generated from the code at build time, so they cannot drift.

`mkdocs build` (and `make docs`, and tests/test_docs.py) import llm2emb from this checkout and write
reference/config.md (the training-config dataclass), reference/study.md and reference/pipeline.md (the
study / pipeline file fields, the same tables `llm2emb study --list-fields` / `pipeline --list-fields` print)
and reference/cli.md (every subcommand's argparse help). Nothing under docs/reference/ is checked in.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_page() -> str:
    from llm2emb.config import field_docs

    out = ["# Training config fields", "",
           "Generated from `llm2emb.config.TrainConfig` (the same list as `llm2emb train --list-fields`). "
           "A config is JSON or YAML; any field can be overridden with `--set field=value`.", ""]
    group = None
    for row in field_docs():
        if row["group"] != group:
            group = row["group"]
            out += ["", f"## {group or 'other'}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        out.append(f"| `{row['name']}` | {_cell(row['type'])} | `{_cell(row['default'])}` | {_cell(row['help'])} |")
    return "\n".join(out) + "\n"


def fields_page(title: str, intro: str, sections) -> str:
    out = [f"# {title}", "", intro, ""]
    for section, rows in sections:
        out += [f"## {section}", "", "| field | meaning |", "|---|---|"]
        out += [f"| `{name}` | {_cell(help)} |" for name, help in rows]
        out.append("")
    return "\n".join(out)


def study_page() -> str:
    from llm2emb.study.spec import field_sections

    return fields_page("Study file fields", "Generated from `llm2emb.study.spec` (the same tables as "
                       "`llm2emb study --list-fields`). How studies run: [Studies](../guides/studies.md).",
                       field_sections())


def pipeline_page() -> str:
    from llm2emb.pipeline.spec import field_sections

    return fields_page("Pipeline file fields", "Generated from `llm2emb.pipeline.spec` (the same tables as "
                       "`llm2emb pipeline --list-fields`). How pipelines run: [Pipelines](../guides/pipelines.md).",
                       field_sections())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            renamed = getattr(action, "renamed", {})  # deprecated command names: not documented twice
            return {name: sub for name, sub in action.choices.items() if name not in renamed}
    return {}


def cli_page() -> str:
    from llm2emb.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal width: make it the same everywhere
    parser = build_parser()
    out = ["# Command-line reference", "",
           "Generated from the argparse parsers (`llm2emb COMMAND --help`). The naming rules every command "
           "follows: [CLI vocabulary](../cli-vocabulary.md).", "", "```text", parser.format_help().rstrip(), "```"]
    seen = set()
    for name, sub in _subparsers(parser).items():
        if id(sub) in seen:  # aliases share a parser
            continue
        seen.add(id(sub))
        out += ["", f"## {name}", "", "```text", sub.format_help().rstrip(), "```"]
        for child, subsub in _subparsers(sub).items():
            out += ["", f"### {name} {child}", "", "```text", subsub.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


#: the public Python API: (section, [(dotted object, what it is for)]) rendered from docstrings by mkdocstrings
API = [
    ("Embedding models", [("llm2emb.Embedder", ""), ("llm2emb.EmbedderConfig", ""),
                          ("llm2emb.UserError", "")]),
    ("Training, merging and evaluating from Python", [
        ("llm2emb.config.TrainConfig", ""), ("llm2emb.config.load_train_config", ""),
        ("llm2emb.merge.api.merge_models", ""), ("llm2emb.eval.retrieval.evaluate_retrieval", "")]),
    ("Registries: adding one is one file and one of these calls (docs/architecture.md)", [
        ("llm2emb.model.pooling.register_pooling", "pooling modes"),
        ("llm2emb.model.heads.register_head", "heads on the pooled vector"),
        ("llm2emb.model.bidirectional.register_bidirectional", "architectures with bidirectional attention"),
        ("llm2emb.model.representations.register_representation", "dense / multi-vector / sparse / hybrid"),
        ("llm2emb.model.input_strategies.register_input_strategy", "input strategies (echo, PromptEOL)"),
        ("llm2emb.model.loading.register_builtin", "built-in offline models"),
        ("llm2emb.losses.registry.register_loss", "losses (the `losses:` field)"),
        ("llm2emb.data.formats.register_format", "raw data formats"),
        ("llm2emb.data.manifest.register_task_type", "training task types"),
        ("llm2emb.data.mining.register_scorer", "hard-negative scorers"),
        ("llm2emb.data.builtin.register_builtin_train_data", "`builtin:` training data"),
        ("llm2emb.eval.tasks.register_task_kind", "evaluation task kinds"),
        ("llm2emb.eval.search.register_searcher", "dense search indexes"),
        ("llm2emb.merge.registry.register_merge", "merge methods"),
        ("llm2emb.trackers.register_tracker", "experiment trackers (`report_to`)"),
        ("llm2emb.experiment.launchers.base.register_launcher", "launchers of study cells and pipeline stages"),
        ("llm2emb.synth.generators.register_generator", "synthetic-data generators"),
        ("llm2emb.synth.filters.register_filter", "synthetic-data filters"),
        ("llm2emb.synth.tasks.register_synth_task", "synthetic-data tasks"),
    ]),
]


def api_page() -> str:
    """The Python API reference: one mkdocstrings block per public object, rendered from its docstring."""
    out = ["# Python API reference", "",
           "Generated from the docstrings (mkdocstrings, `docs/hooks.py: API`). How to use the API: "
           "[Python API](../guides/python-api.md).", ""]
    for section, objects in API:
        out += [f"## {section}", ""]
        for dotted, purpose in objects:
            if purpose:
                out += [f"For {purpose}:", ""]
            out += [f"::: {dotted}", ""]
    return "\n".join(out)


PAGES = {"reference/config.md": config_page, "reference/api.md": api_page, "reference/study.md": study_page,
         "reference/pipeline.md": pipeline_page, "reference/cli.md": cli_page}


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=make()))
    return files
