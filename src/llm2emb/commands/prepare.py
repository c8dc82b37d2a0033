"""`llm2emb prepare --model M --input RAW_DIR --output TOK_DIR`: tokenise raw training data for one tokenizer.

The generalised `tokenize_data_qwen.py` of F2LLM: any tokenizer (hub id, local folder, .gguf, built-in alias),
any supported input format (F2LLM parquet, BGE/FlagEmbedding jsonl, sentence-transformers columns), the
per-dataset task manifest, and a folder the trainer checks against its model's tokenizer.
"""
from __future__ import annotations

import argparse

from llm2emb.commands import add_end_token_argument
from llm2emb.commands._args import add_dry_run_argument, add_max_length_argument


def add_parser(subparsers) -> None:
    from llm2emb.data.formats import FORMATS
    from llm2emb.data.tokenize import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEPARATOR

    p = subparsers.add_parser("prepare", help="tokenise raw training data (F2LLM / BGE / sentence-transformers) "
                              "for a model's tokenizer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", required=True,
                   help="tokenizer source: hub id, local model folder, .gguf file or built-in alias")
    p.add_argument("--input", "-i", required=True,
                   help="folder with one file per dataset (optional manifest.json), or a single dataset file")
    p.add_argument("--output", "-o", required=True, help="folder for the tokenised parquet files")
    add_max_length_argument(p, DEFAULT_MAX_SEQ_LENGTH, old=("--max-seq-length",),
                            help="max tokens per text including the appended EOS (longer texts are truncated, EOS "
                                 "kept last; default %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: the number of CPU cores)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="force the input format instead of detecting it from the columns")
    p.add_argument("--instruction-separator", default=DEFAULT_SEPARATOR,
                   help="end of the instruction prefix in queries, for skip-instruction pooling "
                        "(default %(default)r; '' to store no prefix lengths)")
    add_end_token_argument(p, default="auto")
    p.add_argument("--input-strategy", default="plain", metavar="NAME",
                   help="how a text becomes model input (llm2emb.model.input_strategies): plain | echo | prompteol; "
                        "must match the training config's input_strategy (echo gives every text twice: about "
                        "double --max-length)")
    p.add_argument("--summary-token", default=None, metavar="TOKEN",
                   help="pooling cls: add this summary token to the tokenizer and insert it into every text "
                        "(must match the training config's summary_token)")
    p.add_argument("--summary-token-position", choices=("start", "end"), default="end",
                   help="where the summary token goes: start (bidirectional models) or end (default %(default)s); "
                        "must match the training config's summary_token_position (auto: start with "
                        "bi_attn_enabled, else end)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-tokenise datasets that are already prepared in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dry_run_argument(p, "the arguments, every input file (read and converted, not tokenised), the manifest, "
                            "the tokenizer when it is on this machine and the settings of data already in --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.data.tokenize import prepare

    if args.dry_run:
        return dry_run(args)

    result = prepare(args.model, args.input, args.output, max_seq_length=args.max_length,
                     workers=args.workers, format=args.format, instruction_separator=args.instruction_separator,
                     overwrite=args.overwrite, progress=not args.no_progress, end_token=args.end_token,
                     input_strategy=args.input_strategy, summary_token=args.summary_token,
                     summary_token_position=args.summary_token_position)
    stats = result["datasets"]
    w = max([len("dataset"), *map(len, stats)])
    print(f"{'dataset':<{w}} {'type':<14} {'rows':>8} {'k':>3} {'texts':>8} {'trunc':>6} {'p50 q/p':>9}  status")
    for name, s in stats.items():
        lengths = s.get("token_length", {})
        p50 = f"{lengths.get('query', {}).get('p50', 0):.0f}/{lengths.get('passage', {}).get('p50', 0):.0f}"
        truncated = sum(s.get("truncated", {}).values())
        status = "skipped (already prepared)" if name in result["skipped"] else "prepared"
        print(f"{name:<{w}} {s.get('type', ''):<14} {s.get('rows', 0):>8} {s.get('hard_negatives', 0):>3} "
              f"{s.get('unique_texts', 0):>8} {truncated:>6} {p50:>9}  {status}")
    print(f"wrote {args.output} (tokenizer {args.model}, max {args.max_length} tokens)")
    return 0


def dry_run(args: argparse.Namespace) -> int:
    """`prepare`'s own checks (`plan_prepare`, without fetching a tokenizer that is not on this machine), each
    dataset read and converted as the real run reads it, and the plan: which datasets would be tokenised and
    which skipped; nothing is tokenised or written."""
    from llm2emb.data.formats import DEFAULT_PROMPT_TEMPLATE, load_dataset
    from llm2emb.data.manifest import resolve_spec
    from llm2emb.data.tokenize import plan_prepare

    plan = plan_prepare(args.model, args.input, args.output, max_seq_length=args.max_length, format=args.format,
                        instruction_separator=args.instruction_separator, overwrite=args.overwrite,
                        end_token=args.end_token, input_strategy=args.input_strategy,
                        summary_token=args.summary_token, summary_token_position=args.summary_token_position,
                        fetch=False)
    template = (DEFAULT_PROMPT_TEMPLATE.replace("Query:", plan.separator) if plan.separator
                else DEFAULT_PROMPT_TEMPLATE)
    tokenizer = (f"tokenizer {args.model}" if plan.tokenizer is not None else
                 f"tokenizer {args.model} (not on this machine, not fetched: whether data already in --output "
                 "is reused is decided once it is)")
    print(f"dry run: would tokenise {len(plan.files)} dataset(s) of {plan.input_dir} into {plan.output_dir} with "
          f"{tokenizer}, max {args.max_length} tokens")
    for file in plan.files:
        if file.name in plan.skip:
            print(f"  {file.name}: {plan.skip[file.name].type}, already prepared, would be skipped "
                  "(--overwrite to redo)")
            continue
        dataset = load_dataset(file, args.format, template)
        spec = resolve_spec(plan.manifest, dataset.name, dataset.defaults)
        redo = " (replacing its earlier output)" if (plan.output_dir / f"{file.name}.parquet").exists() else ""
        print(f"  {file.name}: {spec.type}, {dataset.format} format, {len(dataset.frame)} rows, "
              f"{dataset.num_negatives} hard negative(s) per row -> {file.name}.parquet{redo}")
    print("nothing tokenised or written")
    return 0
