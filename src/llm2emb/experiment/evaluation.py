"""The `eval:` section shared by study and pipeline files: which tasks every trained model is evaluated on,
with which options, and the row labels and per-item results the reports compare.

    eval:
      tasks: [builtin:stdlib, {task: ../data/stsb_en/dev.tsv, max_length: 64, name: sts}]
      limits: 200                      # options for every task (a task mapping may override them)
      max_length: 128
      dims: [128, 256]                 # extra Matryoshka rows
      precision: bf16                  # encode precision (auto | fp32 | bf16 | fp16)

Task paths are relative to the experiment file. `load_eval` checks everything before anything runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.experiment.fields import check_keys, int_field, resolve_path

EVAL_FIELDS = ("tasks", "limits", "max_length", "query_instruction", "batch_size", "dims", "seed", "split",
               "precision")
TASK_OPTION_FIELDS = ("task", "limits", "max_length", "query_instruction", "batch_size", "split", "name")


@dataclass(frozen=True)
class EvalTask:
    """One task string with its options (None: the eval section's value)."""
    spec: str
    name: str | None = None
    limits: int | None = None
    max_length: int | None = None
    query_instruction: str | None = None
    batch_size: int | None = None
    split: str | None = None


@dataclass
class EvalSpec:
    """The eval section: tasks and the options shared by them."""
    tasks: list[EvalTask]
    limits: int | None = None
    max_length: int | None = None
    query_instruction: str | None = None
    batch_size: int = 32
    dims: list[int] = field(default_factory=list)
    seed: int = 42
    split: str | None = None
    precision: str | None = None   # encode precision (auto | fp32 | bf16 | fp16); None: auto (ENCODE_DEFAULT)


def load_eval(value: Any, where: str, root: Path) -> EvalSpec:
    """The eval section of the file `where` (folder `root`): tasks resolved and checked, options validated."""
    from llm2emb.eval.tasks import resolve_task

    if not isinstance(value, Mapping) or not value.get("tasks"):
        raise UserError(f"{where}: eval must be a mapping with a non-empty tasks list.")
    check_keys(value, EVAL_FIELDS, f"{where}: eval")
    tasks: list[EvalTask] = []
    for i, item in enumerate(value["tasks"]):
        if isinstance(item, str):
            item = {"task": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("task"), str):
            raise UserError(f"{where}: eval.tasks[{i}] must be a task string or a mapping with `task`.")
        check_keys(item, TASK_OPTION_FIELDS, f"{where}: eval.tasks[{i}]")
        spec = task_path(item["task"], root)
        try:
            resolve_task(spec)
        except UserError as exc:
            raise UserError(f"{where}: eval.tasks[{i}]: {exc}") from None
        tasks.append(EvalTask(spec=spec, **{k: v for k, v in item.items() if k != "task"}))
    try:
        task_labels([t.spec for t in tasks], [t.name for t in tasks])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    dims = value.get("dims") or []
    if not isinstance(dims, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise UserError(f"{where}: eval.dims must be a list of positive integers, e.g. [128, 256].")
    return EvalSpec(tasks=tasks, limits=int_field(value.get("limits"), f"{where}: eval.limits"),
                    max_length=int_field(value.get("max_length"), f"{where}: eval.max_length", minimum=2),
                    query_instruction=value.get("query_instruction"),
                    batch_size=int_field(value.get("batch_size", 32), f"{where}: eval.batch_size", optional=False),
                    dims=list(dims), seed=int(value.get("seed", 42)), split=value.get("split"),
                    precision=parse_precision(value.get("precision"), where))


def eval_identity(spec: EvalSpec) -> dict[str, Any]:
    """What decides evaluation results, for study cells and pipeline stages alike: the eval settings with the
    precision setting (default auto, `model.precision.ENCODE_DEFAULT`) and what it resolves to on this machine.
    Its hash changes when auto means bf16 here but fp32 where earlier results were computed, so those are
    evaluated again, never mixed in one report."""
    from dataclasses import asdict

    from llm2emb.model.precision import encode_setting, resolved_encode_precision

    settings = asdict(spec)
    settings["precision"] = encode_setting(spec.precision)
    settings["resolved_precision"] = resolved_encode_precision(spec.precision)
    return settings


def parse_precision(value: Any, where: str, name: str = "eval.precision") -> str | None:
    """A precision field (auto | fp32 | bf16 | fp16, aliases accepted) in its canonical spelling; None stays None."""
    if value is None:
        return None
    from llm2emb.model.precision import canonical_precision

    return canonical_precision(str(value), f"{where}: {name}")


def task_path(spec: str, root: Path) -> str:
    """Task strings as `llm2emb eval` takes them, with file paths made relative to the study file."""
    from llm2emb.eval.tasks import TASK_KINDS

    prefix, sep, rest = spec.partition(":")
    if sep and prefix in TASK_KINDS:
        return spec if prefix in ("builtin", "mteb") else f"{prefix}:{resolve_path(rest, root)}"
    if "/" in spec or (root / spec).exists():
        return resolve_path(spec, root)
    return spec  # an MTEB task name




def task_labels(specs: list[str], names: list[str | None]) -> list[str]:
    """Row labels of the tasks: the given name, else the task's display name (as `llm2emb eval` names it);
    they must be unique."""
    from llm2emb.eval.tasks import resolve_task

    labels = [name or resolve_task(spec).name for spec, name in zip(specs, names)]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(f"Two eval tasks are both named {twice[0]!r}; give them names (eval.tasks entries "
                        "{task: ..., name: ...}).")
    return labels


def compact_per_item(record: dict[str, Any]) -> dict[str, Any]:
    """What paired statistics need of a result record: the main metric per query, or the pair scores."""
    per_item = record.get("per_item") or {}
    kind = record["task"]["kind"]
    if kind in ("sts", "pairs"):
        return per_item
    return {"scores": per_item.get(record["main_score"], {})}
