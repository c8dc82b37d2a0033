"""Training memory and speed across batch sizes: llm2emb's trainer (padded sdpa, padding-free `varlen`,
gradient cache, both) vs sentence-transformers' MultipleNegativesRankingLoss and CachedMNRL, LoRA on
scifact_en (1 hard negative), same model, tokens, optimiser and precision (bench/_training.py).

Per (setting, batch size): samples/s, real tokens/s, padding fraction, model FLOP/s (MFU with --peak-tflops),
and peak memory — GPU memory allocated on CUDA (one process for all settings, peak reset between them, an
out-of-memory run recorded as such), peak RSS of a fresh process per run on the CPU.

    python bench/train_memory.py --batch-sizes 16 --steps 2 --warmup 1      # CPU: ~25 min on 2 cores
    python bench/train_memory.py --model .cache/gpu-bench/qwen2.5-coder-0.5b --random-init --device cuda \\
        --dtype bfloat16 --threads 0 --batch-sizes 16 64 256 --peak-tflops 989         # GPU (gpu_bench.sh)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402
import _training as T  # noqa: E402

SCRIPT = "train_memory"
SCRIPT_PATH = Path(__file__).resolve()
# name -> (side, attn_implementation, gradient cache on)
SETTINGS = {
    "ours": ("ours", "sdpa", False),
    "ours_varlen": ("ours", "varlen", False),
    "ours_eager": ("ours", "eager", False),   # transformers' eager attention: bf16 matmuls on CPU, O(L^2) memory
    "ours_cache": ("ours", "sdpa", True),
    "ours_cache_varlen": ("ours", "varlen", True),
    "ours_cache_eager": ("ours", "eager", True),
    "st_mnrl": ("theirs", "sdpa", False),
    "st_cached_mnrl": ("theirs", "sdpa", True),
}


def settings_for(args, model_dir: str, name: str, batch: int) -> T.TrainSettings:
    _, attn, cached = SETTINGS[name]
    chunk = args.chunk  # texts per cached forward on both sides (ST's mini_batch_size, llm2emb's chunk size)
    return T.TrainSettings(model_dir=model_dir, batch_size=batch, num_hard_neg=args.num_hard_neg,
                           max_length=args.max_length, lora_r=args.lora_r, steps=args.warmup + args.steps,
                           dtype=args.dtype, device=args.device, threads=args.threads,
                           grad_cache=chunk if cached else 0, attn_implementation=attn)


def _pairs() -> list[tuple[str, str]]:
    """Each llm2emb setting with the sentence-transformers setting of the same cache choice."""
    theirs = {cached: name for name, (side, _, cached) in SETTINGS.items() if side == "theirs"}
    return [(name, theirs[cached]) for name, (side, _, cached) in SETTINGS.items() if side == "ours"]


def run_one(args, model_dir: str, name: str, batch: int, data_dir: Path, raw: Path) -> dict:
    """One training run in this process; peak GPU memory reset first. An OOM is a result, not a failure."""
    import torch

    settings = settings_for(args, model_dir, name, batch)
    if args.device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory(prefix="llm2emb-bench-mem-") as tmp:
            if SETTINGS[name][0] == "ours":
                log, _ = T.train_ours(settings, data_dir, Path(tmp))
            else:
                log, _ = T.train_theirs(settings, [raw], Path(tmp))
        result = {**log.window(args.warmup), "status": "ok"}
    except torch.cuda.OutOfMemoryError:
        result = {"status": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - one failing setting must not end the other runs
        if "out of memory" in str(exc).lower():
            result = {"status": "out of memory"}
        else:
            import traceback

            traceback.print_exc()
            result = {"status": f"failed: {type(exc).__name__}: {exc}"[:300]}
    result.update(setting=name, batch=batch, peak_rss_mib=C.peak_rss_mib(), gpu_peak_mib=C.gpu_peak_mib(args.device))
    return result


def _ok(run: dict | None) -> bool:
    return bool(run) and run.get("status") == "ok"


def _value(run: dict | None, key: str):
    return run.get(key) if _ok(run) else None


def _rate(run: dict | None, key: str):
    return run[key] / run["seconds"] if _ok(run) else None


def worker(args) -> int:
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    result = run_one(args, model_dir, args.setting, args.batch, Path(args.data_dir), Path(args.raw))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-dir", default=str(C.SHARED_DATA / "train"))
    parser.add_argument("--dataset", default="scifact_en")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--chunk", type=int, default=16, help="texts per cached forward: ST's mini_batch_size and "
                        "llm2emb's grad_cache_chunk_size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-hard-neg", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new runs after this many seconds")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    raw = Path(args.train_dir) / f"{args.dataset}.parquet"
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    work = Path(tempfile.mkdtemp(prefix="llm2emb-bench-mem-"))
    data_dir = T.prepare_data(model_dir, [raw], work / "prepared", args.max_length)
    on_gpu = args.device.startswith("cuda")
    print(f"{SCRIPT}: {args.model} {args.dtype} on {args.device}, {args.dataset}, batches {args.batch_sizes}, "
          f"settings {args.settings}, chunk {args.chunk}, {args.steps} timed steps", flush=True)
    runs = []
    if on_gpu:  # CUDA context, cuBLAS handles and kernel autotuning would otherwise be paid by the first run
        run_one(args, model_dir, args.settings[0], min(args.batch_sizes), data_dir, raw)
    for batch in args.batch_sizes:
        for name in args.settings:
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                runs.append({"setting": name, "batch": batch, "status": "not run (time budget)"})
                continue
            if on_gpu:  # one process: GPU peaks are reset between runs
                result = run_one(args, model_dir, name, batch, data_dir, raw)
            else:       # RSS peaks are per process
                common = ["--worker", "--setting", name, "--batch", str(batch), "--data-dir", str(data_dir),
                          "--raw", str(raw), "--model", args.model, "--dtype", args.dtype, "--device", args.device,
                          "--threads", str(args.threads), "--chunk", str(args.chunk), "--steps", str(args.steps),
                          "--warmup", str(args.warmup), "--num-hard-neg", str(args.num_hard_neg),
                          "--max-length", str(args.max_length), "--lora-r", str(args.lora_r)]
                common += ["--random-init"] if args.random_init else []
                try:
                    result = C.run_worker(SCRIPT_PATH, common)
                except RuntimeError as exc:
                    result = {"setting": name, "batch": batch, "status": f"failed: {exc}"[:300]}
            runs.append(result)
            shown = {k: v for k, v in result.items() if k != "lengths"}
            print(f"  batch {batch:4d} {name:18s} {json.dumps(shown)}", flush=True)

    backbone = C.meta_backbone(model_dir)
    fm = C.flop_model(backbone)
    lora = T.lora_param_count(model_dir, settings_for(args, model_dir, "ours", 16))
    fm = C.FlopModel(fm.matmul_params, fm.layers, fm.hidden, lora)
    peak, peak_source = C.peak_flops(args.device, args.dtype, args.peak_tflops)
    memory_key = "gpu_peak_mib" if on_gpu else "peak_rss_mib"
    records = []
    by = {(r["setting"], r["batch"]): r for r in runs}
    for batch in args.batch_sizes:
        shown = set()
        for ours, theirs in _pairs():
            a, b = by.get((ours, batch)), by.get((theirs, batch))
            if (a is None and b is None) or (a is None and theirs in shown):  # each ST run in one row at least
                continue
            shown.add(theirs)
            label = f"batch {batch}: {ours} vs {theirs}"
            records.append(C.record(f"{label}: peak {'GPU memory' if on_gpu else 'RSS'}", "MiB", _value(a, memory_key),
                                    _value(b, memory_key), higher_is_better=False, digits=0))
            records.append(C.record(f"{label}: samples/s", "samples/s", _rate(a, "samples"), _rate(b, "samples")))
            records.append(C.record(f"{label}: real tokens/s", "tokens/s", _rate(a, "real_tokens"),
                                    _rate(b, "real_tokens")))
            if peak and _ok(a):
                def mfu(r):  # LoRA: frozen base weights, bench/_common.FlopModel's convention
                    return fm.train_flops(r["lengths"], full=False) / r["seconds"] / peak if _ok(r) else None
                records.append(C.record(f"{label}: MFU", "fraction of peak", mfu(a), mfu(b)))
    for run in runs:  # the per-text lengths served the FLOP counts; the record keeps the totals
        run.pop("lengths", None)
    records.append(C.meta_record(script=SCRIPT, model=args.model, random_init=args.random_init, dtype=args.dtype,
                                 device=args.device, dataset=args.dataset, batch_sizes=args.batch_sizes,
                                 chunk=args.chunk, steps=args.steps, warmup=args.warmup, max_length=args.max_length,
                                 num_hard_neg=args.num_hard_neg, lora_r=args.lora_r, peak_source=peak_source,
                                 memory=memory_key, runs=runs, seconds=round(time.perf_counter() - started, 1)))
    path = C.save_results(SCRIPT, records, args.output)
    print(C.markdown_table(records))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
