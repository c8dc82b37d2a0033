"""Weakly supervised training pairs from raw text: `llm2emb pairs INPUT --output DIR`.

Structure inside documents is a free source of (query, passage) pairs, as in the weakly supervised
pre-training of E5 (Wang et al. 2022: title -> passage, ...) and code search data such as CodeSearchNet
(Husain et al. 2019: docstring -> function):

    .md / .markdown    every heading with its section's text: heading <-> section body; a file without
                       headings is treated as text
    .txt               title <-> rest when the first line is a short title (no sentence end in it), else
                       first sentence <-> rest
    .py                every documented function, method and class: first paragraph of the docstring <->
                       its code without the docstring; the module docstring <-> the module's code

Folders are walked recursively in sorted order (hidden folders, __pycache__, virtual environments and
node_modules skipped). Pairs whose query or passage is too short are skipped; passages are cut to
`max_passage_chars` at a line or word boundary (training truncates to tokens anyway); an exact (query,
passage) duplicate is dropped, and a query seen before with another passage is dropped (two rows with one
query would be each other's false negatives).

Output (the F2LLM raw layout `llm2emb prepare` reads), written atomically as one folder:

    text_pairs.parquet, code_pairs.parquet   query, passage (only the non-empty ones)
    manifest.json                            {name: {type: retrieval, instruction}}
    _pairs_info.json                         input, settings, per-file pair counts, skipped files and why,
                                             rows per dataset and per kind (the "_" keeps prepare off it)
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm2emb.atomic import atomic_dir, check_output_folder
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

INFO_NAME = "_pairs_info.json"
TEXT_DATASET, CODE_DATASET = "text_pairs", "code_pairs"
INSTRUCTIONS = {
    TEXT_DATASET: "Instruct: Given a title or an opening sentence, retrieve the text it introduces.\nQuery: ",
    CODE_DATASET: "Instruct: Given a description, retrieve the Python code that implements it.\nQuery: ",
}
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
CODE_SUFFIXES = (".py",)
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", ".venv", "site-packages", "build", "dist"})
VERSION = 1
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
# a sentence ends at . ! ? followed by space, or at CJK full stops (no space follows them)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？])")
_TITLE_END = tuple(".!?。！？;；,，")


@dataclass
class PairSettings:
    min_query_chars: int = 10       # shorter queries are skipped
    min_passage_chars: int = 40     # shorter passages are skipped
    max_passage_chars: int = 4000   # longer passages are cut
    max_title_chars: int = 120      # a first line longer than this is not a title

    def validate(self) -> None:
        for name in ("min_query_chars", "min_passage_chars", "max_passage_chars", "max_title_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.max_passage_chars < self.min_passage_chars:
            raise UserError(f"--max-passage-chars ({self.max_passage_chars}) must be at least --min-passage-chars "
                            f"({self.min_passage_chars}).")


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str
    kind: str          # heading | title | first_sentence | docstring | module_docstring
    source: str        # file, relative to the input folder
    line: int          # where the query starts (1-based)


@dataclass
class PairsResult:
    output: Path
    rows: dict[str, int]
    files_used: int
    files_skipped: int
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ text

def _clean(text: str) -> str:
    return " ".join(text.split())


def cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last line break or space before the limit if any."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    for sep in ("\n", " "):
        at = head.rfind(sep)
        if at >= limit // 2:
            return head[:at].rstrip()
    return head


def first_sentence(text: str) -> tuple[str, str]:
    """(first sentence, the rest) of a text; the rest is '' when there is one sentence."""
    flat = text.strip()
    match = _SENTENCE_END.search(flat)
    if match is None:
        return flat, ""
    return flat[:match.start()].strip(), flat[match.end():].strip()


def _is_title(line: str, settings: PairSettings) -> bool:
    line = line.strip()
    return (0 < len(line) <= settings.max_title_chars and not line.endswith(_TITLE_END)
            and _SENTENCE_END.search(line) is None)


def text_document_pairs(text: str, source: str, settings: PairSettings, line_offset: int = 0) -> list[Pair]:
    """Title <-> rest, else first sentence <-> rest, of one text document."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if start is None:
        return []
    first = lines[start]
    rest_lines = lines[start + 1:]
    if _is_title(first, settings) and any(ln.strip() for ln in rest_lines):
        query, passage, kind = first.strip(), "\n".join(rest_lines), "title"
    else:
        query, passage = first_sentence("\n".join(lines[start:]))
        kind = "first_sentence"
    return _make(query, passage, kind, source, start + 1 + line_offset, settings)


def markdown_pairs(text: str, source: str, settings: PairSettings) -> list[Pair]:
    """Heading <-> section body for every ATX heading (# ...) outside code fences; no heading: as text."""
    lines = text.splitlines()
    headings: list[tuple[int, str]] = []
    fenced = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match and match.group(2).strip():
            headings.append((i, match.group(2)))
    if not headings:
        return text_document_pairs(text, source, settings)
    pairs: list[Pair] = []
    intro = "\n".join(lines[:headings[0][0]])
    if intro.strip():      # text before the first heading: a document of its own
        pairs.extend(text_document_pairs(intro, source, settings))
    for n, (i, title) in enumerate(headings):
        end = headings[n + 1][0] if n + 1 < len(headings) else len(lines)
        body = "\n".join(lines[i + 1:end])
        title = re.sub(r"[*_`]+", "", title).strip()
        pairs.extend(_make(title, body, "heading", source, i + 1, settings))
    return pairs


# ------------------------------------------------------------------------------------------ code

def _first_paragraph(doc: str) -> str:
    return _clean(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0])


def _without_lines(lines: list[str], start: int, end: int, drop_from: int, drop_to: int) -> str:
    """Lines start..end (0-based, end exclusive) without drop_from..drop_to, dedented."""
    kept = lines[start:drop_from] + lines[drop_to:end]
    return textwrap.dedent("\n".join(ln.rstrip() for ln in kept)).strip("\n")


def python_pairs(source_text: str, source: str, settings: PairSettings) -> list[Pair]:
    """Docstring <-> code of every documented function, method and class, and of the module. Raises
    SyntaxError / ValueError for a file that does not parse."""
    tree = ast.parse(source_text)
    lines = source_text.splitlines()
    pairs: list[Pair] = []
    doc = ast.get_docstring(tree)
    if doc and tree.body and isinstance(tree.body[0], ast.Expr):
        node = tree.body[0]
        code = _without_lines(lines, 0, len(lines), node.lineno - 1, node.end_lineno)
        pairs.extend(_make(_first_paragraph(doc), code, "module_docstring", source, node.lineno, settings))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        doc_node = node.body[0]
        if doc_node.lineno == node.lineno:     # `def f(): """doc"""` on one line: nothing to cut out cleanly
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        code = _without_lines(lines, start, node.end_lineno, doc_node.lineno - 1, doc_node.end_lineno)
        body = [ln for ln in code.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
        if not body:                            # a docstring and nothing else (an abstract stub)
            continue
        pairs.extend(_make(_first_paragraph(doc), code, "docstring", source, doc_node.lineno, settings))
    return pairs


# ------------------------------------------------------------------------------------------ folder

def _make(query: str, passage: str, kind: str, source: str, line: int, settings: PairSettings) -> list[Pair]:
    query = _clean(query)
    passage = cut(passage, settings.max_passage_chars)
    if len(query) < settings.min_query_chars or len(passage.strip()) < settings.min_passage_chars:
        return []
    return [Pair(query, passage, kind, source, line)]


def iter_files(root: Path):
    """Text and Python files under `root`, sorted, skipping hidden and tool folders."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES + CODE_SUFFIXES):
                yield Path(dirpath) / name


def collect_pairs(input_path: str | Path, settings: PairSettings | None = None) -> tuple[dict[str, list[Pair]], dict]:
    """{dataset: pairs} from every usable file under `input_path`, plus a report (per-file counts, skipped
    files with the reason, dropped duplicates)."""
    settings = settings or PairSettings()
    settings.validate()
    root = Path(input_path).expanduser()
    if not root.exists():
        raise UserError(f"Input {root} does not exist; pass a folder of .txt / .md / .py files.")
    base = root if root.is_dir() else root.parent
    found: dict[str, list[Pair]] = {TEXT_DATASET: [], CODE_DATASET: []}
    files: list[dict] = []
    skipped: list[dict] = []
    for path in iter_files(root):
        rel = str(path.relative_to(base))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append({"path": rel, "reason": f"unreadable as UTF-8 text ({type(exc).__name__})"})
            continue
        suffix = path.suffix.lower()
        if suffix in CODE_SUFFIXES:
            try:
                pairs = python_pairs(text, rel, settings)
            except (SyntaxError, ValueError) as exc:
                skipped.append({"path": rel, "reason": f"not valid Python ({type(exc).__name__})"})
                continue
            dataset = CODE_DATASET
        elif suffix in (".md", ".markdown"):
            pairs, dataset = markdown_pairs(text, rel, settings), TEXT_DATASET
        else:
            pairs, dataset = text_document_pairs(text, rel, settings), TEXT_DATASET
        if not pairs:
            skipped.append({"path": rel, "reason": "no pair long enough (see --min-query-chars / "
                                                   "--min-passage-chars)"})
            continue
        found[dataset].extend(pairs)
        files.append({"path": rel, "dataset": dataset, "pairs": len(pairs)})
    if not files and not skipped:
        raise UserError(f"{root} holds no {' / '.join(TEXT_SUFFIXES + CODE_SUFFIXES)} files; pass a folder of text, "
                        "markdown or Python files.")
    dropped = {"duplicate_pair": 0, "ambiguous_query": 0}
    for dataset, pairs in found.items():
        seen_pairs: set[tuple[str, str]] = set()
        seen_queries: set[str] = set()
        kept = []
        for pair in pairs:
            if (pair.query, pair.passage) in seen_pairs:
                dropped["duplicate_pair"] += 1
                continue
            seen_pairs.add((pair.query, pair.passage))
            if pair.query in seen_queries:
                dropped["ambiguous_query"] += 1
                continue
            seen_queries.add(pair.query)
            kept.append(pair)
        found[dataset] = kept
    report = {"files": files, "skipped": skipped, "dropped": dropped}
    return {name: pairs for name, pairs in found.items() if pairs}, report


@dataclass
class PairsPlan:
    """The pairs `write_pairs` would write, collected and checked; nothing written (`llm2emb pairs --dry-run`)."""

    root: Path
    output: Path
    datasets: dict[str, list[Pair]]
    report: dict


def plan_pairs(input_path: str | Path, output: str | Path, settings: PairSettings | None = None,
               overwrite: bool = False) -> PairsPlan:
    """`write_pairs` up to writing: the output folder checks, then `collect_pairs` (reading the input files is
    cheap next to anything a model does), refusing input that gives no pair."""
    settings = settings or PairSettings()
    output = Path(output).expanduser()
    root = Path(input_path).expanduser()
    check_output_folder(output, overwrite, INFO_NAME, "pairs")
    if root.is_dir() and output.resolve().is_relative_to(root.resolve()):
        raise UserError(f"--output {output} is inside the input folder {root}; choose a folder outside it.")
    datasets, report = collect_pairs(root, settings)
    if not datasets:
        raise UserError(f"No pairs found in {root}: {len(report['skipped'])} file(s) skipped (first: "
                        f"{report['skipped'][0]['path']}: {report['skipped'][0]['reason']}).")
    return PairsPlan(root, output, datasets, report)


def write_pairs(input_path: str | Path, output: str | Path, settings: PairSettings | None = None,
                overwrite: bool = False) -> PairsResult:
    """`collect_pairs` written as raw training data (see the module docstring)."""
    import pandas as pd

    from llm2emb import __version__

    settings = settings or PairSettings()
    plan = plan_pairs(input_path, output, settings, overwrite)
    root, output, datasets, report = plan.root, plan.output, plan.datasets, plan.report
    rows: dict[str, int] = {}
    info = {"input": str(root.resolve()), "settings": asdict(settings), "version": VERSION,
            "llm2emb_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "datasets": {},
            **report}
    with atomic_dir(output) as tmp:
        for name, pairs in datasets.items():
            frame = pd.DataFrame({"query": [p.query for p in pairs], "passage": [p.passage for p in pairs]})
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
            rows[name] = len(pairs)
            kinds: dict[str, int] = {}
            for pair in pairs:
                kinds[pair.kind] = kinds.get(pair.kind, 0) + 1
            info["datasets"][name] = {"rows": len(pairs), "by_kind": kinds}
        manifest = {name: {"type": "retrieval", "instruction": INSTRUCTIONS[name]} for name in datasets}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("wrote %s to %s", ", ".join(f"{n}: {r} pairs" for n, r in rows.items()), output)
    return PairsResult(output, rows, len(report["files"]), len(report["skipped"]), info)
