"""The `llm2emb` command. Each subcommand lives in `llm2emb.commands.<name>` and exposes
`add_parser(subparsers)` plus `run(args) -> int`; adding a command means adding a module and a name here."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Iterator, Sequence

from llm2emb.commands._args import Parser
from llm2emb.errors import UserError

# Order is the order shown in --help.
COMMANDS: tuple[str, ...] = (
    "models", "prepare", "pairs", "mine", "synth", "train", "pipeline", "study", "merge", "eval", "compare", "encode",
    "export", "demo",
)


def build_parser() -> Parser:
    from llm2emb import __version__

    parser = Parser(prog="llm2emb", description="Turn decoder-only LLMs into embedding models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"llm2emb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"llm2emb.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still under construction is simply absent
            if exc.name == f"llm2emb.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    for command in set(sub.choices.values()):
        _add_verbose(command)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`-v/--verbose` after the subcommand too (`llm2emb train -v ...`), on nested subcommands as well.

    SUPPRESS as the default keeps the top-level `-v` when the subcommand's is not given."""
    if "-v" not in parser._option_string_actions:
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="debug logging and full tracebacks")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _add_verbose(child)


def parse_args(parser: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args with the unknown-option error (and its did-you-mean) coming from the subcommand's parser."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        target: argparse.ArgumentParser = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(args, "command", None):
                target = action.choices[args.command]
                for inner in target._actions:  # a nested command (`models download`)
                    if isinstance(inner, argparse._SubParsersAction) and getattr(args, inner.dest, None):
                        target = inner.choices[getattr(args, inner.dest)]
        if isinstance(target, Parser):
            target.unknown_arguments(extras)
        target.error(f"unrecognised arguments: {' '.join(extras)}")
    return args


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """`--no-progress` silences the libraries' bars too (transformers' "Loading weights", Hub downloads, any
    tqdm bar left at its default), for the command only: the previous state is restored afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    saved_env = {name: os.environ.get(name) for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    hub_was, hf_was = hub_utils.are_progress_bars_disabled(), not hf_logging.is_progress_bar_enabled()
    os.environ.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # tqdm reads TQDM_* as defaults
    hub_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not hub_was:
            hub_utils.enable_progress_bars()
        if not hf_was:
            hf_logging.enable_progress_bar()


# exit status when the reader of stdout went away (`llm2emb train --list-fields | head`): 128 + SIGPIPE, as
# the shell reports for `yes | head`
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a closed stdout (output piped into `head`) ends it quietly with `EXIT_BROKEN_PIPE`."""
    try:
        try:
            return _main(argv)
        finally:  # flush here so that a broken pipe shows up now, not as "Exception ignored" at exit
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from llm2emb.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        with library_progress_bars(not getattr(args, "no_progress", False)):
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
