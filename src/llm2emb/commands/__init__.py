"""The `llm2emb` subcommands (one module each); the argparse pieces they share live in `_args`."""
from __future__ import annotations

from llm2emb.commands._args import add_end_token_argument, add_set_argument

__all__ = ["add_end_token_argument", "add_set_argument"]
