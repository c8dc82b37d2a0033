"""Synthetic training data written by a generator LLM (`llm2emb synth`).

From a corpus of passages and a task spec, a generator writes one training text per passage (a query, a
paraphrase, a similar sentence, a topic title or a label), hard negatives are retrieved and judged or
generated, and filters drop what is unusable or leaks evaluation text. The output is a dataset in the F2LLM
raw layout with its manifest entry, so `llm2emb prepare` tokenises it next to real data.

Modules, one concern each:
    spec           the YAML task spec                    templates      prompt files and placeholders
    tasks          what each task type generates          corpus         passages from files / built-ins
    generators     transformers / vLLM backends           replies        JSON reply parsing
    retry          bounded retries and seeds              negatives      retrieved / judged / generated
    generate       the chunked, resumable loop            store          run manifest + append-only log
    filters        length, dedup, contamination, consistency (with contamination: the n-gram index)
    output         parquet, manifest, report              pipeline       `synthesize`, the whole run
"""
from llm2emb.synth.pipeline import SynthOptions, synthesize

__all__ = ["SynthOptions", "synthesize"]
