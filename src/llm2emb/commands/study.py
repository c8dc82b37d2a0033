"""`llm2emb study STUDY.yaml [--output DIR] [--only RECIPE,...] [--dry-run]`: compare training recipes over
seeds on the same data and tasks, with mean +- std and paired-bootstrap confidence intervals.

Every (recipe, seed) cell trains and is evaluated; finished cells are skipped on a re-run, a killed study
resumes (inside a cell too), a cell whose config changed is trained again, a failing cell is reported while
the others run. See `llm2emb.study.spec` for the file format and studies/ for shipped studies.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llm2emb.commands import add_set_argument
from llm2emb.commands._args import add_dry_run_argument, add_list_fields_argument, print_field_sections


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="compare training recipes over seeds (effectiveness and stability)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", help="study file (YAML or JSON), e.g. studies/seed_configs.yaml")
    p.add_argument("--output", "-o", default=None,
                   help="output folder (default: study_runs/<study name>)")
    p.add_argument("--only", default=None, metavar="RECIPE[,RECIPE]", help="run only these recipes")
    add_dry_run_argument(p, "the study file, every recipe's config, model references and data",
                         prints="the cells with their estimated cost and the command each runs as under the launcher")
    p.add_argument("--detach", action="store_true",
                   help="with a scheduler's launcher (slurm): submit the missing cells and return; run the study "
                        "again to collect them")
    p.add_argument("--status", action="store_true",
                   help="show each cell: done, pending, running, failed (with its log), interrupted, not started")
    p.add_argument("--launcher", default=None, metavar="KIND",
                   help="how cells run: local (default), accelerate, slurm, ray; replaces the study file's "
                        "launcher.kind (its other launcher fields stay in the file)")
    add_set_argument(p, help="override config fields of every recipe, e.g. --set train_steps=10 (applied as part "
                             "of the study's budget)")
    add_list_fields_argument(p, "a study file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.config import parse_overrides
    from llm2emb.study.runner import StudyRunner
    from llm2emb.study.spec import load_study

    if args.list_fields:
        from llm2emb.study.spec import field_sections

        print_field_sections(field_sections())
        return 0
    if not args.study:
        from llm2emb.errors import UserError

        raise UserError("llm2emb study needs a study file, e.g. llm2emb study studies/seed_configs.yaml.")
    study = load_study(args.study, extra_budget=parse_overrides(args.overrides),
                       launcher_kind=args.launcher)
    output = Path(args.output) if args.output else Path("study_runs") / study.name
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    runner = StudyRunner(study, output, only)
    if args.dry_run:
        return dry_run(runner)
    if args.status:
        return show_status(runner)
    result = runner.run(detach=args.detach)
    if args.detach:
        return 0
    done = sum(1 for c in result["cells"] if c.get("status") == "done")
    print(f"{done}/{len(result['cells'])} cells done; report: {output / 'report.md'}")
    return 0 if done == len(result["cells"]) else 1


def show_status(runner) -> int:
    """One line per cell: its state and where to look."""
    runner.check_output()
    rows = runner.status()
    print(f"study {runner.study.name} in {runner.output} ({runner.launcher.kind} launcher):")
    for name, state, detail in rows:
        print(f"  {name:<40} {state:<12} {detail}")
    counts = {state: sum(1 for _, s, _ in rows if s == state) for state in dict.fromkeys(s for _, s, _ in rows)}
    print(", ".join(f"{n} {state}" for state, n in counts.items()))
    return 0


def dry_run(runner) -> int:
    """Every cell with its status, estimated cost and command under the launcher; the study's wall time."""
    from llm2emb.study.estimate import training_seconds, wall_seconds
    from llm2emb.study.runner import check_data_tokenizers

    runner.check_output()
    cells = runner.cells(prepare=False)
    check_data_tokenizers(runner, cells)
    launcher = runner.launcher
    slots = launcher.slots(check=False)    # the study may be meant for another machine: devices not compared
    measured = runner.measured_step_seconds()
    unknown = 0
    to_run: list[float] = []
    print(f"study {runner.study.name}: {len(cells)} cell(s), baseline {runner.study.baseline}, "
          f"tasks: {', '.join(t.spec for t in runner.study.eval.tasks)}")
    print(f"launcher: {launcher.kind}, {launcher.processes} process(es) per cell, {launcher.max_parallel} cell(s) "
          "at a time")
    print(f"{'cell':<40} {'steps':>6} {'batch':>6} {'status':<8} {'est. train':>11} {'device-h':>9}")
    commands = []
    for cell in cells:
        status = "done" if runner.finished(cell) else "to run"
        seconds = None if status == "done" else training_seconds(cell.config, measured.get(cell.recipe))
        if status != "done":
            if seconds is None:
                unknown += 1
            else:
                to_run.append(seconds)
            commands.append(cell)
        est = "" if status == "done" else ("?" if seconds is None else f"{seconds / 60:.1f} min")
        hours = "" if seconds is None else f"{seconds / 3600:.2f}"
        print(f"{cell.name:<40} {cell.config['train_steps']:>6} {cell.config['train_batch_size']:>6} "
              f"{status:<8} {est:>11} {hours:>9}")
    note = f" (+{unknown} cell(s) not estimable)" if unknown else ""
    wall = wall_seconds(to_run, launcher.processes, launcher.max_parallel)
    print(f"estimated training time: {sum(to_run) / 60:.0f} min = {sum(to_run) / 3600:.2f} device-hours{note}; "
          f"wall time under {launcher.kind} ({launcher.max_parallel} cell(s) at a time x {launcher.processes} "
          f"process(es), ideal scaling): {wall / 3600:.2f} h; evaluation not included; estimates from finished "
          "cells where there are any, else FLOPs / this machine's matmul rate (rough).")
    for line in launcher.dry_run_lines([runner.job(cell, write=False) for cell in commands], slots):
        print(line)
    return 0
