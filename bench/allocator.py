"""Allocator churn: page faults, kernel time and peak RSS of the demo's training recipe (SmolLM2-135M, LoRA,
batch 16, max length 160) with glibc's default malloc behaviour vs llm2emb's start-up settings
(`llm2emb/allocator.py`: fixed 32 MiB mmap threshold, no heap trimming).

Each side is one `llm2emb train` process (LLM2EMB_MALLOC=system turns the settings off); rusage of the child
gives user / system CPU seconds, minor page faults and peak RSS. Two step counts per side separate the
one-time cost (model load, first touch of the steady-state buffers) from the per-step churn.

    python bench/allocator.py                 # 2 and 5 steps per side, fp32: ~6 min on 2 cores
    python bench/allocator.py --precision bf16 --steps 2 6
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "allocator"


def run_side(config: Path, malloc: str) -> dict[str, float]:
    env = {**os.environ, "LLM2EMB_MALLOC": malloc, "TOKENIZERS_PARALLELISM": "false"}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        env.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llm2emb.cli", "train", "--config", str(config), "--overwrite",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training failed ({malloc}): {proc.stderr.read()[-2000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 5], metavar=("FEW", "MORE"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from llm2emb.commands.demo import DEMO_RECIPE, build_data, prepare_data

    work = Path(tempfile.mkdtemp(prefix="llm2emb-bench-alloc-"))
    info = build_data(work)
    data = prepare_data(args.model, Path(info["train_dir"]), work, DEMO_RECIPE["max_seq_length"])
    runs: dict[str, dict[int, dict[str, float]]] = {"system": {}, "llm2emb": {}}
    for steps in args.steps:
        for malloc in runs:  # alternate the sides so a load change hits both
            config = work / f"config-{steps}.json"
            config.write_text(json.dumps({**DEMO_RECIPE, "model_path": args.model, "train_data_path": str(data),
                                          "output_dir": str(work / "runs"), "tb_dir": str(work / "tb"),
                                          "experiment_id": f"{malloc}-{steps}", "train_steps": steps,
                                          "checkpointing_steps": 0, "precision": args.precision}))
            runs[malloc][steps] = run_side(config, malloc)
            print(f"{malloc:8s} {steps} steps: {runs[malloc][steps]}", flush=True)
    few, more = args.steps
    per_step = {side: {k: (r[more][k] - r[few][k]) / (more - few) for k in r[more]} for side, r in runs.items()}
    ours, theirs = runs["llm2emb"][more], runs["system"][more]
    records = [
        C.meta_record(script=SCRIPT, model=args.model, precision=args.precision, recipe="demo (LoRA r16, batch 16, "
                      "max length 160, no hard negatives)", steps=args.steps, runs=runs, per_step=per_step,
                      columns="llm2emb = llm2emb's malloc settings; sentence-transformers column = glibc defaults "
                      "(LLM2EMB_MALLOC=system), same trainer"),
        C.record(f"minor page faults per step (steps {few}->{more})", "faults", per_step["llm2emb"]["minor_faults"],
                 per_step["system"]["minor_faults"], higher_is_better=False, digits=0),
        C.record(f"system CPU per step (steps {few}->{more})", "s", per_step["llm2emb"]["system_s"],
                 per_step["system"]["system_s"], higher_is_better=False, digits=2),
        C.record(f"user CPU per step (steps {few}->{more})", "s", per_step["llm2emb"]["user_s"],
                 per_step["system"]["user_s"], higher_is_better=False, digits=2),
        C.record(f"minor page faults, {more} steps in all", "faults", ours["minor_faults"], theirs["minor_faults"],
                 higher_is_better=False, digits=0),
        C.record(f"system share of CPU time, {more} steps", "fraction", ours["system_s"] / (ours["system_s"] +
                 ours["user_s"]), theirs["system_s"] / (theirs["system_s"] + theirs["user_s"]),
                 higher_is_better=False),
        C.record(f"wall time, {more} steps (model load included)", "s", ours["wall_s"], theirs["wall_s"],
                 higher_is_better=False, digits=1),
        C.record(f"peak RSS, {more} steps", "MiB", ours["peak_rss_mib"], theirs["peak_rss_mib"],
                 higher_is_better=False, digits=0),
    ]
    path = C.save_results(SCRIPT, records, args.output)
    print(C.markdown_table(records, ours_label="llm2emb malloc", theirs_label="glibc default"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
