"""`llm2emb synth`: generate training data with an LLM from a corpus and a task spec.

    llm2emb synth --corpus builtin:stdlib-undocumented --spec builtin:stdlib-code --model smollm2-135m \\
        --output data/synth --limit 200 --contamination builtin:stdlib-heldout

For each passage (seeded order, --limit N first), the generator writes the text the spec's task type needs
(retrieval: a query), hard negatives are retrieved (BM25, optionally judged by the LLM as in Gecko) or
generated (e5-mistral), and the rows are filtered: length, near-duplicates, contamination with evaluation
sets, round-trip consistency. Output: DIR/<dataset>.parquet (query, passage, negative_1..k) and its
DIR/manifest.json entry, ready for `llm2emb prepare`; DIR/_synth/ holds the resumable log and report.json.
A killed run continues where it stopped when started again with the same arguments; a folder holding a
different run is refused. Re-running with other filters reuses the generated text.
"""
from __future__ import annotations

import argparse

from llm2emb.commands._args import add_dry_run_argument, deprecated_alias


def add_parser(subparsers) -> None:
    from llm2emb.synth.corpus import BUILTIN_CORPORA
    from llm2emb.synth.filters import FILTERS
    from llm2emb.synth.generators import GENERATORS
    from llm2emb.synth.spec import shipped_specs
    from llm2emb.synth.templates import shipped_templates

    p = subparsers.add_parser("synth", help="generate training data with an LLM (queries, hard negatives, filters)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True,
                   help="passages: .jsonl/.json/.parquet/.csv/.tsv (text field), .txt (one per line), a BEIR "
                        f"folder, or {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")
    p.add_argument("--spec", "-s", required=True,
                   help=f"task spec (YAML) or {', '.join('builtin:' + n for n in shipped_specs())}; shipped "
                        f"templates: {', '.join(shipped_templates())}")
    p.add_argument("--model", "-m", required=True,
                   help="generator: a causal LM (built-in alias, folder, .gguf or hub id); instruction-tuned works best")
    p.add_argument("--output", "-o", required=True, help="output folder (may also hold other datasets)")
    p.add_argument("--seed", type=int, default=0, help="order, placeholder draws and sampling (default %(default)s)")
    p.add_argument("--limit", type=int, help="generate for the first N passages of the seeded order")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generator call (default %(default)s)")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="transformers",
                   help="backend (default %(default)s; vllm needs pip install 'llm2emb[vllm]' and a GPU, untested)")
    p.add_argument("--device", help="transformers device (default cpu)")
    p.add_argument("--dtype", help="model dtype (transformers default float32)")
    p.add_argument("--filter", dest="filters",
                   help=f"filters to apply, comma-separated from {', '.join(FILTERS)}, or none (default: all)")
    p.add_argument("--contamination", action="append", default=[], metavar="TASK",
                   help="evaluation set that must not leak (BEIR folder, pair file, builtin:stdlib-heldout); "
                        "repeatable or comma-separated")
    p.add_argument("--consistency-scorer", help="bm25 (default) or an embedding model for the round-trip filter")
    p.add_argument("--top-k", type=int, help="round-trip filter: the positive must be in the top K (spec default 10)")
    p.add_argument("--field", dest="text_field", help="text field / column of a table corpus (default: text, passage, content, ...)")
    p.add_argument("--id-field", help="id field / column of a table corpus (default: _id or id, else the row number)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dry_run_argument(p, "the options, the spec, the corpus, the contamination sets, the generator's and "
                            "scorer's references (their config, not their weights) and the output folder's run")
    deprecated_alias(p, "-c", "--corpus")  # -c means --config everywhere else
    deprecated_alias(p, "--text-field", "--field")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.synth.output import report_table
    from llm2emb.synth.pipeline import SynthOptions, synthesize

    contamination = tuple(t.strip() for item in args.contamination for t in item.split(",") if t.strip())
    options = SynthOptions(
        corpus=args.corpus, spec=args.spec, model=args.model, output=args.output, seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, generator=args.generator, device=args.device, dtype=args.dtype,
        filters=args.filters, contamination=contamination, consistency_scorer=args.consistency_scorer,
        top_k=args.top_k, text_field=args.text_field, id_field=args.id_field, progress=not args.no_progress)
    if args.dry_run:
        return dry_run(options)
    report = synthesize(options)
    gen = report["generation"]
    print(report_table(report))
    speed = f", {gen['queries_per_minute']} parsed replies per minute" if gen["queries_per_minute"] else ""
    print(f"{report['rows']['kept']} rows kept of {gen['passages']} passages ({gen['parsed']} parsed{speed}); "
          f"wrote {report['output']} and its manifest entry; report {args.output}/_synth/report.json")
    return 0


def dry_run(options) -> int:
    """`synthesize`'s checks before generating (`plan_synth`, fetching no model that is not on this machine),
    and the plan: passages and chunks to generate, what an earlier run in the folder already holds, filters,
    files to write. No model weights are loaded; nothing is written."""
    from llm2emb.synth.generate import plan_chunks
    from llm2emb.synth.pipeline import plan_synth

    plan = plan_synth(options, fetch=False)
    spec, corpus = plan.spec, plan.corpus
    chunks = plan_chunks(corpus, options.seed, options.batch_size, options.limit)
    passages = sum(len(c) for c in chunks)
    print(f"dry run: would generate {spec.task.name} data for {passages} of {len(corpus)} passages of "
          f"{corpus.name} ({len(chunks)} chunk(s) of {options.batch_size}) with {options.model} "
          f"({options.generator} backend)" + ("" if plan.generator is not None else
                                              "; the model is not on this machine and was not fetched"))
    ids_of = [[corpus.passages[i].id for i in chunk] for chunk in chunks]
    if plan.key is None:
        state = ("holds a synth run (whether it is this one is known once the model is resolved)"
                 if plan.store.dir.exists() else "holds no synth run: a new run")
    elif plan.store.check(plan.key, spec.dataset):
        done = plan.store.chunks(repair=False)
        finished = sum(1 for c, ids in enumerate(ids_of) if done.get(c, {}).get("ids") == ids)
        state = f"holds this run: {finished} of {len(chunks)} chunk(s) done, the rest would be generated"
    else:
        state = "holds no synth run: a new run"
    print(f"  {plan.output} {state}")
    negatives = f"{spec.num_negatives} {spec.negatives.mode} hard negative(s) per row" if spec.num_negatives \
        else "no hard negatives"
    print(f"  {negatives}; filters: {', '.join(plan.filters) or 'none'}"
          + (f"; contamination sets: {', '.join(spec.filters.contamination)}" if plan.index is not None else ""))
    print(f"  would write {plan.output / (spec.dataset + '.parquet')}, its manifest.json entry and "
          f"{plan.store.dir}/")
    print("nothing loaded or written")
    return 0
