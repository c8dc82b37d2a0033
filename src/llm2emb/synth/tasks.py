"""What each task type generates: the synthetic-data side of the manifest's TASK_TYPES.

A SynthTask names its default template, the JSON fields a reply must hold, the default `{task}` text, the
hard-negative modes that make sense for it, and how a parsed reply becomes a (query, passage) row. Adding a
task type is one `register_synth_task` call; its name must be a registered manifest task type, so the
output trains with that type's loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from llm2emb.data.manifest import TASK_TYPES
from llm2emb.errors import UserError, did_you_mean

# Hard-negative modes: none; retrieved = BM25 candidates from the corpus, optionally judged by the LLM (Gecko,
# Lee et al. 2024); generated = written by the LLM in the same reply (e5-mistral, Wang et al. 2024);
# label = another label of the spec (classification, one per row as F2LLM trains it).
NEGATIVE_MODES = ("none", "retrieved", "generated", "label")
GENERATED_FIELD = "hard_negative"


@dataclass(frozen=True)
class SynthTask:
    name: str                                  # a manifest task type
    template: str                              # shipped template for negatives none / retrieved
    generated_template: str                    # shipped template that also asks for a hard negative
    fields: tuple[str, ...]                    # text fields every reply needs
    default_task: str                          # the {task} placeholder when the spec gives none
    negative_modes: tuple[str, ...]
    make_pair: Callable[[str, Mapping[str, str]], tuple[str, str]]  # (passage, reply fields) -> (query, passage)
    needs_labels: bool = False

    def reply_fields(self, negative_mode: str) -> tuple[str, ...]:
        return self.fields + ((GENERATED_FIELD,) if negative_mode == "generated" else ())


SYNTH_TASKS: dict[str, SynthTask] = {}


def register_synth_task(task: SynthTask) -> SynthTask:
    if task.name not in TASK_TYPES:
        raise ValueError(f"synth task {task.name!r} is not a registered manifest task type")
    SYNTH_TASKS[task.name] = task
    return task


def synth_task(name: object, where: str) -> SynthTask:
    if not isinstance(name, str) or name not in SYNTH_TASKS:
        raise UserError(f"{where}: task_type {name!r} is not one of {', '.join(SYNTH_TASKS)}."
                        f"{did_you_mean(str(name), SYNTH_TASKS)}")
    return SYNTH_TASKS[name]


def _query_to_passage(passage: str, reply: Mapping[str, str]) -> tuple[str, str]:
    return reply["query"], passage


def _text_to_label(passage: str, reply: Mapping[str, str]) -> tuple[str, str]:
    return passage, reply["label"]


register_synth_task(SynthTask(
    "retrieval", "retrieval", "retrieval_hard_negative", ("query",),
    "Given a query, retrieve the passage that answers it", ("none", "retrieved", "generated"), _query_to_passage))
register_synth_task(SynthTask(
    "pairs", "pairs", "pairs_hard_negative", ("query",),
    "Retrieve texts that say the same as the given text", ("none", "retrieved", "generated"), _query_to_passage))
register_synth_task(SynthTask(
    "sts", "sts", "sts_hard_negative", ("query",),
    "Retrieve semantically similar text", ("none", "retrieved", "generated"), _query_to_passage))
register_synth_task(SynthTask(
    "clustering", "clustering", "clustering_hard_negative", ("query",),
    "Identify the topic of the text", ("none", "retrieved", "generated"), _query_to_passage))
register_synth_task(SynthTask(
    "classification", "classification", "classification", ("label",),
    "Classify the text", ("label",), _text_to_label, needs_labels=True))
