"""`llm2emb pairs INPUT --output DIR`: weakly supervised (query, passage) pairs from a folder of text, markdown
and Python files, in the raw layout `llm2emb prepare` reads."""
from __future__ import annotations

import argparse

from llm2emb.commands._args import add_dry_run_argument


def add_parser(subparsers) -> None:
    from llm2emb.data.pairs import PairSettings

    defaults = PairSettings()
    p = subparsers.add_parser(
        "pairs", help="make training pairs from raw .txt / .md / .py files (title, first sentence, docstring)",
        description="Weakly supervised pairs from raw files: markdown heading <-> its section, text title or "
                    "first sentence <-> the rest, Python docstring <-> the code it documents. Writes "
                    "text_pairs.parquet / code_pairs.parquet (query, passage), manifest.json and _pairs_info.json "
                    "(per-file counts, skipped files); train on it after `llm2emb prepare --input DIR`.")
    p.add_argument("input", help="a folder (searched recursively) or one file")
    p.add_argument("--output", "-o", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--min-query-chars", type=int, default=defaults.min_query_chars,
                   help=f"skip shorter queries (default {defaults.min_query_chars})")
    p.add_argument("--min-passage-chars", type=int, default=defaults.min_passage_chars,
                   help=f"skip shorter passages (default {defaults.min_passage_chars})")
    p.add_argument("--max-passage-chars", type=int, default=defaults.max_passage_chars,
                   help=f"cut longer passages (default {defaults.max_passage_chars})")
    p.add_argument("--max-title-chars", type=int, default=defaults.max_title_chars,
                   help=f"a first line longer than this is not a title (default {defaults.max_title_chars})")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_dry_run_argument(p, "the settings and the output folder, and collect the pairs from every input file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.data.pairs import PairSettings, write_pairs

    settings = PairSettings(args.min_query_chars, args.min_passage_chars, args.max_passage_chars,
                            args.max_title_chars)
    if args.dry_run:
        return dry_run(args, settings)
    result = write_pairs(args.input, args.output, settings, overwrite=args.overwrite)
    counts = ", ".join(f"{name}: {rows}" for name, rows in result.rows.items())
    print(f"wrote {counts} pairs from {result.files_used} file(s) to {result.output} "
          f"({result.files_skipped} file(s) skipped, see _pairs_info.json)")
    print(f"next: llm2emb prepare --model MODEL --input {result.output} --output TOKENISED_DIR")
    return 0


def dry_run(args: argparse.Namespace, settings) -> int:
    """The pairs `write_pairs` would write (`plan_pairs`), counted per dataset and kind; nothing written."""
    from llm2emb.data.pairs import plan_pairs

    plan = plan_pairs(args.input, args.output, settings, overwrite=args.overwrite)
    replacing = " (exists: --overwrite would replace it)" if plan.output.exists() else ""
    report = plan.report
    print(f"dry run: would write pairs from {len(report['files'])} file(s) of {plan.root} to "
          f"{plan.output}{replacing}")
    for name, pairs in plan.datasets.items():
        kinds: dict[str, int] = {}
        for pair in pairs:
            kinds[pair.kind] = kinds.get(pair.kind, 0) + 1
        print(f"  {name}.parquet: {len(pairs)} pairs ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    dropped = report["dropped"]
    if any(dropped.values()):
        print(f"  dropped {dropped['duplicate_pair']} duplicate pair(s) and {dropped['ambiguous_query']} "
              "pair(s) whose query has another passage")
    print("  and manifest.json, _pairs_info.json")
    print("nothing written")
    return 0
