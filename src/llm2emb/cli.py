"""The `llm2emb` command. Each subcommand lives in `llm2emb.commands.<name>` and exposes
`add_parser(subparsers)` plus `run(args) -> int`; adding a command means adding a module and a name here."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from llm2emb.errors import UserError

# Order is the order shown in --help.
COMMANDS: tuple[str, ...] = (
    "models", "prepare", "pairs", "mine", "synth", "train", "pipeline", "study", "merge", "eval", "compare", "encode",
    "export", "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2emb", description="Turn decoder-only LLMs into embedding models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"llm2emb.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still under construction is simply absent
            if exc.name == f"llm2emb.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from llm2emb.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.verbose or os.environ.get("LLM2EMB_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
