"""The documentation stays true: the site builds with --strict, README links resolve, and the command blocks
marked `<!-- test: run -->` in README.md and the guides run (docs/contributing/executed-docs.md)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the Markdown files whose marked blocks run, in this order (later blocks use earlier blocks' outputs)
EXECUTED = ("README.md", "docs/guides/studies.md", "docs/guides/export.md")
#: real model names in the docs, swapped for the tiny test model (the documented substitution)
REAL_MODELS = ("Qwen/Qwen3-0.6B", "qwen2.5-coder-0.5b", "gemma3-270m", "smollm2-135m")
TRAINING_COMMANDS = ("train", "study")
TINY_BUDGET = ["--set", "train_steps=2", "checkpointing_steps=1"]
MARKER = re.compile(r"<!-- test: run( slow)? -->\s*\n```(?:bash|sh|console)?\n(.*?)```", re.S)


def marked_blocks(path: Path) -> list[tuple[bool, str]]:
    """[(slow, command)] of every marked block in `path`, one entry per command (backslash continuations joined)."""
    out = []
    for match in MARKER.finditer(path.read_text()):
        text = match.group(2).replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                out.append((bool(match.group(1)), line))
    return out


def substitute(command: str, tiny_model: Path) -> list[str]:
    """The documented substitution: real models -> the tiny test model, training commands -> 2 steps."""
    for name in REAL_MODELS:
        command = command.replace(name, str(tiny_model))
    argv = shlex.split(command)
    assert argv[0] == "llm2emb", f"a marked block runs llm2emb commands only: {command!r}"
    argv = argv[1:]
    if argv[0] in TRAINING_COMMANDS and "--dry-run" not in argv:
        argv += TINY_BUDGET
    return argv


def test_every_executed_file_has_marked_blocks():
    counts = {name: len(marked_blocks(ROOT / name)) for name in EXECUTED}
    assert all(counts.values()), counts
    readme = [cmd.split()[1] for _, cmd in marked_blocks(ROOT / "README.md")]
    assert readme[:4] == ["prepare", "train", "eval", "export"], readme  # the quickstart, in order
    assert "study" in readme


def test_substitution_swaps_models_and_budget(tmp_path):
    argv = substitute("llm2emb train -c examples/quickstart.yaml --set model_path=smollm2-135m", tmp_path)
    assert argv == ["train", "-c", "examples/quickstart.yaml", "--set", f"model_path={tmp_path}", *TINY_BUDGET]
    assert substitute("llm2emb study s.yaml --dry-run", tmp_path) == ["study", "s.yaml", "--dry-run"]


def test_readme_is_short_and_self_contained():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_study_and_pipeline_field_docs_cover_every_field():
    from llm2emb.pipeline import spec as pipeline_spec
    from llm2emb.study import spec as study_spec

    for module in (study_spec, pipeline_spec):
        sections = dict(module.field_sections())
        for section, rows in sections.items():
            assert set(module.FIELD_HELP[section]) == {name for name, _ in rows}, (module.__name__, section)
            assert all(help for _, help in rows)


def test_mkdocs_build_strict(tmp_path):
    """The site builds with --strict: a broken link, a missing nav page or a failing reference generator fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--max-length" in cli and "--list-fields" in cli
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "grad_cache_chunk_size" in config
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()   # mkdocstrings, from docstrings
    assert 'id="llm2emb.Embedder.encode"' in api and 'id="llm2emb.trackers.register_tracker"' in api


def _run_docs(tmp_path, monkeypatch, tiny_model: Path, slow: bool) -> list[list[str]]:
    from llm2emb.cli import main

    for folder in ("examples", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))  # study cells run in their own processes
    ran = []
    for name in EXECUTED:
        for is_slow, command in marked_blocks(ROOT / name):
            if is_slow and not slow:
                continue
            argv = substitute(command, tiny_model)
            assert main(argv) == 0, f"{name}: {command!r} failed (ran as llm2emb {shlex.join(argv)})"
            ran.append(argv)
    return ran


@pytest.mark.usefixtures("one_torch_thread")
def test_readme_quickstart_runs(tmp_path, monkeypatch, tiny_model):
    """README quickstart (prepare -> train -> eval -> export), the studies guide's dry run, the export guide."""
    ran = _run_docs(tmp_path, monkeypatch, tiny_model, slow=False)
    assert [a[0] for a in ran][:4] == ["prepare", "train", "eval", "export"]
    assert (tmp_path / "runs/my_data/my_data.parquet").is_file()
    assert (tmp_path / "runs/my_model/final").is_dir()
    assert list((tmp_path / "runs/my_model/eval").glob("*.json"))
    assert (tmp_path / "my-embedder/README.md").is_file()
    assert (tmp_path / "my-embedder-bf16").is_dir()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_all_marked_blocks_run(tmp_path, monkeypatch, tiny_model):
    """Every marked block, the README's study included."""
    _run_docs(tmp_path, monkeypatch, tiny_model, slow=True)
    assert (tmp_path / "study_runs/my_study/report.md").is_file()
