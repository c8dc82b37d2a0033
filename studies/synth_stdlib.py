"""Synthetic vs real training data on the built-in stdlib code-search task (issue 15 measurement).

    .venv/bin/python studies/synth_stdlib.py [--passages 320] [--steps 30] [--out study_runs/synth]
        (every heavy stage takes /tmp/llm2emb-heavy.lock itself), or, holding the lock for the whole study:
    flock /tmp/llm2emb-heavy.lock .venv/bin/python studies/synth_stdlib.py --no-lock

1. smollm2-135m writes one code-search query per standard-library function WITHOUT a docstring, from the
   training packages only (`--corpus builtin:stdlib-undocumented`; the held-out packages are never read), with
   `--spec builtin:stdlib-code`, contamination-checked against the held-out split (builtin:stdlib-heldout).
2. Three data folders, each tokenised with `llm2emb prepare`: (a) real = the built-in training split (docstring
   -> function), (b) synthetic only, (c) both in one folder (manifest weights 1: natural shares); and (b2) the
   same generated text without the round-trip (consistency) filter, to see what that filter is worth; (c2)
   both, with a manifest weight on the synthetic set that gives it as many batches per epoch as the real set.
3. The quickstart recipe (configs/quickstart.json) for the same number of steps on each (`llm2emb train --set`).
4. `llm2emb eval` of the base model and the runs on the held-out split (nDCG@10 etc.), with paired-bootstrap
   95% intervals of per-query nDCG@10 differences (llm2emb.study.stats).
Every stage is reused when done (synth resumes, prepare skips, train resumes / is complete, eval results are
kept), so a killed study continues. Results: studies/results/synth.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/llm2emb-heavy.lock"
MODEL = "smollm2-135m"
MAX_LEN = 160  # quickstart max_seq_length / passage length


USE_LOCK = True


def sh(args: list[str], heavy: bool = True) -> str:
    cmd = (["flock", LOCK] if heavy and USE_LOCK else []) + [sys.executable, "-m", "llm2emb.cli", *args]
    print("$", " ".join(args), flush=True)
    started = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"failed: llm2emb {' '.join(args[:1])} (exit {out.returncode})")
    print(f"  ({time.time() - started:.0f}s)", flush=True)
    return out.stdout


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def planned_steps(tokenized: Path, steps: int) -> dict[str, int]:
    """Which dataset each of the first `steps` steps draws (the quickstart batcher: batch 16, seed 42, no
    validation split), from the batcher's own epoch plan."""
    from collections import Counter

    from llm2emb.data.batching import MultiTaskBatcher

    batcher = MultiTaskBatcher(tokenized, batch_size=16, num_hard_neg=0, seed=42, validation_fraction=0.0)
    counts: Counter[str] = Counter()
    epoch = 0
    while sum(counts.values()) < steps:  # a small dataset runs through several epochs
        batcher.set_epoch(epoch)
        for batch in batcher:
            counts[batch.dataset] += 1
            if sum(counts.values()) == steps:
                break
        epoch += 1
    return dict(counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="generator dtype (bfloat16: AVX512_BF16 on Zen 4)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="study_runs/synth")
    ap.add_argument("--results", default="studies/results/synth.json")
    ap.add_argument("--no-lock", action="store_true", help="the caller already holds the heavy-job lock")
    args = ap.parse_args()
    global USE_LOCK
    USE_LOCK = not args.no_lock
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(ROOT / "src"))
    from llm2emb.data.builtin import build_stdlib_codesearch

    builtin = build_stdlib_codesearch(out / "builtin")
    eval_dir, instruction = builtin["eval_dir"], builtin["query_instruction"]

    # 1. generation + filters (resumable)
    synth_dir = out / "data_b_synthetic"
    sh(["synth", "--corpus", "builtin:stdlib-undocumented", "--spec", "builtin:stdlib-code", "--model", MODEL,
        "--output", str(synth_dir), "--limit", str(args.passages), "--batch-size", str(args.batch_size),
        "--dtype", args.dtype, "--contamination", "builtin:stdlib-heldout", "--no-progress"])
    report = json.loads((synth_dir / "_synth" / "report.json").read_text())

    # the same generated text without the round-trip filter (re-filtering reuses the log: no generation)
    loose_dir = out / "synth_without_consistency"
    if not (loose_dir / "_synth").exists():
        shutil.copytree(synth_dir / "_synth", loose_dir / "_synth")
    sh(["synth", "--corpus", "builtin:stdlib-undocumented", "--spec", "builtin:stdlib-code", "--model", MODEL,
        "--output", str(loose_dir), "--limit", str(args.passages), "--batch-size", str(args.batch_size),
        "--dtype", args.dtype, "--contamination", "builtin:stdlib-heldout", "--filter", "length,dedup,contamination",
        "--no-progress"], heavy=False)
    loose = json.loads((loose_dir / "_synth" / "report.json").read_text())

    # 2. data folders
    real_dir = Path(builtin["train_dir"])
    both_dir = out / "data_c_both"
    both_dir.mkdir(exist_ok=True)
    for src in (real_dir / "stdlib_code.parquet", synth_dir / "stdlib_synth.parquet"):
        if not (both_dir / src.name).exists() or (both_dir / src.name).stat().st_size != src.stat().st_size:
            shutil.copy2(src, both_dir / src.name)
    manifest = {**json.loads((real_dir / "manifest.json").read_text()),
                **json.loads((synth_dir / "manifest.json").read_text())}
    (both_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # (c2): equal batches per epoch through the manifest weight (quickstart batch 16, drop_last)
    weighted_dir = out / "data_c2_both_weighted"
    weighted_dir.mkdir(exist_ok=True)
    for src in (both_dir / "stdlib_code.parquet", both_dir / "stdlib_synth.parquet"):
        if not (weighted_dir / src.name).exists() or (weighted_dir / src.name).stat().st_size != src.stat().st_size:
            shutil.copy2(src, weighted_dir / src.name)
    synth_rows = report["rows"]["kept"]
    weight = round((builtin["train_rows"] // 16) / max(1, synth_rows // 16), 1)
    weighted_manifest = {**manifest, "stdlib_synth": {**manifest["stdlib_synth"], "weight": weight}}
    (weighted_dir / "manifest.json").write_text(json.dumps(weighted_manifest, indent=2) + "\n")
    conditions = {"a_real": real_dir, "b_synthetic": synth_dir, "c_both": both_dir,
                  "b2_synthetic_no_consistency_filter": loose_dir, "c2_both_synthetic_weighted": weighted_dir}

    results: dict[str, dict] = {}
    base_eval = out / "eval" / "base"
    if not list(base_eval.glob("*.json")):
        sh(["eval", "--model", MODEL, "--pooling", "mean", "--skip-instruction", "--tasks", eval_dir,
            "--query-instruction", instruction, "--max-length", str(MAX_LEN), "--output", str(base_eval),
            "--name", "base", "--no-progress", "--no-cache"])
    records = {"base": json.loads(next(base_eval.glob("*.json")).read_text())}
    results["base"] = records["base"]["metrics"]

    runs: dict[str, dict] = {}
    for name, data in conditions.items():
        tokenized = out / f"tok_{name}"
        sh(["prepare", "--model", MODEL, "--input", str(data), "--output", str(tokenized),
            "--max-seq-length", str(MAX_LEN), "--no-progress"])
        stats = json.loads((tokenized / "data_stats.json").read_text())
        experiment = f"synth-{name}-{args.steps}steps"
        sh(["train", "--config", "configs/quickstart.json", "--no-progress", "--set",
            f"model_path={MODEL}", f"train_data_path={tokenized}", f"output_dir={out / 'runs'}",
            f"tb_dir={out / 'tb'}", f"experiment_id={experiment}", f"train_steps={args.steps}",
            f"checkpointing_steps={min(10, args.steps)}"])
        run_dir = out / "runs" / experiment
        summary = json.loads((run_dir / "train_summary.json").read_text())
        eval_out = out / "eval" / name
        if not list(eval_out.glob("*.json")):
            sh(["eval", "--model", str(run_dir), "--tasks", eval_dir, "--query-instruction", instruction,
                "--max-length", str(MAX_LEN), "--output", str(eval_out), "--name", name, "--no-progress",
                "--no-cache"])
        records[name] = json.loads(next(eval_out.glob("*.json")).read_text())
        results[name] = records[name]["metrics"]
        runs[name] = {"rows": {d: s["rows"] for d, s in stats.items()}, "train_seconds": summary.get("train_seconds"),
                      "steps": args.steps, "steps_per_dataset": planned_steps(tokenized, args.steps)}

    from llm2emb.study.stats import align, bootstrap_mean_difference

    comparisons = {}
    for a, b in (("b_synthetic", "a_real"), ("c_both", "a_real"), ("c2_both_synthetic_weighted", "a_real"),
                 ("b_synthetic", "b2_synthetic_no_consistency_filter"), ("a_real", "base")):
        _, va, vb = align(records[a]["per_item"]["ndcg_at_10"], records[b]["per_item"]["ndcg_at_10"])
        r = bootstrap_mean_difference(va, vb, n_resamples=2000, seed=0)
        comparisons[f"{a} - {b}"] = {"diff": round(r.diff, 4), "ci95": [round(r.low, 4), round(r.high, 4)],
                                     "significant": r.significant, "queries": r.n}
    keys = ("ndcg_at_10", "mrr_at_10", "recall_at_10")
    table = ["| condition | training rows | nDCG@10 | MRR@10 | Recall@10 |", "|---|---|---|---|---|"]
    for name in ("base", *conditions):
        rows = "-" if name == "base" else " + ".join(f"{n} {r}" for n, r in runs[name]["rows"].items())
        table.append(f"| {name} | {rows} | " + " | ".join(f"{results[name].get(k, float('nan')):.4f}" for k in keys) + " |")
    gen = report["generation"]
    payload = {
        "what": "synthetic (smollm2-135m queries for undocumented stdlib functions) vs real (docstring) training "
                "data, quickstart recipe, held-out stdlib packages",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "note": "2 cores, one heavy job at a time (a lock); train seconds include some load from light jobs"},
        "generation": {"model": MODEL, "dtype": args.dtype, "batch_size": args.batch_size,
                       "passages": gen["passages"], "parsed": gen["parsed"], "parse_rate": gen["parse_rate"],
                       "first_attempt_parsed": gen["first_attempt_parsed"],
                       "generator_calls_per_passage": gen["generator_calls_per_passage"],
                       "failure_reasons": gen["failure_reasons"], "seconds": gen["seconds"],
                       "passages_per_minute": gen["passages_per_minute"],
                       "queries_per_minute": gen["queries_per_minute"]},
        "filters": report["filters"],
        "rows_kept": report["rows"],
        "without_consistency_filter": {"filters": loose["filters"], "rows_kept": loose["rows"]},
        "training": {"recipe": "configs/quickstart.json", "steps": args.steps,
                     "c2_synthetic_weight": weight,
                     "note": f"{args.steps} steps for every condition" + (
                         "" if args.steps == 80 else " instead of the recipe's 80 (CPU time)"),
                     "runs": runs},
        "eval": {"task": eval_dir, "queries": builtin["eval_queries"], "max_length": MAX_LEN,
                 "metrics": {k: {m: results[k].get(m) for m in keys} for k in results},
                 "paired_bootstrap_ndcg_at_10": comparisons},
        "table": "\n".join(table),
    }
    path = ROOT / args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(table))
    for k, v in comparisons.items():
        print(f"{k}: nDCG@10 {v['diff']:+.4f} (95% CI {v['ci95'][0]:+.4f} .. {v['ci95'][1]:+.4f})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
