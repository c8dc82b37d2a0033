"""The task registry behind `llm2emb eval --tasks`: what a task string names and how it is evaluated.

| kind         | task string                                  | evaluator                        | main score      |
|--------------|----------------------------------------------|----------------------------------|-----------------|
| `retrieval`  | a BEIR folder                                | `retrieval.run_retrieval`        | ndcg_at_10      |
| `sts`        | a pair file with graded scores               | `sts.run_sts`                    | cosine_spearman |
| `pairs`      | a pair file with 0/1 labels                  | `pairs.run_pairs`                | max_ap          |
| `builtin`    | `builtin:stdlib` (held-out code search)      | `retrieval.run_retrieval`        | ndcg_at_10      |
| `mteb`       | an MTEB task name (`T2Retrieval`), needs hub | `mteb_adapter.run_mteb_task`     | the task's      |
| `mteb-local` | a BEIR folder run through mteb (offline)     | `mteb_adapter.LocalRetrievalTask`| ndcg_at_10      |

Each outcome also carries per-item values for paired statistics (`TaskOutcome.per_item`): retrieval
{metric: {query id: value}} for `metrics.PER_QUERY_METRICS`; sts {"cosine": [...], "gold": [...]}; pairs
{"cosine": [...], "label": [...]} (lists in file order); mteb kinds none.

Detection tries the kinds in registration order; `kind:target` (e.g. `sts:data/x.tsv`) forces a kind.
A new kind is one `register_task_kind(TaskKind(...))` call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from llm2emb.errors import UserError, did_you_mean

PAIR_SUFFIXES = (".tsv", ".csv", ".txt", ".jsonl")


@dataclass
class TaskOptions:
    """Everything a task run may use; each kind ignores what does not apply to it."""

    limits: int | None = None
    seed: int = 42
    query_instruction: str | None = None
    batch_size: int = 32
    max_length: int | None = None
    dim: int | None = None
    split: str | None = None
    cache: Any = True
    show_progress: bool = True
    index: str = "exact"      # dense retrieval search (eval.search.SEARCHERS): exact, faiss-flat, faiss-hnsw


@dataclass
class TaskOutcome:
    metrics: dict[str, float]
    main_score: str
    split: str | None
    info: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: per-query / per-pair values (layout in the module docstring); empty where a kind has none
    per_item: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskKind:
    name: str
    description: str
    detect: Callable[[str], bool]
    run: Callable[[Any, str, TaskOptions], TaskOutcome]
    display_name: Callable[[str], str] = lambda target: target
    #: checks a target when the task list is read, so a bad name fails before the model loads
    validate: Callable[[str], None] = lambda target: None


TASK_KINDS: dict[str, TaskKind] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    TASK_KINDS[kind.name] = kind
    return kind


@dataclass(frozen=True)
class Task:
    kind: TaskKind
    target: str

    @property
    def name(self) -> str:
        return self.kind.display_name(self.target)


# ----------------------------------------------------------------------------- kinds

def _file_name(target: str) -> str:
    path = Path(target)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def _is_pair_file(target: str) -> bool:
    path = Path(target).expanduser()
    return path.is_file() and path.suffix.lower() in PAIR_SUFFIXES


def _pair_file_is_binary(target: str) -> bool:
    path = Path(target).expanduser()
    return _labels_are_binary(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _labels_are_binary(path: str, mtime_ns: int) -> bool:  # the sts and pairs detectors both ask
    from llm2emb.eval.data import load_pairs

    return load_pairs(path).is_binary


def _run_retrieval(model, target: str, opts: TaskOptions) -> TaskOutcome:
    from llm2emb.eval.retrieval import run_retrieval

    run = run_retrieval(model, target, limits=opts.limits, query_instruction=opts.query_instruction,
                        batch_size=opts.batch_size, max_length=opts.max_length, seed=opts.seed, split=opts.split,
                        dim=opts.dim, cache=opts.cache, show_progress=opts.show_progress, index=opts.index)
    return TaskOutcome(run.metrics, run.main_score, run.split, info={
        "n_queries": run.n_queries, "n_queries_total": run.n_queries_total, "n_docs": run.n_docs,
        "corpus_from_cache": run.corpus_from_cache, **run.index_info}, seconds=run.seconds, per_item=run.per_query)


def _run_pairfile(evaluate: Callable, main_score: str) -> Callable[[Any, str, TaskOptions], TaskOutcome]:
    def run(model, target: str, opts: TaskOptions) -> TaskOutcome:
        from llm2emb.eval.data import check_limits, load_pairs

        check_limits(opts.limits)  # a bad value is an error everywhere; it only keeps retrieval queries
        data = load_pairs(target)
        start = time.perf_counter()
        result = evaluate(model, data, batch_size=opts.batch_size, max_length=opts.max_length, dim=opts.dim,
                          show_progress=opts.show_progress)
        return TaskOutcome(result.metrics, getattr(result, "main_score", None) or main_score, None,
                           info={"n_pairs": len(data.scores)},
                           seconds={"total": time.perf_counter() - start}, per_item=result.per_item)
    return run


def _evaluate_sts(*args, **kwargs):
    from llm2emb.eval.sts import run_sts
    return run_sts(*args, **kwargs)


def _evaluate_pairs(*args, **kwargs):
    from llm2emb.eval.pairs import run_pairs
    return run_pairs(*args, **kwargs)


def _run_mteb(model, target, opts: TaskOptions) -> TaskOutcome:
    from llm2emb.eval.mteb_adapter import run_mteb_task

    start = time.perf_counter()
    out = run_mteb_task(model, target, limits=opts.limits, seed=opts.seed, query_instruction=opts.query_instruction,
                        batch_size=opts.batch_size, max_length=opts.max_length, dim=opts.dim, cache=opts.cache,
                        show_progress=opts.show_progress)
    return TaskOutcome(out["metrics"], out["main_score"], out["split"], info={
        "n_queries": out["n_queries"], "documents_from_cache": out["documents_from_cache"], "runner": "mteb"},
        seconds={"total": time.perf_counter() - start})


def _run_mteb_local(model, target: str, opts: TaskOptions) -> TaskOutcome:
    from llm2emb.eval.data import check_limits
    from llm2emb.eval.mteb_adapter import LocalRetrievalTask

    check_limits(opts.limits)
    return _run_mteb(model, LocalRetrievalTask(target, split=opts.split, limits=opts.limits, seed=opts.seed), opts)


def _validate_mteb_name(name: str) -> None:
    from llm2emb.eval.mteb_adapter import get_mteb_task

    get_mteb_task(name)


def _looks_like_path(target: str) -> bool:
    return "/" in target or "\\" in target or target.startswith((".", "~")) or Path(target).suffix.lower() in (
        *PAIR_SUFFIXES, ".json")


register_task_kind(TaskKind(
    "retrieval", "BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv",
    detect=lambda t: Path(t).expanduser().is_dir(), run=_run_retrieval,
    display_name=lambda t: Path(t).expanduser().resolve().name))
register_task_kind(TaskKind(
    "sts", "pair file with graded similarity scores (e.g. STS-B 0-5)",
    detect=lambda t: _is_pair_file(t) and not _pair_file_is_binary(t),
    run=_run_pairfile(_evaluate_sts, "cosine_spearman"), display_name=_file_name))
register_task_kind(TaskKind(
    "pairs", "pair-classification file with 0/1 labels",
    detect=lambda t: _is_pair_file(t) and _pair_file_is_binary(t),
    run=_run_pairfile(_evaluate_pairs, "max_ap"), display_name=_file_name))
BUILTIN_TASKS = ("stdlib",)


def builtin_task_dir(name: str) -> Path:
    """The BEIR folder of a built-in task, built once under $LLM2EMB_HOME/builtin (offline)."""
    from llm2emb.data.builtin import build_stdlib_codesearch
    from llm2emb.model.loading import llm2emb_home

    _validate_builtin(name)
    return Path(build_stdlib_codesearch(llm2emb_home() / "builtin" / name)["eval_dir"])


def _validate_builtin(name: str) -> None:
    if name not in BUILTIN_TASKS:
        raise UserError(f"Unknown built-in task builtin:{name}; choose one of: "
                        f"{', '.join('builtin:' + t for t in BUILTIN_TASKS)}." + did_you_mean(name, BUILTIN_TASKS))


def _run_builtin(model, target: str, opts: TaskOptions) -> TaskOutcome:
    """The held-out standard-library code search (packages never seen in training), with the instruction its
    training data uses unless another is given."""
    from dataclasses import replace

    from llm2emb.data.builtin import INSTRUCTION

    if opts.query_instruction is None:
        opts = replace(opts, query_instruction=INSTRUCTION)
    return _run_retrieval(model, str(builtin_task_dir(target)), opts)


register_task_kind(TaskKind(
    "builtin", "built-in offline task: builtin:stdlib (held-out standard-library code search)",
    detect=lambda t: False, run=_run_builtin, display_name=lambda t: f"builtin-{t}", validate=_validate_builtin))
register_task_kind(TaskKind(
    "mteb", "MTEB task name, e.g. T2Retrieval (data from the Hugging Face Hub)",
    detect=lambda t: not _looks_like_path(t) and not Path(t).exists(), run=_run_mteb,
    validate=_validate_mteb_name))
register_task_kind(TaskKind(
    "mteb-local", "BEIR folder evaluated through mteb.evaluate (offline; for cross-checking)",
    detect=lambda t: False, run=_run_mteb_local,
    display_name=lambda t: f"{Path(t).expanduser().resolve().name}@mteb"))


# ----------------------------------------------------------------------------- resolution and running

def resolve_task(spec: str) -> Task:
    """The `Task` a string names: `kind:target`, an existing folder or file, or an MTEB task name."""
    spec = spec.strip()
    if not spec:
        raise UserError("Empty task name in --tasks; separate tasks with commas, e.g. --tasks a,b.")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in TASK_KINDS and rest:
        TASK_KINDS[prefix].validate(rest)
        return Task(TASK_KINDS[prefix], rest)
    for kind in TASK_KINDS.values():
        if kind.detect(spec):
            kind.validate(spec)
            return Task(kind, spec)
    path = Path(spec).expanduser()
    if path.is_file():
        raise UserError(f"Task file {path} is not a pair file ({', '.join(PAIR_SUFFIXES)}); retrieval tasks are "
                        "folders with corpus.jsonl, queries.jsonl and qrels/.")
    raise UserError(f"Task {spec!r} does not exist: no such file or folder.{did_you_mean(path.name, _siblings(path))}")


def _siblings(path: Path) -> list[str]:
    try:
        return [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return []


def run_task(model, task: Task | str, options: TaskOptions | None = None) -> TaskOutcome:
    """Evaluate `model` (Embedder, SentenceTransformer or `TextEncoder`) on one task."""
    if isinstance(task, str):
        task = resolve_task(task)
    return task.kind.run(model, task.target, options or TaskOptions())


def split_task_list(text: str) -> list[str]:
    """`--tasks a,b` -> ["a", "b"] (empty items rejected)."""
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise UserError(f"--tasks {text!r} has an empty item; separate task names with single commas.")
    return items
