"""The task spec of `llm2emb synth`: a YAML (or JSON) file saying what to generate and how.

    dataset: stdlib_synth                 # output dataset (parquet name and manifest key)
    task_type: retrieval                  # retrieval | pairs | sts | classification | clustering
    instruction: "Instruct: ...\\nQuery: " # query instruction in the manifest (default: from `task`)
    weight: 1.0                           # manifest weight: draw share when mixed with other datasets
    template: retrieval                   # shipped template name or a file (relative to this spec)
    system: null                          # optional system message, replaces the template's [system]
    placeholders:                         # one value drawn per passage (seeded); a string or a list
      task: "Given a description, retrieve the Python function that implements it"
      persona: ["a Python beginner", "an experienced developer"]
    labels: [positive, negative]          # classification only: the label texts
    negatives: {mode: retrieved, num: 3, candidates: 10, relabel: true}
    generation: {max_new_tokens: 96, temperature: 0.0, retries: 2}
    filters: {min_query_words: 3, consistency_top_k: 10, ngram: 8}

Every section and field is optional except `task_type`; unknown fields are errors. Shipped specs are named
`builtin:<name>` (files in llm2emb/synth/specs/).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from llm2emb.data.manifest import check_weight
from llm2emb.errors import UserError, did_you_mean
from llm2emb.synth.tasks import NEGATIVE_MODES, SynthTask, synth_task
from llm2emb.synth.templates import PLACEHOLDERS, ROLES, Template, load_template

BUILTIN_PREFIX = "builtin:"
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class NegativeSettings:
    mode: str = "none"               # see llm2emb.synth.tasks.NEGATIVE_MODES
    num: int = 3                     # negatives per row (generated: 1, label: 1)
    candidates: int = 10             # retrieved: BM25 candidates per query (shown to the judge when relabelling)
    skip_top: int = 0                # retrieved without relabel: skip the top few (likely unlabelled positives)
    relabel: bool = True             # retrieved: the LLM judges the candidates (Gecko)
    relabel_template: str = "relabel"
    relabel_passage_chars: int = 500  # each candidate is cut to this many characters in the judge's prompt
    positive_relabel: bool = True    # Gecko: the passage the judge finds best becomes the positive


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 96
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 1.0
    retries: int = 2                 # extra attempts for a reply that does not parse
    retry_temperature: float = 0.7   # greedy would repeat the same failure: retries sample (seeded)
    max_passage_chars: int = 2000    # passages are cut to this many characters in prompts


@dataclass(frozen=True)
class FilterSettings:
    min_query_words: int = 3
    max_query_words: int = 64
    max_query_chars: int = 400
    dedup_jaccard: float = 0.9       # word-set Jaccard at or above which two queries are near-duplicates
    consistency_top_k: int = 10      # the query must retrieve its positive within this many results
    consistency_scorer: str = "bm25"  # bm25, or an embedding model (path, alias) for llm2emb.Embedder
    ngram: int = 8                   # contamination: shared word n-grams with evaluation texts
    min_ngram: int = 4               # evaluation texts shorter than this many words are not matched
    contamination: tuple[str, ...] = ()  # evaluation tasks (BEIR folders, pair files, builtin:stdlib-heldout)


@dataclass(frozen=True)
class SynthSpec:
    source: str
    dataset: str
    task: SynthTask
    instruction: str
    weight: float
    template: Template
    relabel_template: Template | None
    system: str | None
    placeholders: dict[str, tuple[str, ...]]
    labels: tuple[str, ...]
    negatives: NegativeSettings
    generation: GenerationSettings
    filters: FilterSettings = field(default_factory=FilterSettings)

    @property
    def num_negatives(self) -> int:
        """Negative columns of every output row."""
        return {"none": 0, "retrieved": self.negatives.num}.get(self.negatives.mode, 1)

    def generation_key(self) -> dict[str, Any]:
        """Everything in the spec that decides the generated text (not dataset name, instruction, weight or
        filters, which can change without generating again)."""
        return {
            "task_type": self.task.name, "template": self.template.source,
            "relabel_template": self.relabel_template.source if self.relabel_template else None,
            "system": self.system, "placeholders": {k: list(v) for k, v in sorted(self.placeholders.items())},
            "labels": list(self.labels), "negatives": asdict(self.negatives), "generation": asdict(self.generation),
        }


TOP_LEVEL = ("dataset", "task_type", "instruction", "weight", "template", "system", "placeholders", "labels",
             "negatives", "generation", "filters")


def shipped_specs() -> list[str]:
    folder = resources.files("llm2emb.synth") / "specs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_spec_text(ref: str) -> tuple[str, str, Path | None]:
    """(text, name for messages, folder for relative template paths) of a spec file or `builtin:NAME`."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in shipped_specs():
            raise UserError(f"Unknown shipped spec {ref!r}; use one of: "
                            f"{', '.join(BUILTIN_PREFIX + s for s in shipped_specs())}.{did_you_mean(name, shipped_specs())}")
        resource = resources.files("llm2emb.synth") / "specs" / f"{name}.yaml"
        return resource.read_text(encoding="utf-8"), ref, None
    path = Path(ref).expanduser()
    if not path.is_file():
        raise UserError(f"Spec file {path} does not exist; pass a YAML spec or one of "
                        f"{', '.join(BUILTIN_PREFIX + s for s in shipped_specs())}.")
    try:
        return path.read_text(encoding="utf-8"), str(path), path.parent
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read spec {path} ({exc}).") from exc


def load_spec(ref: str, overrides: Mapping[str, Any] | None = None) -> SynthSpec:
    """Read and validate a spec (`overrides`: top-level fields replacing the file's, e.g. from the CLI)."""
    from llm2emb.structured import parse_yaml

    text, name, base = read_spec_text(ref)
    data = parse_yaml(text, f"Spec {name}")
    if not isinstance(data, dict):
        raise UserError(f"Spec {name} must be a mapping of fields (task_type: ..., placeholders: ...).")
    return parse_spec({**data, **(overrides or {})}, name, base)


def _section(data: Mapping[str, Any], key: str, cls: type, where: str) -> Any:
    raw = data.get(key) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{key}' must be a mapping of settings.")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in known:
            raise UserError(f"{where}: unknown setting {key}.{name}; allowed: {', '.join(known)}."
                            f"{did_you_mean(str(name), known)}")
        default = known[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, tuple):
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise UserError(f"{where}: {key}.{name} must be a {type(default).__name__}, got {value!r}.")
        values[name] = value
    return cls(**values)


def _check_settings(neg: NegativeSettings, gen: GenerationSettings, flt: FilterSettings, where: str) -> None:
    positive = {"negatives.num": neg.num, "negatives.candidates": neg.candidates,
                "negatives.relabel_passage_chars": neg.relabel_passage_chars,
                "generation.max_new_tokens": gen.max_new_tokens, "generation.max_passage_chars": gen.max_passage_chars,
                "filters.consistency_top_k": flt.consistency_top_k, "filters.ngram": flt.ngram,
                "filters.min_ngram": flt.min_ngram, "filters.max_query_chars": flt.max_query_chars}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{where}: {key} must be at least 1, got {value}.")
    for key, value in {"negatives.skip_top": neg.skip_top, "generation.retries": gen.retries,
                       "filters.min_query_words": flt.min_query_words, "generation.temperature": gen.temperature,
                       "generation.retry_temperature": gen.retry_temperature}.items():
        if value < 0:
            raise UserError(f"{where}: {key} must be 0 or more, got {value}.")
    if not 0 < gen.top_p <= 1:
        raise UserError(f"{where}: generation.top_p must be in (0, 1], got {gen.top_p}.")
    if not 0 < flt.dedup_jaccard <= 1:
        raise UserError(f"{where}: filters.dedup_jaccard must be in (0, 1], got {flt.dedup_jaccard}.")
    if flt.max_query_words < flt.min_query_words:
        raise UserError(f"{where}: filters.max_query_words ({flt.max_query_words}) is below min_query_words "
                        f"({flt.min_query_words}).")


def parse_spec(data: Mapping[str, Any], name: str, base: Path | None = None) -> SynthSpec:
    where = f"Spec {name}"
    for key in data:
        if key not in TOP_LEVEL:
            raise UserError(f"{where}: unknown field {key!r}; allowed: {', '.join(TOP_LEVEL)}."
                            f"{did_you_mean(str(key), TOP_LEVEL)}")
    if "task_type" not in data:
        raise UserError(f"{where} has no task_type; add e.g. 'task_type: retrieval'.")
    task = synth_task(data["task_type"], where)

    raw_placeholders = data.get("placeholders") or {}
    if not isinstance(raw_placeholders, dict):
        raise UserError(f"{where}: 'placeholders' must map placeholder names to a value or a list of values.")
    placeholders: dict[str, tuple[str, ...]] = {k: p.values for k, p in PLACEHOLDERS.items()}
    placeholders["task"] = (task.default_task,)
    for key, value in raw_placeholders.items():
        key = str(key)
        if not _IDENTIFIER.match(key) or key in {c for r in ROLES.values() for c in r.context}:
            raise UserError(f"{where}: placeholders.{key} is not a usable name (letters, digits, underscore; not "
                            "one the pipeline fills in, such as passage or query).")
        values = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, (str, int, float)) for v in values):
            raise UserError(f"{where}: placeholders.{key} must be a text or a non-empty list of texts.")
        placeholders[key] = tuple(str(v) for v in values)

    negatives = _section(data, "negatives", NegativeSettings, where)
    if "negatives" not in data and task.negative_modes == ("label",):
        negatives = NegativeSettings(mode="label")
    if negatives.mode not in NEGATIVE_MODES or negatives.mode not in task.negative_modes:
        raise UserError(f"{where}: negatives.mode {negatives.mode!r} does not apply to task_type {task.name}; "
                        f"use one of: {', '.join(task.negative_modes)}.")
    generation = _section(data, "generation", GenerationSettings, where)
    filters = _section(data, "filters", FilterSettings, where)
    _check_settings(negatives, generation, filters, where)

    labels = data.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(v, str) and v.strip() for v in labels):
        raise UserError(f"{where}: 'labels' must be a list of label texts.")
    if task.needs_labels and len(set(labels)) < 2:
        raise UserError(f"{where}: task_type {task.name} needs 'labels' with at least two different label texts.")
    if labels and not task.needs_labels:
        raise UserError(f"{where}: 'labels' applies only to task_type classification; remove it.")

    template_ref = data.get("template") or (task.generated_template if negatives.mode == "generated"
                                            else task.template)
    if not isinstance(template_ref, str):
        raise UserError(f"{where}: 'template' must be a template name or a file path.")
    template = load_template(template_ref, base)
    template.check("generate", list(placeholders))
    relabel_template = None
    if negatives.mode == "retrieved" and negatives.relabel:
        relabel_template = load_template(negatives.relabel_template, base)
        relabel_template.check("relabel", list(placeholders))

    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: 'system' must be a text.")

    dataset = data.get("dataset") or f"synth_{task.name}"
    if not isinstance(dataset, str) or not _DATASET_NAME.match(dataset):
        raise UserError(f"{where}: dataset {dataset!r} must be a file name of letters, digits, '_', '-', '.', "
                        "not starting with '_' or '.'.")
    instruction = data.get("instruction")
    if instruction is None:
        # One task text gives the usual instruction; with several there is no single right one.
        tasks = placeholders["task"]
        instruction = f"Instruct: {tasks[0]}\nQuery: " if len(tasks) == 1 else ""
    if not isinstance(instruction, str):
        raise UserError(f"{where}: 'instruction' must be a text.")
    weight = check_weight(data.get("weight", 1.0), f"{where}: ")
    return SynthSpec(name, dataset, task, instruction, weight, template, relabel_template, system, placeholders,
                     tuple(labels), negatives, generation, filters)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
