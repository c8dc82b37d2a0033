"""Offline demo data: a real code-search task built from the Python standard library on any machine.

Every public function and method of the standard library's pure-Python modules that has a docstring gives
one pair: query = the first paragraph of its docstring, passage = its source code without the docstring.
Sources are read with `ast` (nothing is imported, so no module runs). Ambiguous pairs are dropped: a
docstring paragraph shared by several functions, a body shared by several docstrings, near-empty bodies.

Functions are split by top-level package (a stable SHA-256 of its name, so `email.*` or `asyncio.*` are
wholly on one side and near-identical code does not leak across): a training set in the F2LLM raw layout with
mined hard negatives, and a held-out evaluation set in BEIR layout. The result depends only on the Python
version (its standard library) and the seed.

    out_dir/train/stdlib_code.parquet     query, passage, negative_1..negative_k
    out_dir/train/manifest.json           {"stdlib_code": {"type": "retrieval", "instruction": ...}}
    out_dir/eval/stdlib_code/             corpus.jsonl, queries.jsonl, qrels/test.tsv
    out_dir/builtin_info.json             sizes and settings (a re-run with the same settings reuses the data)
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from llm2emb.atomic import write_text_atomic
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

DATASET = "stdlib_code"
# The query instruction of the demo task (Qwen3-Embedding / F2LLM style, ends with the default separator).
INSTRUCTION = "Instruct: Given a description, retrieve the Python function that implements it.\nQuery: "
EVAL_SHARE = 0.3           # share of top-level packages held out
MAX_EVAL_QUERIES = 650     # keeps CPU evaluation around a minute with smollm2-135m
NUM_NEGATIVES = 7
# Not code a user would search, or generated / test code.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                       "turtledemo", "ensurepip", "pydoc_data", "encodings", "venv"})
SKIP_MODULES = frozenset({"_pydecimal", "antigravity", "this"})  # _pydecimal duplicates decimal's docs
MIN_QUERY_WORDS = 4
MIN_BODY_LINES = 2         # code lines after the signature, docstring removed
MAX_PASSAGE_LINES = 60     # longer functions are cut (they are truncated at tokenisation anyway)
INFO_NAME = "builtin_info.json"
VERSION = 1                # bump when the extraction rules change


@dataclass(frozen=True)
class CodeFunction:
    module: str       # dotted module name, e.g. "email.utils"
    name: str         # qualified name, e.g. "Message.get_payload"
    query: str
    passage: str

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    @property
    def id(self) -> str:
        return f"{self.module}.{self.name}"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _first_paragraph(doc: str) -> str:
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def _passage(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (decorators included) without its docstring, dedented; None when too small."""
    doc = node.body[0]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    lines = source_lines[start:node.end_lineno]
    rel_a, rel_b = doc.lineno - 1 - start, doc.end_lineno - start
    if rel_a <= node.lineno - 1 - start:  # docstring on the `def` line: cannot cut it out cleanly
        return None
    body = lines[:rel_a] + lines[rel_b:]
    code_lines = [ln for ln in body[rel_a:] if ln.strip() and not ln.strip().startswith("#")]
    if len(code_lines) < MIN_BODY_LINES:
        return None
    text = textwrap.dedent("\n".join(ln.rstrip() for ln in body[:MAX_PASSAGE_LINES]))
    return text.strip("\n")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def extract_functions(root: Path | None = None) -> list[CodeFunction]:
    """Every usable (docstring, code) pair of the standard library under `root`, sorted by id (parsed once
    per process: the sources do not change while it runs)."""
    return list(_extract_cached(str(root or stdlib_dir())))


@functools.lru_cache(maxsize=2)
def _extract_cached(root: str) -> tuple[CodeFunction, ...]:
    return tuple(parse_functions(Path(root)))


def _modules(root: Path):
    """(module name, source lines, syntax tree) of every usable standard-library module under `root`."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            module = _module_name(path, root)
            if module.split(".")[0] in SKIP_MODULES or not module:
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue  # a few stdlib files are templates or use another encoding: not needed
            yield module, source.splitlines(), tree


def _public_functions(tree: ast.Module):
    """(function node, qualified name) of the public functions and methods of a module."""
    for node, owner in _functions(tree):
        if node.name.startswith("_") or (owner and owner.startswith("_")):
            continue
        yield node, f"{owner}.{node.name}" if owner else node.name


def parse_functions(root: Path) -> list[CodeFunction]:
    """`extract_functions` without the cache."""
    found: list[CodeFunction] = []
    for module, lines, tree in _modules(root):
        for node, name in _public_functions(tree):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            query = _first_paragraph(doc)
            if len(query.split()) < MIN_QUERY_WORDS:
                continue
            passage = _passage(lines, node)
            if passage is None:
                continue
            found.append(CodeFunction(module, name, query, passage))
    return _drop_ambiguous(sorted(found, key=lambda f: f.id))


def _undocumented_passage(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The source of a function without docstring (decorators included), dedented, cut to MAX_PASSAGE_LINES;
    None when its body is too small to describe."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    lines = source_lines[start:node.end_lineno]
    body_start = node.body[0].lineno - 1 - start
    code_lines = [ln for ln in lines[body_start:] if ln.strip() and not ln.strip().startswith("#")]
    if body_start <= node.lineno - 1 - start or len(code_lines) < MIN_BODY_LINES:
        return None  # a one-line `def f(): return x` says little to describe
    return textwrap.dedent("\n".join(ln.rstrip() for ln in lines[:MAX_PASSAGE_LINES])).strip("\n")


def extract_undocumented(root: Path | None = None) -> list[CodeFunction]:
    """Every public function and method of the standard library under `root` that has NO docstring (query
    ""), with the same module rules and passage form as `extract_functions`, sorted by id; bodies that occur
    more than once are dropped. The raw material of synthetic queries (`llm2emb synth`); filter by package
    with `is_held_out` to keep the held-out evaluation packages out."""
    found: list[CodeFunction] = []
    for module, lines, tree in _modules(root or stdlib_dir()):
        for node, name in _public_functions(tree):
            if ast.get_docstring(node) is not None:
                continue
            passage = _undocumented_passage(lines, node)
            if passage is not None:
                found.append(CodeFunction(module, name, "", passage))
    counts: dict[str, int] = {}
    for f in found:
        counts[f.passage] = counts.get(f.passage, 0) + 1
    return sorted((f for f in found if counts[f.passage] == 1), key=lambda f: f.id)


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child, node.name


def _drop_ambiguous(functions: list[CodeFunction]) -> list[CodeFunction]:
    """A query that describes several functions (or a body with several descriptions) has no single answer."""
    query_count: dict[str, int] = {}
    passage_count: dict[str, int] = {}
    for f in functions:
        query_count[f.query.lower()] = query_count.get(f.query.lower(), 0) + 1
        passage_count[f.passage] = passage_count.get(f.passage, 0) + 1
    return [f for f in functions if query_count[f.query.lower()] == 1 and passage_count[f.passage] == 1]


def _stable_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / float(16 ** 12)


def is_held_out(package: str, seed: int = 0) -> bool:
    """Whether top-level `package` belongs to the held-out evaluation side (a stable hash of its name, so
    the rule also applies to packages and functions that are not in the documented task)."""
    return _stable_fraction(f"{seed}:{package}") < EVAL_SHARE


def split_functions(functions: list[CodeFunction], seed: int = 0) -> tuple[list[CodeFunction], list[CodeFunction]]:
    """(train, eval): whole top-level packages held out by a stable hash; eval capped at MAX_EVAL_QUERIES."""
    held_out = {f.package for f in functions if is_held_out(f.package, seed)}
    train = [f for f in functions if f.package not in held_out]
    evaluation = [f for f in functions if f.package in held_out]
    if len(evaluation) > MAX_EVAL_QUERIES:  # a deterministic subset; the rest is simply unused
        evaluation = sorted(evaluation, key=lambda f: _stable_fraction(f"{seed}:{f.id}"))[:MAX_EVAL_QUERIES]
        evaluation.sort(key=lambda f: f.id)
    return train, evaluation


def _write_beir(functions: list[CodeFunction], folder: Path) -> None:
    corpus = "".join(json.dumps({"_id": f"doc-{f.id}", "title": "", "text": f.passage}, ensure_ascii=False) + "\n"
                     for f in functions)
    queries = "".join(json.dumps({"_id": f"q-{f.id}", "text": f.query}, ensure_ascii=False) + "\n"
                      for f in functions)
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q-{f.id}\tdoc-{f.id}\t1\n" for f in functions)
    write_text_atomic(folder / "corpus.jsonl", corpus)
    write_text_atomic(folder / "queries.jsonl", queries)
    write_text_atomic(folder / "qrels" / "test.tsv", qrels)


def build_stdlib_codesearch(out_dir: str | Path, mine_model: str | None = None, seed: int = 0,
                            num_negatives: int = NUM_NEGATIVES) -> dict:
    """Build (or reuse, when already built with the same settings) the standard-library code-search task.

    Hard negatives of the training set are mined with BM25 (`mine_model=None`, fast, no model) or with the
    embedding model `mine_model`. Returns sizes and paths (also saved as out_dir/builtin_info.json)."""
    from llm2emb.data.formats import atomic_write_json, atomic_write_table
    from llm2emb.data.mining import MiningSettings, build_scorer, mine_negatives

    out = Path(out_dir)
    settings_key = {"version": VERSION, "python": sys.version.split()[0], "seed": seed,
                    "mine_model": mine_model, "num_negatives": num_negatives}
    info_path = out / INFO_NAME
    if info_path.exists():
        try:
            previous = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if previous.get("settings") == settings_key and all(Path(p).exists() for p in previous.get("files", [])):
            return previous

    functions = extract_functions()
    if len(functions) < 100:
        raise UserError(f"Found only {len(functions)} documented functions under {stdlib_dir()}; the Python "
                        "standard library sources (.py files) are needed to build the demo data.")
    train, evaluation = split_functions(functions, seed)
    frame = pd.DataFrame({"query": [f.query for f in train], "passage": [f.passage for f in train]})
    scorer = build_scorer("embedding" if mine_model else "bm25", mine_model)
    settings = MiningSettings(num=num_negatives, skip_top=2, max_score=0.8, max_ratio=0.95, candidates=100,
                              seed=seed)
    frame, report = mine_negatives(frame, scorer, settings, INSTRUCTION if mine_model else "", DATASET)

    train_dir, eval_dir = out / "train", out / "eval" / DATASET
    atomic_write_table(frame, train_dir / f"{DATASET}.parquet")
    atomic_write_json({DATASET: {"type": "retrieval", "instruction": INSTRUCTION}}, train_dir / "manifest.json")
    _write_beir(evaluation, eval_dir)
    info = {
        "dataset": DATASET,
        "train_dir": str(train_dir), "eval_dir": str(eval_dir),
        "train_rows": len(train), "eval_queries": len(evaluation), "eval_corpus": len(evaluation),
        "train_packages": len({f.package for f in train}), "eval_packages": len({f.package for f in evaluation}),
        "functions_found": len(functions), "num_negatives": num_negatives, "query_instruction": INSTRUCTION,
        "mining": {k: report[k] for k in ("scorer", "rows_fully_mined", "random_fill")},
        "settings": settings_key,
        "files": [str(train_dir / f"{DATASET}.parquet"), str(train_dir / "manifest.json"),
                  str(eval_dir / "corpus.jsonl"), str(eval_dir / "queries.jsonl"), str(eval_dir / "qrels" / "test.tsv")],
    }
    atomic_write_json(info, info_path)
    logger.info("stdlib code search: %d train rows (%d packages), %d held-out queries (%d packages)",
                info["train_rows"], info["train_packages"], info["eval_queries"], info["eval_packages"])
    return info


def undocumented_training_functions() -> list[CodeFunction]:
    """Standard-library functions without a docstring from the training packages only (held-out packages are
    never read): raw text for unsupervised stages and synthetic queries."""
    return [f for f in extract_undocumented() if not is_held_out(f.package)]


# ---------------------------------------------------------------------------------------------------------
# Built-in training data by name (`builtin:<name>` in pipeline stages): one function + one registry line each.

@dataclass(frozen=True)
class BuiltinTrainData:
    name: str
    description: str
    build: Callable[[Path], Path]     # home folder -> raw data folder (F2LLM layout with manifest.json)
    texts_only: bool = False          # query == passage: raw text for SimCSE / MNTP, not for supervised stages


BUILTIN_TRAIN_DATA: dict[str, BuiltinTrainData] = {}


def register_builtin_train_data(name: str, description: str, texts_only: bool = False):
    def wrap(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
        BUILTIN_TRAIN_DATA[name] = BuiltinTrainData(name, description, build, texts_only)
        return build
    return wrap


def builtin_train_data(reference: str) -> BuiltinTrainData | None:
    """The registered data of a `builtin:<name>` reference, or None when `reference` is not one."""
    if not reference.startswith("builtin:"):
        return None
    return BUILTIN_TRAIN_DATA.get(reference[len("builtin:"):])


def builtin_references(with_queries_only: bool = False) -> list[str]:
    """`builtin:<name>` of every registered training data (only those with queries when asked)."""
    return [f"builtin:{name}" for name, data in BUILTIN_TRAIN_DATA.items()
            if not (with_queries_only and data.texts_only)]


def builtin_train_dir(reference: str, home: Path) -> Path:
    """The raw data folder of a `builtin:<name>` reference, built under `home` on first use."""
    data = builtin_train_data(reference)
    if data is None:
        raise UserError(f"Unknown built-in data {reference!r}; use one of {', '.join(builtin_references())}.")
    return data.build(home)


@register_builtin_train_data("stdlib", "the built-in code-search task's training split: docstring -> function, "
                             "mined hard negatives, held-out packages excluded")
def _stdlib_train(home: Path) -> Path:
    return Path(build_stdlib_codesearch(home / "builtin" / "stdlib")["train_dir"])


UNDOCUMENTED = "stdlib_undocumented"


@register_builtin_train_data("stdlib-undocumented", "the source of every standard-library function without a "
                             "docstring from the training packages, as texts (query = passage)", texts_only=True)
def _stdlib_undocumented_train(home: Path) -> Path:
    from llm2emb.data.formats import atomic_write_json, atomic_write_table

    folder = home / "builtin" / "stdlib-undocumented" / "train"
    key = {"version": VERSION, "python": sys.version.split()[0]}
    info_path = folder.parent / INFO_NAME
    try:
        if json.loads(info_path.read_text(encoding="utf-8")).get("settings") == key and \
                (folder / f"{UNDOCUMENTED}.parquet").exists():
            return folder
    except (OSError, ValueError):
        pass
    texts = [f.passage for f in undocumented_training_functions()]
    atomic_write_table(pd.DataFrame({"query": texts, "passage": texts}), folder / f"{UNDOCUMENTED}.parquet")
    atomic_write_json({UNDOCUMENTED: {"type": "retrieval", "instruction": ""}}, folder / "manifest.json")
    atomic_write_json({"settings": key, "rows": len(texts)}, info_path)
    return folder
