"""The CLI vocabulary: one definition of every argument that several commands share, and the parser class.

Every `llm2emb` command builds its arguments from these helpers, so the same thing has the same name
everywhere (`-m/--model`, `-o/--output`, `--max-length`, `--set`, `--overwrite`, `--no-progress`, `--dry-run`,
`--list-fields`). The rules are written down in docs/cli-vocabulary.md and enforced by
tests/test_cli_vocabulary.py, which walks every subcommand's parser: a new command that calls these helpers
complies by construction. An old spelling stays accepted through `deprecated_alias` (hidden from --help,
one note on stderr when used) for one release.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from llm2emb.errors import did_you_mean

#: long option -> the one short option it has everywhere (a short option means this and nothing else)
SHORT_OPTIONS: dict[str, str] = {
    "--model": "-m", "--output": "-o", "--input": "-i", "--config": "-c", "--spec": "-s", "--verbose": "-v",
}
#: long options with the same meaning in every command; a command offering the thing uses this spelling
CANONICAL: dict[str, str] = {
    "--max-length": "max tokens per text",
    "--set": "override config fields: KEY=VALUE pairs, several after one --set or --set repeated",
    "--overwrite": "replace existing output instead of refusing or skipping",
    "--no-progress": "no progress bar",
    "--dry-run": "check everything and print what would run; run nothing",
    "--list-fields": "print every field of the command's file format and exit",
    "--batch-size": "texts per forward pass",
    "--field": "the text field of a JSON Lines input",
    "--id-field": "the id field of a JSON Lines input",
    "--query-instruction": "instruction prepended to queries",
}
#: spellings that must not be a command's main name for an option (use the value instead); they may only
#: survive as `deprecated_alias` or as a listed compatibility spelling
RENAMED: dict[str, str] = {
    "--max-seq-length": "--max-length", "--text-field": "--field", "--output-dir": "--output",
    "--model-path": "--model", "--no-progress-bar": "--no-progress", "--force": "--overwrite",
    "--merge": "--merge-lora",
}
#: underscore spellings kept for F2LLM-style scripts' evaluate_extractor_mteb.py command lines (eval only)
COMPAT_SPELLINGS: frozenset[str] = frozenset({"--ckpt_dir", "--query_instruction", "--batch_size",
                                              "--output_folder"})


class SubCommands(argparse._SubParsersAction):
    """The subcommands of a `Parser`; an old command name (`deprecated_command`) still selects the new command,
    hidden from --help and from the list of choices in errors, with one note on stderr."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: old command name -> current name
        self.renamed: dict[str, str] = {}

    def current_names(self) -> list[str]:
        return [name for name in self.choices if name not in self.renamed]

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        name = values[0]
        if name in self.renamed:
            new = self.renamed[name]
            prefix = self._prog_prefix
            print(f"note: '{prefix} {name}' is deprecated and will be removed in the next release; use "
                  f"'{prefix} {new}'", file=sys.stderr)
            values = [new, *values[1:]]
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """ArgumentParser with no prefix matching (`--task` is not silently `--tasks`) and did-you-mean errors.

    `add_subparsers` hands this class to every subcommand parser, so command modules get it without asking."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", SubCommands)
        #: old spelling -> current option (`deprecated_alias`)
        self.renamed: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self.renamed:
            args = list(sys.argv[1:] if args is None else args)
            for i, arg in enumerate(args):
                if arg == "--":
                    break
                name, eq, value = arg.partition("=")
                if name in self.renamed:
                    new = self.renamed[name]
                    print(f"note: {name} is deprecated and will be removed in the next release; use {new}",
                          file=sys.stderr)
                    args[i] = new + eq + value
        return super().parse_known_args(args, namespace)

    def option_names(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if a.help is not argparse.SUPPRESS]

    def error(self, message: str) -> None:  # type: ignore[override]
        match = re.search(r"invalid choice: '([^']*)'", message)
        if match:
            choices = [c for a in self._actions if isinstance(a, SubCommands) for c in a.current_names()]
            if choices:
                message = (f"unknown command {match.group(1)!r}; choose one of: {', '.join(choices)}."
                           + did_you_mean(match.group(1), choices))
        super().error(message)

    def unknown_arguments(self, extras: list[str]) -> None:
        """Report arguments no parser took, with a did-you-mean over this parser's options."""
        flags = [e for e in extras if e.startswith("-")]
        if flags:
            name = flags[0].split("=", 1)[0]
            hint = did_you_mean(name, self.option_names())
            self.error(f"unknown option {name}." + hint + (f" (other unrecognised arguments: "
                                                            f"{' '.join(e for e in extras if e != flags[0])})"
                                                            if len(extras) > 1 else ""))
        self.error(f"unrecognised arguments: {' '.join(extras)}")


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Keep the old spelling `old` of option `new` working for one release: it is rewritten to `new` before
    parsing (so a required `new` is satisfied), hidden from --help, and prints one note on stderr when used."""
    if not isinstance(parser, Parser):
        raise TypeError("deprecated_alias needs an llm2emb.commands._args.Parser (every llm2emb subcommand is one)")
    parser.renamed[old] = new


def deprecated_command(subcommands: argparse._SubParsersAction, old: str, new: str) -> None:
    """Keep the old command name `old` of subcommand `new` working for one release (`llm2emb models prepare` ->
    `llm2emb models download`): it selects `new` (the namespace says `new`), is not listed in --help, and prints
    one note on stderr when used."""
    if not isinstance(subcommands, SubCommands):
        raise TypeError("deprecated_command needs the subcommands of an llm2emb.commands._args.Parser")
    subcommands.renamed[old] = new
    subcommands._name_parser_map[old] = subcommands._name_parser_map[new]


def add_model_argument(parser: argparse.ArgumentParser, help: str, required: bool = True, **kwargs: Any) -> None:
    """`-m/--model` as `args.model`."""
    parser.add_argument("--model", "-m", required=required, help=help, **kwargs)


def add_output_argument(parser: argparse.ArgumentParser, help: str, required: bool = False, **kwargs: Any) -> None:
    """`-o/--output` as `args.output`."""
    kwargs.setdefault("default", None)
    parser.add_argument("--output", "-o", required=required, help=help, **kwargs)


def add_max_length_argument(parser: argparse.ArgumentParser, default: int | None, help: str,
                            old: tuple[str, ...] = ()) -> None:
    """`--max-length N` as `args.max_length`; `old` spellings (e.g. --max-seq-length) stay as deprecated aliases."""
    parser.add_argument("--max-length", dest="max_length", type=int, default=default, metavar="N", help=help)
    for spelling in old:
        deprecated_alias(parser, spelling, "--max-length")


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """Add `--set KEY=VALUE [KEY=VALUE ...]` (repeatable) as `args.overrides`, one flat list of pairs.

    Users type both `--set a=1 b=2` and `--set a=1 --set b=2` (and mix them); "extend" with nargs="+" takes
    either and keeps the order, so a later pair overrides an earlier one as `parse_overrides` expects.
    A quoted value with spaces (`--set 'instruction_separator=Query: '`) is one shell word, hence one pair."""
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help=help or ("override config fields, e.g. --set learning_rate=1e-4 mrl_dims=128,256 "
                      "(several pairs after one --set, or --set repeated)"))


def add_overwrite_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_no_progress_argument(parser: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_dry_run_argument(parser: argparse.ArgumentParser, checks: str,
                         prints: str = "what would run and be written") -> None:
    """`--dry-run` as `args.dry_run`, with the one wording: check `checks` (what this command validates), print
    `prints`, load no model and write nothing."""
    parser.add_argument("--dry-run", action="store_true",
                        help=f"check {checks}; print {prints}; load no model and write nothing")


def add_list_fields_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--list-fields", action="store_true", help=f"print every field of {what} and exit")


def add_end_token_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add `--end-token auto|eos|pad|none|TOKEN` as `args.end_token` (see `llm2emb.model.tokenization`)."""
    parser.add_argument(
        "--end-token", dest="end_token", default=default, metavar="auto|eos|pad|none|TOKEN",
        help="token that ends every text (EOS pooling reads it): auto = what the tokenizer's post-processor "
             "appends, else EOS" + (f" (default {default})" if default else " (default: the model's setting)"))


def print_field_sections(sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """The `--list-fields` table of a file format: [section] then `field  meaning` rows."""
    for section, rows in sections:
        print(f"\n[{section}]")
        for name, help in rows:
            print(f"  {name:<24} {help}")
