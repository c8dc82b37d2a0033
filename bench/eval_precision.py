"""`llm2emb eval` before / after evaluation precision defaulted to auto: the same saved model (an Embedder folder,
which saves `precision: fp32` as every trained run does) evaluated with `--precision fp32` (what `eval` did by
default before) and with no flag (auto: bf16 on CPUs with AVX512_BF16 / AMX), embedding cache off.

    python bench/eval_precision.py [--model smollm2-135m] [--tasks builtin:stdlib] [--limits 200]

Writes bench/results/eval_precision.json: seconds per side, the speed-up (fp32 seconds / auto seconds) and each
main score, so the metric difference bf16 makes is in the same record. One run per side (A then B): compare the
ratio, not absolute seconds across days.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table, meta_record, record, save_results


def _eval(model_dir: Path, tasks: str, limits: int | None, max_length: int, out: Path, extra: list[str]) -> tuple[
        float, dict[str, float], str]:
    cmd = [sys.executable, "-m", "llm2emb.cli", "eval", "--model", str(model_dir), "--tasks", tasks, "--no-cache",
           "--no-progress", "--max-length", str(max_length), "--output", str(out), *extra]
    if limits:
        cmd += ["--limits", str(limits)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    scores, precision = {}, ""
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        scores[result["task"]["name"]] = result["metrics"][result["main_score"]]
        precision = result["model"].get("precision", "")
    return seconds, scores, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--tasks", default="builtin:stdlib")
    parser.add_argument("--limits", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from llm2emb import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        Embedder.from_pretrained(args.model, pooling=args.pooling).save(folder)
        before = _eval(folder, args.tasks, args.limits, args.max_length, Path(tmp) / "fp32", ["--precision", "fp32"])
        after = _eval(folder, args.tasks, args.limits, args.max_length, Path(tmp) / "auto", [])
    records = [record("eval seconds (auto default vs fp32 before)", "s", after[0], before[0],
                      higher_is_better=False, digits=1)]
    for task in before[1]:
        records.append(record(f"{task} main score (auto vs fp32)", "score", after[1][task], before[1][task]))
    records.append(meta_record(model=args.model, pooling=args.pooling, tasks=args.tasks, limits=args.limits,
                               max_length=args.max_length, auto_resolved_to=after[2], before_precision=before[2]))
    path = save_results("eval_precision", records, args.output)
    print(markdown_table(records, ours_label=f"auto ({after[2]})", theirs_label="fp32 (old default)"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
