"""One CLI vocabulary (docs/cli-vocabulary.md): every subcommand's parser is walked and checked.

A failure names the command and the flag. To comply, build arguments with `llm2emb.commands._args`
(add_model_argument, add_output_argument, add_max_length_argument, add_set_argument, deprecated_alias, ...)."""
from __future__ import annotations

import argparse

import pytest

from llm2emb.cli import build_parser, main
from llm2emb.commands import _args


def walk(parser: argparse.ArgumentParser, name: str = "llm2emb"):
    """(command name, parser) for the top level and every (nested) subcommand, aliases once."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for child_name, child in action.choices.items():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield from walk(child, f"{name} {child_name}")


PARSERS = list(walk(build_parser()))
LONG_FOR_SHORT = {short: long for long, short in _args.SHORT_OPTIONS.items()}


def vocabulary_violations(parsers) -> list[str]:
    problems = []
    for command, parser in parsers:
        if parser.allow_abbrev:
            problems.append(f"{command}: allow_abbrev must be False (build parsers through llm2emb.cli's Parser)")
        for action in parser._actions:
            options = action.option_strings
            if not options or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            longs = [o for o in options if o.startswith("--")]
            shorts = [o for o in options if not o.startswith("--")]
            for option in longs:
                if "_" in option and option not in _args.COMPAT_SPELLINGS:
                    problems.append(f"{command}: {option} uses underscores; options are spelt with dashes")
                if option in _args.RENAMED:
                    problems.append(f"{command}: {option} is an old spelling; name it {_args.RENAMED[option]} and "
                                    f"keep {option} through _args.deprecated_alias")
                short = _args.SHORT_OPTIONS.get(option)
                if short and short not in shorts:
                    problems.append(f"{command}: {option} must also be {short} (as in every command)")
            for short in shorts:
                long = LONG_FOR_SHORT.get(short)
                if long is None:
                    problems.append(f"{command}: short option {short} ({'/'.join(options)}) is not in "
                                    f"_args.SHORT_OPTIONS; add it there with one meaning or drop it")
                elif long not in longs:
                    problems.append(f"{command}: {short} means {long} everywhere, here {'/'.join(options)}")
            if "--set" in longs and not (action.nargs == "+" and isinstance(action, argparse._ExtendAction)):
                problems.append(f"{command}: --set must take several pairs and repeat (_args.add_set_argument)")
            if "--max-length" in longs and action.type is not int:
                problems.append(f"{command}: --max-length takes an int (_args.add_max_length_argument)")
    return problems


def test_every_parser_follows_the_vocabulary():
    problems = vocabulary_violations(PARSERS)
    assert not problems, "CLI vocabulary (docs/cli-vocabulary.md):\n  " + "\n  ".join(problems)


def test_the_check_catches_a_violation():
    """The walker reports a flag that breaks the rules, naming command and flag."""
    parser = _args.Parser(prog="x")
    parser.add_argument("--output", help="no -o")
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("-c", "--corpus")
    problems = vocabulary_violations([("llm2emb x", parser)])
    assert any("--output must also be -o" in p for p in problems)
    assert any("--max-seq-length is an old spelling" in p for p in problems)
    assert any("-c means --config" in p for p in problems)


def test_commands_with_outputs_and_models_use_the_short_names():
    commands = {name.split()[-1]: p for name, p in PARSERS}
    for command in ("prepare", "mine", "synth", "eval", "encode", "export", "demo"):
        assert "-m" in commands[command]._option_string_actions, command
    for command in ("prepare", "pairs", "mine", "synth", "pipeline", "study", "merge", "eval", "compare", "encode",
                    "export", "demo"):
        assert "-o" in commands[command]._option_string_actions, command
    for command in ("train", "study", "pipeline", "demo"):
        assert "--set" in commands[command]._option_string_actions, command


def test_no_prefix_matching_and_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "x", "--task", "y"])
    err = capsys.readouterr().err
    assert "llm2emb eval: error: unknown option --task. Did you mean '--tasks'?" in err
    with pytest.raises(SystemExit):
        main(["trian"])
    err = capsys.readouterr().err
    assert "unknown command 'trian'; choose one of:" in err and "Did you mean 'train'?" in err


def test_version_and_verbose_after_the_subcommand(capsys):
    from llm2emb import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    parser = build_parser()
    assert parser.parse_args(["train", "-v", "--list-fields"]).verbose is True
    assert parser.parse_args(["-v", "train", "--list-fields"]).verbose is True
    assert parser.parse_args(["train", "--list-fields"]).verbose is False
    assert parser.parse_args(["models", "list", "-v"]).verbose is True


def test_old_spellings_still_work_with_one_note(capsys):
    parser = build_parser()
    args = parser.parse_args(["prepare", "-m", "m", "-i", "i", "-o", "o", "--max-seq-length", "64"])
    assert args.max_length == 64
    assert capsys.readouterr().err.strip() == ("note: --max-seq-length is deprecated and will be removed in the "
                                               "next release; use --max-length")
    args = parser.parse_args(["synth", "-c", "corpus.txt", "--text-field", "body", "-s", "s", "-m", "m", "-o", "o"])
    assert (args.corpus, args.text_field) == ("corpus.txt", "body")
    err = capsys.readouterr().err
    assert "-c is deprecated" in err and "--text-field is deprecated" in err
    assert "--max-seq-length" not in parser._subparsers._group_actions[0].choices["prepare"].format_help()


def test_pipeline_set_takes_several_pairs():
    args = build_parser().parse_args(["pipeline", "p.yaml", "--set", "train_steps=4", "learning_rate=1e-4",
                                      "--set", "seed=3"])
    assert args.overrides == ["train_steps=4", "learning_rate=1e-4", "seed=3"]


def test_list_fields_of_study_and_pipeline(capsys):
    assert main(["study", "--list-fields"]) == 0
    out = capsys.readouterr().out
    assert "[study]" in out and "recipes" in out and "[eval]" in out
    assert main(["pipeline", "--list-fields"]) == 0
    out = capsys.readouterr().out
    assert "[stage]" in out and "simcse" in out and "[teacher]" in out
    assert main(["study"]) == 2
    assert "needs a study file" in capsys.readouterr().err


def test_a_bad_set_value_names_set_as_its_source(tmp_path):
    from llm2emb.config import load_train_config
    from llm2emb.errors import UserError

    config = tmp_path / "base.yaml"
    config.write_text("model_path: m\nexperiment_id: e\ntrain_data_path: d\n")
    with pytest.raises(UserError, match=r"^--set: field 'train_batch_size' must be >= 1, got 0"):
        load_train_config(config, ["train_batch_size=0"])
    config.write_text("model_path: m\nexperiment_id: e\ntrain_data_path: d\ntrain_batch_size: 0\n")
    with pytest.raises(UserError, match=rf"^{config}: field 'train_batch_size'"):  # the file's own error
        load_train_config(config, ["learning_rate=1e-4"])


def _llm2emb_env():
    import os
    from pathlib import Path

    import llm2emb

    src = str(Path(llm2emb.__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


# argparse's own --help output ignores write errors (exit 0); our commands' output exits 141
@pytest.mark.parametrize("command,codes", [(["train", "--list-fields"], {141}), (["study", "--list-fields"], {141}),
                                           (["--help"], {0, 141})])
def test_a_closed_stdout_ends_quietly(command, codes):
    """`llm2emb ... | head`: the reader is gone before the output is written; no traceback, exit 141 (SIGPIPE)."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has already exited, so the first flush of stdout fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "llm2emb", *command], stdout=write, stderr=subprocess.PIPE,
                              text=True, env=_llm2emb_env(), timeout=120)
    finally:
        os.close(write)
    assert proc.returncode in codes, proc.stderr
    assert proc.stderr == ""


def test_piping_into_head_prints_no_traceback():
    import shutil
    import subprocess
    import sys

    if shutil.which("bash") is None or shutil.which("head") is None:
        pytest.skip("needs bash and head")
    script = f"'{sys.executable}' -m llm2emb train --list-fields | head -1; echo \"status ${{PIPESTATUS[0]}}\""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_llm2emb_env(), timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[1] in ("status 0", "status 141"), proc.stdout  # 0: all fitted in the pipe
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Current (not deprecated) subcommand names of a parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {n: p for n, p in action.choices.items() if n not in getattr(action, "renamed", {})}
    return {}


def test_no_nested_command_reuses_a_top_level_name():
    """One name, one meaning: `prepare` tokenises data, so the built-in models' action is `models download`."""
    top = _subcommands(build_parser())
    clashes = [f"{name} {child}" for name, parser in top.items() for child in _subcommands(parser) if child in top]
    assert not clashes, f"nested commands named like top-level ones: {clashes}"


def test_renamed_commands_still_work_with_one_note(capsys):
    parser = build_parser()
    args = parser.parse_args(["models", "download", "smollm2-135m"])
    assert (args.models_command, args.name) == ("download", "smollm2-135m")
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["models", "prepare", "smollm2-135m"])
    assert (args.models_command, args.name) == ("download", "smollm2-135m")
    assert capsys.readouterr().err.strip() == ("note: 'llm2emb models prepare' is deprecated and will be removed in "
                                               "the next release; use 'llm2emb models download'")
    models_help = _subcommands(parser)["models"].format_help()
    assert "download" in models_help and "prepare" not in models_help


def test_merge_means_model_merging_and_merge_lora_folds_an_adapter(capsys):
    """`llm2emb merge` merges models; folding a LoRA adapter is `--merge-lora` (train and export alike)."""
    parser = build_parser()
    for command in ("train", "export"):
        assert "--merge-lora" in _subcommands(parser)[command]._option_string_actions, command
    assert not [name for name, p in PARSERS if "--merge" in p._option_string_actions]
    args = parser.parse_args(["train", "-c", "cfg.yaml", "--merge"])
    assert args.merge_lora is True
    assert capsys.readouterr().err.strip() == ("note: --merge is deprecated and will be removed in the next release; "
                                               "use --merge-lora")
    assert parser.parse_args(["train", "-c", "cfg.yaml"]).merge_lora is False


# --overwrite, --no-progress and --dry-run wherever they make sense: every command is either listed as having
# the flag or named with the reason it has not (a new command must decide; the test names what is missing)
SHARED_FLAGS: dict[str, set[str]] = {
    "--overwrite": {"prepare", "pairs", "mine", "train", "merge", "encode", "export"},
    "--no-progress": {"prepare", "mine", "synth", "train", "eval", "encode", "demo"},
    "--dry-run": {"train", "study", "pipeline", "encode", "eval", "export", "prepare", "merge", "mine", "pairs",
                  "synth"},
}
WITHOUT_FLAG: dict[tuple[str, str], str] = {
    ("--overwrite", "models list"): "writes nothing",
    ("--overwrite", "models download"): "a model already downloaded and converted is reused as it is",
    ("--overwrite", "synth"): "resumes the same run in --output; a different run is refused, naming the folder "
                              "to delete",
    ("--overwrite", "pipeline"): "resumes: finished stages are reused, changed ones run again",
    ("--overwrite", "study"): "resumes: finished cells are reused, changed ones run again",
    ("--overwrite", "eval"): "one result file per task and model, always replaced atomically",
    ("--overwrite", "compare"): "the report is derived from result files; always replaced atomically",
    ("--overwrite", "demo"): "reuses what it built: the run resumes, evaluations are cached under their settings",
    ("--no-progress", "models list"): "shows no progress bar",
    ("--no-progress", "models download"): "shows no progress bar",
    ("--no-progress", "pairs"): "shows no progress bar",
    ("--no-progress", "merge"): "shows no progress bar",
    ("--no-progress", "compare"): "shows no progress bar",
    ("--no-progress", "export"): "shows no progress bar",
    ("--no-progress", "pipeline"): "stages run without progress bars (one log line each)",
    ("--no-progress", "study"): "cells run without progress bars (one log line each)",
    ("--dry-run", "models list"): "writes nothing",
    ("--dry-run", "models download"): "the download is the whole command",
    ("--dry-run", "compare"): "reads result files and writes one small report",
    ("--dry-run", "demo"): "a fixed offline walk-through; --quick is its short form",
}


def test_overwrite_no_progress_and_dry_run_where_they_make_sense():
    commands = {name.removeprefix("llm2emb "): p for name, p in PARSERS
                if name != "llm2emb" and not _subcommands(p)}   # commands that run (not groups like `models`)
    problems = []
    for flag, having in SHARED_FLAGS.items():
        for command, parser in commands.items():
            has = flag in parser._option_string_actions
            if command in having and not has:
                problems.append(f"{command} must have {flag}")
            if command not in having and (flag, command) not in WITHOUT_FLAG:
                problems.append(f"{command}: add {flag} (SHARED_FLAGS) or say why not (WITHOUT_FLAG)")
            if has and (flag, command) in WITHOUT_FLAG:
                problems.append(f"{command} has {flag}: move it from WITHOUT_FLAG to SHARED_FLAGS")
    assert not problems, problems
    assert all(command in commands for _, command in WITHOUT_FLAG)   # no stale entries


def _options(command: str) -> list[str]:
    return _subcommands(build_parser())[command].option_names()


@pytest.mark.parametrize("typo,command,expected", [
    ("--task", "eval", "--tasks"), ("--outptu", "eval", "--output"), ("--modle", "export", "--model"),
    ("--max-len", "encode", "--max-length"), ("--max_length", "encode", "--max-length"),
    ("--no-normalise", "encode", "--no-normalize"), ("--batch", "encode", "--batch-size"),
    # unrelated names once suggested through the shared leading dashes: now no suggestion
    ("--lr", "train", None), ("--gpu", "eval", None), ("--quiet", "train", None), ("--seed", "train", None),
])
def test_did_you_mean_on_real_typos_of_flags(typo, command, expected):
    from llm2emb.errors import did_you_mean

    assert did_you_mean(typo, _options(command)) == (f" Did you mean {expected!r}?" if expected else "")


@pytest.mark.parametrize("typo,expected", [
    ("trian", "train"), ("evl", "eval"), ("exprot", "export"), ("stduy", "study"), ("fit", None), ("run", None),
    ("learning_rat", "learning_rate"), ("temperatur", "temperature"), ("gradient_checkpoint", "gradient_checkpointing"),
    ("lr", None), ("data", None),
])
def test_did_you_mean_on_real_typos_of_commands_and_fields(typo, expected):
    import dataclasses

    from llm2emb.cli import COMMANDS
    from llm2emb.config import TrainConfig
    from llm2emb.errors import did_you_mean

    choices = [*COMMANDS, *(f.name for f in dataclasses.fields(TrainConfig))]
    assert did_you_mean(typo, choices) == (f" Did you mean {expected!r}?" if expected else "")
