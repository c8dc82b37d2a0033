"""`llm2emb mine --model M --input RAW --output RAW2`: add mined hard negatives (negative_1..N) to pair data.

F2LLM's recipe: rank the dataset's passages for every query, skip the top few, keep candidates scoring below
--max-score and below --max-ratio times the positive's score, take the hardest --num. `--scorer bm25` mines
without a model (lexical baseline). Output: F2LLM raw parquet files plus the resolved manifest.json, ready
for `llm2emb prepare`.
"""
from __future__ import annotations

import argparse

from llm2emb.commands._args import add_dry_run_argument


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "") else float(text)


def add_parser(subparsers) -> None:
    from llm2emb.data.formats import FORMATS
    from llm2emb.data.mining import SCORERS, MiningSettings

    d = MiningSettings()
    p = subparsers.add_parser("mine", help="mine hard negatives for pair data (embedding model or BM25)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", help="embedding model for the embedding scorer (hub id, folder, .gguf, alias)")
    p.add_argument("--input", "-i", required=True, help="raw data folder (or one file); any supported format")
    p.add_argument("--output", "-o", required=True, help="folder for the mined F2LLM raw parquet files")
    p.add_argument("--scorer", choices=sorted(SCORERS), default=None,
                   help="embedding (needs --model) or bm25; default: embedding when --model is given, else bm25")
    p.add_argument("--num", type=int, default=d.num, help="negatives per row (default %(default)s)")
    p.add_argument("--skip-top", type=int, default=d.skip_top,
                   help="skip this many top-ranked candidates (likely unlabelled positives; default %(default)s)")
    p.add_argument("--max-score", type=_optional_float, default=d.max_score,
                   help="keep candidates with cosine below this ('none' to disable; BM25 ignores it; "
                        "default %(default)s)")
    p.add_argument("--max-ratio", type=_optional_float, default=d.max_ratio,
                   help="keep candidates scoring below this fraction of the positive's score "
                        "('none' to disable; default %(default)s)")
    p.add_argument("--candidates", type=int, default=d.candidates,
                   help="ranked candidates considered per query (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random fill (default %(default)s)")
    p.add_argument("--pooling", default=None, help="pooling for the embedding scorer (default: the model's, "
                   "or mean for a raw LLM)")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per text when encoding "
                   "(default %(default)s)")
    p.add_argument("--precision", type=str.lower, choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="encode precision of the embedding scorer (default: auto, bf16 where the device computes it "
                        "natively)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None, help="force the input format")
    p.add_argument("--remine", action="store_true", help="replace negatives that datasets already have")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the corpus is encoded")
    add_dry_run_argument(p, "the settings, the model reference (its folder's files, not its weights), every input "
                            "file (read, and each corpus sized against --num) and the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.data.mining import MiningSettings, build_scorer, mine_folder

    scorer_name = args.scorer or ("embedding" if args.model else "bm25")
    if args.dry_run:
        return dry_run(args, scorer_name)
    kwargs = {}
    if scorer_name == "embedding":
        kwargs = {"pooling": args.pooling, "batch_size": args.batch_size, "max_length": args.max_length,
                  "show_progress": not args.no_progress, "precision": args.precision}
    scorer = build_scorer(scorer_name, args.model, **kwargs)
    settings = MiningSettings(num=args.num, skip_top=args.skip_top, max_score=args.max_score,
                              max_ratio=args.max_ratio, candidates=args.candidates, seed=args.seed)
    info = mine_folder(args.input, args.output, scorer, settings, format=args.format, remine=args.remine,
                       overwrite=args.overwrite)
    for name, report in info["datasets"].items():
        if "copied" in report:
            print(f"{name}: {report['rows']} rows copied ({report['copied']})")
        else:
            print(f"{name}: {report['rows']} rows, {report['negatives']} negatives each from a corpus of "
                  f"{report['corpus']}; {report['rows_fully_mined']} rows fully mined, {report['random_fill']} "
                  f"negatives filled at random")
    print(f"wrote {args.output} (scorer {scorer_name})")
    return 0


def dry_run(args: argparse.Namespace, scorer_name: str) -> int:
    """`mine_folder`'s checks (`plan_mine`), the scorer's model reference, each dataset read and its corpus
    sized as mining would; no model is loaded, nothing is mined or written."""
    from llm2emb.data.formats import load_dataset
    from llm2emb.data.manifest import resolve_spec
    from llm2emb.data.mining import SCORERS, MiningSettings, copy_reason, mining_corpus, plan_mine
    from llm2emb.errors import UserError
    from llm2emb.model.loading import check_model_reference

    if scorer_name == "embedding":
        if args.model is None:
            raise UserError("Mining with the embedding scorer needs --model (or use --scorer bm25).")
        check_model_reference(args.model, "--model")
    elif scorer_name not in SCORERS:
        raise UserError(f"Unknown scorer {scorer_name!r}; use one of: {', '.join(SCORERS)}.")
    settings = MiningSettings(num=args.num, skip_top=args.skip_top, max_score=args.max_score,
                              max_ratio=args.max_ratio, candidates=args.candidates, seed=args.seed)
    plan = plan_mine(args.input, args.output, settings, args.overwrite)
    scorer = f"the embedding scorer ({args.model})" if scorer_name == "embedding" else f"the {scorer_name} scorer"
    print(f"dry run: would mine {settings.num} hard negatives per row with {scorer} from {plan.input_dir} into "
          f"{plan.output_dir}")
    for file in plan.files:
        dataset = load_dataset(file, args.format)
        spec = resolve_spec(plan.manifest, dataset.name, dataset.defaults)
        replacing = " (replacing it)" if (plan.output_dir / f"{dataset.name}.parquet").exists() else ""
        reason = copy_reason(spec, dataset.num_negatives, args.remine)
        if reason is not None:
            print(f"  {dataset.name}: {len(dataset.frame)} rows, copied ({reason}) -> "
                  f"{dataset.name}.parquet{replacing}")
            continue
        corpus = mining_corpus(dataset.frame, settings, str(file.path))
        print(f"  {dataset.name}: {len(dataset.frame)} rows, mined from a corpus of {len(corpus.corpus)} passages "
              f"-> {dataset.name}.parquet{replacing}")
    print("  and manifest.json, mine_info.json")
    print("nothing loaded or written")
    return 0
