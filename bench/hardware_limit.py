"""This machine's matmul limit, and how close the encode and training benchmarks come to it (MFU).

Measures the best sustained FLOP/s of large square torch matmuls (fp32, and bf16 for reference) with the
given thread count, then reads bench/results/encode_throughput.json and train_throughput.json (when they
exist) and reports their achieved model FLOP/s as a fraction of the measured peak:

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


def mfu_records(peaks: dict[str, float]) -> list[dict]:
    """MFU rows from the latest throughput results (achieved model GFLOP/s / measured peak)."""
    rows = []
    for script in ("encode_throughput", "train_throughput"):
        results = C.load_results(script)
        if not results:
            continue
        meta = (C.find_record(results, "meta") or {}).get("meta", {})
        peak = peaks.get(meta.get("dtype", "float32"))
        if not peak:
            continue
        for rec in results:
            if rec.get("unit") != "GFLOP/s":
                continue
            ours = rec["ours"] / peak if rec["ours"] else None
            theirs = rec["theirs"] / peak if rec["theirs"] else None
            rows.append(C.record(f"{script}: {rec['name'].replace('model FLOP/s', 'MFU')}", "fraction of peak",
                                 ours, theirs))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU); 0 = torch default")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32 on CPU (bf16 matmuls are slower than fp32 on CPUs without AMX), "
                             "bfloat16 and float32 on GPU")
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="square matmul sizes (default: 1024 2048 4096 on CPU, 4096 8192 on GPU)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per size and dtype")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/hardware_limit.json)")
    args = parser.parse_args(argv)

    C.set_threads(args.threads)
    import torch

    dtypes = args.dtypes or (["float32"] if args.device == "cpu" else ["bfloat16", "float32"])
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
    records += mfu_records(peaks)
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
