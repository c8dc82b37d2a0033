"""Training throughput: llm2emb's trainer vs `SentenceTransformerTrainer` + MultipleNegativesRankingLoss,
same model, rows, batch (16), hard negatives (1), max length (256), LoRA (r=8 on q,k,v,o) or full
fine-tuning, precision, threads and identical token ids (checked before timing).

Each (variant, dataset, library) is one training run in its own process, alternately (A B B A ...), timed
over N optimizer steps after W warm-up steps. Per dataset, because a step's cost depends on which dataset
it draws (SciFact triples at ~256 tokens vs short STS-B pairs); the "proportional mix" row combines them as
a multi-dataset epoch does (each dataset weighted by its number of batches). Reports samples/s, real
(non-pad) tokens/s, padding fraction, peak memory, model FLOP/s and MFU. See bench/_training.py for how
both sides are set up.

    python bench/train_throughput.py                            # LoRA, 2 rounds, ~10 min on 2 CPU cores
    python bench/train_throughput.py --variants lora full --rounds 3
    python bench/train_throughput.py --model qwen2.5-coder-0.5b --dtype bfloat16 --device cuda --threads 0 \\
        --steps 10 --warmup 3 --peak-tflops 989             # GPU: bf16 autocast on both sides
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by linecache / inspect): keep
# the bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402
import _training as T  # noqa: E402

SCRIPT = "train_throughput"
SCRIPT_PATH = Path(__file__).resolve()
DATASETS = ("scifact_en", "stsb_pairs_en")
DEFAULT_STEPS = {"scifact_en": 3, "stsb_pairs_en": 12}  # timed steps: about the same seconds per dataset


def settings_from(args: argparse.Namespace, model_dir: str, variant: str, steps: int) -> T.TrainSettings:
    return T.TrainSettings(model_dir=model_dir, variant=variant, batch_size=args.batch_size,
                           num_hard_neg=args.num_hard_neg, max_length=args.max_length, pooling=args.pooling,
                           lora_r=args.lora_r, learning_rate=args.learning_rate if variant == "lora"
                           else args.learning_rate / 10, warmup_steps=0, steps=steps, dtype=args.dtype,
                           device=args.device, threads=args.threads, seed=args.seed,
                           gradient_checkpointing=args.gradient_checkpointing, ootb=args.ootb)


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    settings = settings_from(args, model_dir, args.variant, args.warmup + args.worker_steps)
    raw = Path(args.train_dir) / f"{args.dataset}.parquet"
    with tempfile.TemporaryDirectory(prefix="llm2emb-bench-train-") as tmp:
        if args.worker == "ours":
            log, _ = T.train_ours(settings, Path(args.data_dir), Path(tmp))
        else:
            log, _ = T.train_theirs(settings, [raw], Path(tmp))
    result = log.window(args.warmup)
    result.update(peak_rss_mib=C.peak_rss_mib(), gpu_peak_mib=C.gpu_peak_mib(args.device))
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def summarise(runs: list[dict], flop_model: C.FlopModel, full: bool) -> dict[str, float]:
    """Median over rounds of each rate; memory is the max."""
    def med(key_fn):
        return C.median([key_fn(r) for r in runs])
    return {
        "samples_per_s": med(lambda r: r["samples"] / r["seconds"]),
        "seconds_per_step": med(lambda r: r["seconds"] / r["steps"]),
        "tokens_per_s": med(lambda r: r["real_tokens"] / r["seconds"]),
        "padding": med(lambda r: 1 - r["real_tokens"] / r["padded_tokens"]),
        "gflops": med(lambda r: flop_model.train_flops(r["lengths"], full) / r["seconds"] / 1e9),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "gpu_peak_mib": max((r["gpu_peak_mib"] or 0) for r in runs) or None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, HF folder or hub id")
    parser.add_argument("--random-init", action="store_true",
                        help="--model is a folder with config + tokenizer only: use random weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="bfloat16/float16: mixed precision (fp32 weights, autocast) on both sides")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process; 0 = torch default")
    parser.add_argument("--train-dir", default=str(C.SHARED_DATA / "train"), help="F2LLM raw parquet folder")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=["lora"], choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per run (default per dataset: {DEFAULT_STEPS}, else 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (each side runs once per round)")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run, wait until the 1-minute load average is below this")
    parser.add_argument("--min-free-gib", type=float, default=None,
                        help="before each run, wait until this much memory is available (a batch-16 SciFact "
                             "LoRA step at length 256 needs ~14-17 GiB on CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-hard-neg", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pooling", default="mean", choices=["mean", "eos", "weighted_mean"])
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="LoRA lr (full fine-tuning: / 10)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="on both sides (less memory, ~30%% more compute, not counted in model FLOPs)")
    parser.add_argument("--ootb", action="store_true",
                        help="out of the box: each library's defaults for what is not chosen here (ours: precision "
                             "auto; theirs: SentenceTransformer(model) as it loads, fp32); token ids may differ")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU (default: bench/results/hardware_limit.json on CPU)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/train_throughput.json)")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    train_dir = Path(args.train_dir)
    raw_files = {d: train_dir / f"{d}.parquet" for d in args.datasets}
    missing = [str(p) for p in raw_files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"training data not found: {', '.join(missing)}; pass --train-dir "
                         "(the shared data lives at ../shared/data/train)")
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    steps = {d: args.steps or DEFAULT_STEPS.get(d, 3) for d in args.datasets}
    print(f"{SCRIPT}: {args.model} {args.dtype} on {args.device}, variants {args.variants}, datasets {steps} "
          f"timed steps after {args.warmup} warm-up, batch {args.batch_size}, {args.num_hard_neg} hard negative, "
          f"max length {args.max_length}, threads {args.threads}, load {C.load_average()}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="llm2emb-bench-train-"))
    try:
        prepared = {d: T.prepare_data(model_dir, [f], work / f"prepared-{d}", args.max_length)
                    for d, f in raw_files.items()}
        # Identical tokens: every text the sentence-transformers side will see, tokenised by it, equals
        # llm2emb prepare's ids.
        if args.ootb:
            print("  out of the box: each side tokenises as it does by default (padding and tokens/s below)",
                  flush=True)
        else:
            st_model = T.build_st_for_training(settings_from(args, model_dir, "full", 1))
            checked = sum(T.check_st_tokens(st_model, prepared[d], [f], args.num_hard_neg, args.seed,
                                            args.max_length) for d, f in raw_files.items())
            del st_model
            print(f"  identical token ids on both sides for all {checked} training texts", flush=True)

        common = ["--model", args.model, "--dtype", args.dtype, "--device", args.device,
                  "--threads", str(args.threads), "--train-dir", str(train_dir), "--warmup", str(args.warmup),
                  "--batch-size", str(args.batch_size), "--num-hard-neg", str(args.num_hard_neg),
                  "--max-length", str(args.max_length), "--pooling", args.pooling, "--lora-r", str(args.lora_r),
                  "--learning-rate", str(args.learning_rate), "--seed", str(args.seed)]
        common += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        common += ["--random-init"] if args.random_init else []
        common += ["--ootb"] if args.ootb else []

        def side(name: str, variant: str, dataset: str):
            extra = ["--worker", name, "--variant", variant, "--dataset", dataset,
                     "--data-dir", str(prepared[dataset]), "--worker-steps", str(steps[dataset])]
            return lambda r: C.run_worker(SCRIPT_PATH, common + extra)

        load_before = C.load_average()
        results: dict[tuple[str, str], dict[str, list[dict]]] = {}
        for variant in args.variants:
            for dataset in args.datasets:
                print(f"{variant} / {dataset}:", flush=True)
                results[(variant, dataset)] = C.alternate(
                    {"ours": side("ours", variant, dataset), "theirs": side("theirs", variant, dataset)},
                    args.rounds, quiet_load=args.quiet_load, min_free_gib=args.min_free_gib)
        load_after = C.load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    backbone = C.meta_backbone(model_dir)
    # Out of the box each side computes in its own default precision; MFU is against that precision's peak.
    dtypes = {"ours": C.auto_dtype(args.device) if args.ootb else args.dtype,
              "theirs": "float32" if args.ootb else args.dtype}
    peaks = {side: C.peak_flops(args.device, dtype, args.peak_tflops) for side, dtype in dtypes.items()}
    records, detail = [], {}
    batches = {d: T.num_batches(raw_files[d], args.batch_size) for d in args.datasets}
    for variant in args.variants:
        full = variant == "full"
        lora_params = 0 if full else T.lora_param_count(model_dir, settings_from(args, model_dir, variant, 1))
        fm = C.flop_model(backbone)
        fm = C.FlopModel(fm.matmul_params, fm.layers, fm.hidden, lora_params)
        mix_time = {"ours": 0.0, "theirs": 0.0}
        for dataset in args.datasets:
            runs = results[(variant, dataset)]
            s = {k: summarise(v, fm, full) for k, v in runs.items()}
            detail[f"{variant}/{dataset}"] = {k: {"seconds_per_step": [round(r["seconds"] / r["steps"], 3)
                                                                       for r in v],
                                                  "peak_rss_mib": [round(r["peak_rss_mib"]) for r in v],
                                                  "load_average": [r.get("load_average") for r in v]}
                                              for k, v in runs.items()}
            label = f"{variant} {dataset}" + (" (out of the box)" if args.ootb else "")
            records += [
                C.record(f"{label}: samples/s", "samples/s", s["ours"]["samples_per_s"], s["theirs"]["samples_per_s"]),
                C.record(f"{label}: real tokens/s", "tokens/s", s["ours"]["tokens_per_s"], s["theirs"]["tokens_per_s"]),
                C.record(f"{label}: padding fraction", "fraction", s["ours"]["padding"], s["theirs"]["padding"],
                         higher_is_better=False),
                C.record(f"{label}: peak RSS", "MiB", s["ours"]["peak_rss_mib"], s["theirs"]["peak_rss_mib"],
                         higher_is_better=False, digits=0),
            ]
            if s["ours"]["gpu_peak_mib"]:
                records.append(C.record(f"{label}: peak GPU memory", "MiB", s["ours"]["gpu_peak_mib"],
                                        s["theirs"]["gpu_peak_mib"], higher_is_better=False, digits=0))
            records.append(C.record(f"{label}: model FLOP/s", "GFLOP/s", s["ours"]["gflops"], s["theirs"]["gflops"]))
            if any(peak for peak, _ in peaks.values()):
                mfu = {k: s[k]["gflops"] * 1e9 / peak if peak else None for k, (peak, _) in peaks.items()}
                records.append(C.record(f"{label}: MFU", "fraction of peak", mfu["ours"], mfu["theirs"]))
            for k in mix_time:
                mix_time[k] += batches[dataset] * s[k]["seconds_per_step"]
        if len(args.datasets) > 1:
            samples = sum(batches.values()) * args.batch_size
            records.append(C.record(f"{variant}{' (out of the box)' if args.ootb else ''} proportional mix of {' + '.join(args.datasets)}: samples/s",
                                    "samples/s", samples / mix_time["ours"], samples / mix_time["theirs"]))
    records.append(C.meta_record(
        script=SCRIPT, model=args.model, random_init=args.random_init, dtype=args.dtype, device=args.device,
        threads=args.threads, datasets=args.datasets, batches_per_epoch=batches, variants=args.variants,
        timed_steps=steps, warmup_steps=args.warmup, rounds=args.rounds, quiet_load=args.quiet_load,
        batch_size=args.batch_size,
        num_hard_neg=args.num_hard_neg, max_length=args.max_length, pooling=args.pooling, lora_r=args.lora_r,
        lora_targets=list(T.LORA_TARGETS), gradient_checkpointing=args.gradient_checkpointing,
        min_free_gib=args.min_free_gib, side_dtypes=dtypes,
        peak_gflops={k: peak and round(peak / 1e9, 1) for k, (peak, _) in peaks.items()},
        peak_source={k: source for k, (_, source) in peaks.items()}, load_average_before=load_before, load_average_after=load_after,
        identical_tokens=not args.ootb, out_of_the_box=args.ootb, runs=detail,
        note="rates are medians over rounds; peak RSS is the worker process's lifetime peak (incl. loading)"))
    path = C.save_results(SCRIPT, records, args.output or (str(C.RESULTS_DIR / f"{SCRIPT}_ootb.json")
                                                           if args.ootb else None))
    print()
    print(C.markdown_table(records))
    print(f"\nload average before {load_before}, after {load_after}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
