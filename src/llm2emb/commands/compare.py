"""`llm2emb compare RESULTS...`: one markdown table (rows = models/configs, columns = task x metric) and an
optional bar chart from `llm2emb eval` result files or folders."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare eval results: markdown table and bar chart",
                              description="Turn `llm2emb eval` result files (or folders of them) into one markdown "
                                          "table, rows = models/configs, columns = task x metric.")
    p.add_argument("results", nargs="+", help="result JSON files or folders (searched recursively)")
    p.add_argument("--output", "-o", help="also write the markdown report to this file")
    p.add_argument("--plot", help="write a bar chart (PNG) to this file")
    p.add_argument("--metrics", help="comma-separated metric keys, e.g. ndcg_at_10,recall_at_10,precision_at_10 "
                                     "(default: the seed's columns per task kind)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llm2emb.eval.report import plot_report, render_report
    from llm2emb.atomic import write_text_atomic
    from llm2emb.eval.results import load_records

    records = load_records(args.results)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = render_report(records, metrics)
    print(report, end="")
    if args.output:
        write_text_atomic(Path(args.output).expanduser(), report)
        print(f"wrote {args.output}")
    if args.plot:
        plot_report(records, args.plot, metrics)
        print(f"wrote {args.plot}")
    return 0
