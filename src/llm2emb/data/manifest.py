"""Task types and the per-dataset manifest.

A data folder may hold a `manifest.json` mapping dataset name -> {"type": ..., "instruction": ..., "weight": ...}:

    {"scifact_en": {"type": "retrieval", "instruction": "Instruct: Retrieve the abstract.\\nQuery: "},
     "banking77":  {"type": "classification"},
     "synthetic":  {"type": "retrieval", "weight": 0.5}}

`type` decides the loss (in-batch negatives or only the hard-negative term) and how many hard negatives a
row trains with; `instruction` is prepended to every query at tokenisation; `weight` (default 1, any number
>= 0) scales how often the batcher draws the dataset: per epoch it contributes weight x its number of batches
(see `llm2emb.data.batching`). Datasets missing from the manifest are retrieval without instruction, weight 1.
There are no hard-coded dataset-name lists anywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

from llm2emb.errors import UserError, did_you_mean

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TaskType:
    """How one kind of training data is used.

    use_inbatch: other rows' positives count as negatives (wrong for classification / clustering / STS,
        where another row often shares the label, i.e. is a false negative; F2LLM, arXiv:2510.02294).
    forced_num_negatives: hard negatives per row regardless of `num_hard_neg` (classification: the one
        "other label" text; None = use the trainer's `num_hard_neg`).
    minable: hard-negative mining makes sense (a query with a relevant passage, not a label).
    """

    name: str
    use_inbatch: bool
    forced_num_negatives: int | None
    minable: bool
    description: str


TASK_TYPES: dict[str, TaskType] = {}


def register_task_type(task: TaskType) -> TaskType:
    TASK_TYPES[task.name] = task
    return task


register_task_type(TaskType("retrieval", True, None, True, "query -> relevant passage (default)"))
register_task_type(TaskType("pairs", True, None, True, "paraphrase / duplicate pairs, symmetric"))
register_task_type(TaskType("sts", False, None, False, "semantically similar sentence pairs"))
register_task_type(TaskType("clustering", False, None, False, "text -> text of the same cluster"))
register_task_type(TaskType("classification", False, 1, False, "text -> label text, negative = other label"))

DEFAULT_TYPE = "retrieval"
DEFAULT_WEIGHT = 1.0
FIELDS = ("type", "instruction", "weight")


@dataclass(frozen=True)
class DatasetSpec:
    """The resolved manifest entry of one dataset."""

    type: str = DEFAULT_TYPE
    instruction: str = ""
    weight: float = DEFAULT_WEIGHT

    @property
    def task(self) -> TaskType:
        return TASK_TYPES[self.type]

    def to_dict(self) -> dict[str, str | float]:
        # The default weight is left out so that manifests (and prepare's change keys, which hash this dict)
        # of data without weights stay exactly what they were before weights existed.
        data: dict[str, str | float] = asdict(self)
        if self.weight == DEFAULT_WEIGHT:
            del data["weight"]
        return data


def task_type(name: str, where: str = "") -> TaskType:
    """The registered task type `name`; a UserError naming `where` when unknown."""
    if name not in TASK_TYPES:
        raise UserError(f"{where}unknown task type {name!r}; use one of: {', '.join(TASK_TYPES)}."
                        f"{did_you_mean(str(name), TASK_TYPES)}")
    return TASK_TYPES[name]


def check_weight(value: object, where: str) -> float:
    """A dataset weight: a finite number >= 0 (0 leaves the dataset out of training)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{where}'weight' must be a number >= 0 (1 = its natural share), got {value!r}.")
    return float(value)


def parse_manifest(data: object, source: str) -> dict[str, dict[str, str | float]]:
    """Validate the JSON object of a manifest (dataset -> {type, instruction, weight}); returns, per dataset,
    the fields it sets (a field it leaves out falls back to the dataset's own default when resolved)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source} must be a JSON object mapping dataset name -> "
                        '{"type": ..., "instruction": ...}.')
    specs: dict[str, dict[str, str | float]] = {}
    for name, entry in data.items():
        where = f"{source}, dataset {name!r}: "
        if isinstance(entry, str):  # shorthand {"name": "classification"}
            entry = {"type": entry}
        if not isinstance(entry, Mapping):
            raise UserError(f"{where}the entry must be an object like "
                            '{"type": "retrieval", "instruction": "..."}.')
        unknown = set(entry) - set(FIELDS)
        if unknown:
            key = sorted(unknown)[0]
            raise UserError(f"{where}unknown field {key!r}; allowed fields are 'type', 'instruction' and "
                            f"'weight'.{did_you_mean(key, FIELDS)}")
        fields: dict[str, str | float] = {}
        if "type" in entry:
            if not isinstance(entry["type"], str):
                raise UserError(f"{where}'type' must be a string, one of: {', '.join(TASK_TYPES)}.")
            fields["type"] = task_type(entry["type"], where).name
        if "instruction" in entry:
            instruction = entry["instruction"]
            if instruction is not None and not isinstance(instruction, str):
                raise UserError(f"{where}'instruction' must be a string.")
            fields["instruction"] = instruction or ""
        if "weight" in entry:
            fields["weight"] = check_weight(entry["weight"], where)
        specs[str(name)] = fields
    return specs


def read_manifest(data_dir: str | Path) -> dict[str, dict[str, str | float]]:
    """The manifest in `data_dir`, as `parse_manifest` returns it ({} when there is none)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.exists():
        return {}
    from llm2emb.structured import parse_json, read_text_utf8

    try:
        text = read_text_utf8(path, "manifest")
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc}).") from exc
    data = parse_json(text, path)
    return parse_manifest(data, str(path))


def resolve_manifest(manifest: Mapping[str, Mapping[str, str | float]], datasets: Iterable[str],
                     source: str = MANIFEST_NAME, defaults: Mapping[str, DatasetSpec] | None = None,
                     ) -> dict[str, DatasetSpec]:
    """One spec per dataset: the fields its manifest entry sets, over `defaults` (e.g. a BGE file's own
    type and prompt), over retrieval without instruction. A manifest entry naming no dataset is an error
    (most likely a typo that would otherwise silently train with the wrong loss)."""
    names = list(datasets)
    for name in manifest:
        if name not in names:
            raise UserError(f"{source} names dataset {name!r}, but there is no such dataset "
                            f"(found: {', '.join(names) or 'none'}).{did_you_mean(name, names)}")
    defaults = defaults or {}
    return {name: resolve_spec(manifest, name, defaults.get(name)) for name in names}


def resolve_spec(manifest: Mapping[str, Mapping[str, str | float]], name: str, default: DatasetSpec | None = None,
                 ) -> DatasetSpec:
    """The spec of one dataset (no check of the other entries: call `resolve_manifest` once for that)."""
    return DatasetSpec(**{**(default or DatasetSpec()).to_dict(), **manifest.get(name, {})})  # type: ignore[arg-type]


def manifest_to_json(specs: Mapping[str, DatasetSpec]) -> dict[str, dict[str, str | float]]:
    return {name: spec.to_dict() for name, spec in specs.items()}
