"""The `llm2emb` subcommands (one module each) and the argparse pieces they share."""
from __future__ import annotations

import argparse


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """Add `--set KEY=VALUE [KEY=VALUE ...]` (repeatable) as `args.overrides`, one flat list of pairs.

    Users type both `--set a=1 b=2` and `--set a=1 --set b=2` (and mix them); "extend" with nargs="+" takes
    either and keeps the order, so a later pair overrides an earlier one as `parse_overrides` expects.
    A quoted value with spaces (`--set 'instruction_separator=Query: '`) is one shell word, hence one pair."""
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help=help or ("override config fields, e.g. --set learning_rate=1e-4 mrl_dims=128,256 "
                      "(several pairs after one --set, or --set repeated)"))


def add_end_token_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add `--end-token auto|eos|pad|none|TOKEN` as `args.end_token` (see `llm2emb.model.tokenization`)."""
    parser.add_argument(
        "--end-token", dest="end_token", default=default, metavar="auto|eos|pad|none|TOKEN",
        help="token that ends every text (EOS pooling reads it): auto = what the tokenizer's post-processor "
             "appends, else EOS" + (f" (default {default})" if default else " (default: the model's setting)"))
