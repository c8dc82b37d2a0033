"""This machine's matmul limit, and how close the encode and training benchmarks come to it (MFU).

Measures the best sustained FLOP/s of large square torch matmuls (fp32, and bf16 where the device computes it
natively) with the given thread count, then reads bench/results/encode_throughput.json, train_throughput.json
and train_throughput_ootb.json (when they exist and were measured on this CPU) and reports their achieved model
FLOP/s as a fraction of the peak of the precision each side ran in:

    python bench/hardware_limit.py                       # CPU, 2 threads, ~30 s
    python bench/hardware_limit.py --device cuda           # bf16 and fp32

Model FLOPs are counted as in bench/_common.FlopModel: 2 x matmul parameters x real tokens forward plus the
attention scores, 3x that for full training, and for LoRA 2x on the frozen weights (no weight gradient).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by linecache / inspect): keep
# the bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "hardware_limit"


def matmul_flops(n: int, dtype: str, device: str, seconds: float) -> float:
    """Best FLOP/s of repeated (n x n) @ (n x n) matmuls over ~`seconds`, after a warm-up."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    out = torch.empty(n, n, device=device, dtype=dt)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    C.synchronize(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    reps = 1 if device == "cpu" else 20
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        C.synchronize(device)
        best = max(best, reps * 2.0 * n ** 3 / (time.perf_counter() - start))
    return best


def side_dtypes(meta: dict) -> tuple[str, str]:
    """The dtype each side of a throughput result computed in: its --dtype, except out-of-the-box runs, where
    llm2emb ran `precision: auto` (recorded in the meta) and sentence-transformers its fp32 default."""
    dtype = meta.get("dtype", "float32")
    if not meta.get("out_of_the_box"):
        return dtype, dtype
    auto = str(meta.get("auto_precision_cpu", "fp32")).split()[0]
    return C.DTYPE_OF_PRECISION.get(auto, "float32"), "float32"


def mfu_records(peaks: dict[str, float], device: str) -> list[dict]:
    """MFU rows from the latest throughput results measured on this CPU: achieved model GFLOP/s over the
    measured peak of the precision each side computed in (a bf16 run against the fp32 peak would exceed 1)."""
    rows = []
    for script in ("encode_throughput", "train_throughput", "train_throughput_ootb"):
        results = C.load_results(script)
        if not results:
            continue
        meta = (C.find_record(results, "meta") or {}).get("meta", {})
        if device == "cpu" and not C.same_cpu(meta):
            print(f"  {script}.json: measured on another CPU ({meta.get('cpu')}, "
                  f"{' '.join(meta.get('cpu_bf16_flags', [])) or 'no bf16 flags recorded'}); no MFU rows",
                  flush=True)
            continue
        peak_ours, peak_theirs = (peaks.get(d) for d in side_dtypes(meta))
        for rec in results:
            if rec.get("unit") != "GFLOP/s":
                continue
            ours = rec["ours"] / peak_ours if rec["ours"] and peak_ours else None
            theirs = rec["theirs"] / peak_theirs if rec["theirs"] and peak_theirs else None
            rows.append(C.record(f"{script}: {rec['name'].replace('model FLOP/s', 'MFU')}", "fraction of peak",
                                 ours, theirs))
    return rows


def default_dtypes(device: str) -> list[str]:
    """fp32 everywhere; bf16 too on GPUs and on CPUs that compute it natively (AVX512_BF16 / AMX), where
    `precision: auto` trains in it and its MFU needs its own peak."""
    if device != "cpu":
        return ["bfloat16", "float32"]
    from llm2emb.model.precision import cpu_bf16_native

    return ["float32", "bfloat16"] if cpu_bf16_native()[0] else ["float32"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU); 0 = torch default")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32, plus bfloat16 on GPUs and on CPUs with AVX512_BF16 or AMX (bf16 is "
                             "emulated, and slower than fp32, on other CPUs)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="square matmul sizes (default: 1024 2048 4096 on CPU, 4096 8192 on GPU)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per size and dtype")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/hardware_limit.json)")
    args = parser.parse_args(argv)

    C.set_threads(args.threads)
    import torch

    dtypes = args.dtypes or default_dtypes(args.device)
    sizes = args.sizes or ([1024, 2048, 4096] if args.device == "cpu" else [4096, 8192])
    print(f"{SCRIPT}: device={args.device} threads={torch.get_num_threads()} load={C.load_average()}",
          flush=True)
    records, peaks, detail = [], {}, {}
    for dtype in dtypes:
        per_size = {n: matmul_flops(n, dtype, args.device, args.seconds) for n in sizes}
        detail[dtype] = {str(n): round(v / 1e9, 1) for n, v in per_size.items()}
        peaks[dtype] = max(per_size.values()) / 1e9
        records.append(C.record(f"{dtype} matmul peak", "GFLOP/s", peaks[dtype]))
        print(f"  {dtype}: " + ", ".join(f"n={n}: {v / 1e9:.0f} GFLOP/s" for n, v in per_size.items()),
              flush=True)
    records += mfu_records(peaks, "cpu" if args.device == "cpu" else "cuda")
    records.append(C.meta_record(script=SCRIPT, device="cuda" if "cuda" in args.device else "cpu",
                                 threads=torch.get_num_threads(), matmul_sizes=sizes,
                                 gflops_by_size=detail))
    path = C.save_results(SCRIPT, records, args.output)
    print()
    print(C.markdown_table(records))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
