"""`llm2emb mine --model M --input RAW --output RAW2`: add mined hard negatives (negative_1..N) to pair data.

F2LLM's recipe: rank the dataset's passages for every query, skip the top few, keep candidates scoring below
--max-score and below --max-ratio times the positive's score, take the hardest --num. `--scorer bm25` mines
without a model (lexical baseline). Output: F2LLM raw parquet files plus the resolved manifest.json, ready
for `llm2emb prepare`.
"""
from __future__ import annotations

import argparse


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.data.mining import MiningSettings, build_scorer, mine_folder

    scorer_name = args.scorer or ("embedding" if args.model else "bm25")
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
