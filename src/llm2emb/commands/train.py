"""`llm2emb train --config CFG [--set key=value ...]`: train (or resume) an embedding model.

The same code runs as `run.py` for the seed's launch line:
    accelerate launch --config_file configs/accelerate_config.yaml run.py --config configs/config.f2llm.json
Several processes: launch through accelerate (or torchrun); `llm2emb train` itself is one process.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from llm2emb.commands import add_set_argument
from llm2emb.commands._args import add_dry_run_argument, deprecated_alias
from llm2emb.errors import UserError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="JSON or YAML config (seed field names; see configs/)")
    add_set_argument(p)
    p.add_argument("--merge-lora", action="store_true",
                   help="with LoRA, also save final_merged/ (adapter folded into the weights; as export --merge-lora)")
    deprecated_alias(p, "--merge", "--merge-lora")  # "merge" alone means model merging (llm2emb merge)
    p.add_argument("--overwrite", action="store_true",
                   help="delete output_dir/experiment_id (and its TensorBoard events) and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    add_dry_run_argument(p, "the config, the model reference and the data",
                         prints="what training would do (start, resume, already complete, start over)")
    p.add_argument("--list-fields", action="store_true", help="print every config field with its default and exit")
    p.add_argument("--list-losses", action="store_true",
                   help="print every registered loss (for the `losses` field) with its options and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an embedding model from a config (resumes automatically)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def _print_fields() -> None:
    from llm2emb.config import field_docs

    group = None
    for row in field_docs():
        if row["group"] != group:
            group = row["group"]
            print(f"\n[{group}]")
        print(f"  {row['name']:<24} {row['default']:<22} {row['help']}")


def run(args: argparse.Namespace) -> int:
    import json

    from llm2emb.config import load_train_config

    if args.list_fields:
        _print_fields()
        return 0
    if args.list_losses:
        from llm2emb.losses import loss_docs

        for row in loss_docs():
            print(f"{row['name']}: {row['doc']}\n    options: {row['options']}")
        return 0
    if not args.config and not args.overrides:
        raise UserError("llm2emb train needs --config FILE (see configs/config.f2llm.json) or --set key=value fields.")
    cfg = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    from llm2emb.data.tokenize import read_prepared
    from llm2emb.train.trainer import train

    from llm2emb.model.loading import check_model_reference

    # the files are checked before the model is loaded: model and teacher references, the data folder's JSON files
    for name in ("model_path", "teacher_model"):
        if getattr(cfg, name):
            check_model_reference(getattr(cfg, name), f"field {name!r}")
    read_prepared(cfg.train_data_path)
    if args.dry_run:
        print(_plan(cfg, args.overwrite))
        return 0
    # The trainer clears the run folder (main process) once all processes can wait for it to be gone.
    result = train(cfg, show_progress=not args.no_progress, merge=args.merge_lora, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        if result.already_complete:
            print(f"{cfg.run_dir} is already complete (final model in {result.final_dir}); "
                  "use --overwrite or another experiment_id to train again.")
        else:
            print(f"trained {result.steps} steps in {result.train_seconds:.0f}s "
                  f"({result.samples_per_second:.1f} samples/s); final model: {result.final_dir}")
    return 0


def _plan(cfg, overwrite: bool) -> str:
    """What `llm2emb train` would do with this run folder (the trainer's own resume rule), in one line."""
    from llm2emb.layout import FINAL_DIR, SUMMARY_FILE, latest_checkpoint

    run_dir = cfg.run_dir
    steps = f"{cfg.train_steps} steps" if cfg.train_steps > 0 else f"{cfg.train_epochs} epoch(s)"
    if run_dir.exists() and overwrite:
        return f"dry run: would delete {run_dir} (--overwrite) and train {steps} from the start; nothing written"
    if (run_dir / SUMMARY_FILE).exists() and (run_dir / FINAL_DIR).is_dir():
        return f"dry run: {run_dir} is already complete; nothing would train (--overwrite to start over)"
    latest = latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is not None:
        return f"dry run: would resume {run_dir} from {latest.name} ({steps} in all); nothing written"
    return f"dry run: would train {steps} into {run_dir}; nothing written"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of run.py: same arguments and error handling as `llm2emb train`."""
    from llm2emb.commands._args import Parser

    parser = Parser(prog="run.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UserError as exc:
        if args.verbose or os.environ.get("LLM2EMB_DEBUG"):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2
