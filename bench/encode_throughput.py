"""Encode throughput: `Embedder.encode` vs `SentenceTransformer.encode` on the same model, texts, tokens,
pooling, batch size, precision and threads.

Each side runs in its own process, alternately (A B B A ...), on the scifact_mini corpus (title + text,
max length 256, batch 32). Reports texts/s, real (non-pad) tokens/s, padding fraction, peak memory,
achieved model FLOP/s and MFU, and checks that both libraries give the same vectors (cosine > 0.9999)
and were fed the same token ids.

    python bench/encode_throughput.py                          # 256 docs x 2 rounds, ~5 min on 2 CPU cores
    python bench/encode_throughput.py --docs 0 --rounds 4      # all 1,000 docs
    python bench/encode_throughput.py --model qwen2.5-coder-0.5b --dtype bfloat16 --device cuda \\
        --threads 0 --docs 0 --rounds 4 --peak-tflops 989      # GPU (H100 SXM dense bf16 peak)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by linecache / inspect): keep
# the bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "encode_throughput"
SCRIPT_PATH = Path(__file__).resolve()


def load_texts(corpus: Path, docs: int) -> list[str]:
    """scifact_mini documents as MTEB builds them (`title + " " + text`); `docs` > 0 takes an evenly spaced
    subset (same length mix as the whole corpus)."""
    if not corpus.is_file():
        raise SystemExit(f"corpus {corpus} not found; pass --corpus <BEIR corpus.jsonl> "
                         f"(the shared data lives at ../shared/data/eval/scifact_mini)")
    texts = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            title, body = row.get("title") or "", row.get("text") or ""
            texts.append((title + " " + body).strip() if title else body.strip())
    if 0 < docs < len(texts):
        step = len(texts) / docs
        texts = [texts[int(i * step)] for i in range(docs)]
    return texts


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens a padded batching computes: each batch padded to its longest member."""
    total = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        total += max(lengths[i] for i in idx) * len(idx)
    return total


# ---------------------------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> int:
    """One timed encode of all texts by one library in this process; prints a JSON line."""
    C.set_threads(args.threads)
    import numpy as np
    import torch

    texts = load_texts(Path(args.corpus), args.docs)
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    if args.worker == "ours":
        from llm2emb.model.embedder import Embedder

        model = Embedder.from_pretrained(model_dir, pooling=args.pooling, max_length=args.max_length,
                                         dtype=args.dtype, device=args.device)

        def encode(batch: list[str]) -> np.ndarray:
            return model.encode(batch, batch_size=args.batch_size)
    else:
        from llm2emb.model.loading import load_tokenizer

        model = C.build_sentence_transformer(model_dir, args.pooling, args.max_length, args.dtype, args.device)
        C.check_same_tokens(model, load_tokenizer(model_dir), texts, args.max_length)

        def encode(batch: list[str]) -> np.ndarray:
            return model.encode(batch, batch_size=args.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
    on_gpu = str(args.device).startswith("cuda")
    # Warm-up (allocator, kernels, lazy inits): on a GPU every batch shape once (cuBLAS picks kernels per
    # shape), on a CPU the longest batch (a full pass would double the run time).
    encode(texts if on_gpu else sorted(texts, key=len, reverse=True)[:args.batch_size])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    C.synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.repeat):
        vectors = encode(texts)
    C.synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.repeat
    if args.save_vectors:
        np.save(args.save_vectors, vectors.astype(np.float32))
    print(json.dumps({"seconds": seconds, "peak_rss_mib": C.peak_rss_mib(),
                      "gpu_peak_mib": C.gpu_peak_mib(args.device), "dim": int(vectors.shape[1])}))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, HF folder or hub id")
    parser.add_argument("--random-init", action="store_true",
                        help="--model is a folder with config + tokenizer only: use random weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process; 0 = torch default")
    parser.add_argument("--corpus", default=str(C.SHARED_DATA / "eval" / "scifact_mini" / "corpus.jsonl"))
    parser.add_argument("--docs", type=int, default=256, help="documents to encode per run (0 = all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed passes over the documents per run (a GPU needs several: one pass is ~2 s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pooling", default="mean", choices=["mean", "eos", "weighted_mean"])
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (each side runs once per round)")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run, wait until the 1-minute load average is below this")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU (default: bench/results/hardware_limit.json on CPU)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/encode_throughput.json)")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--save-vectors", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from llm2emb.model.tokenization import encode_texts
    from llm2emb.model.loading import load_tokenizer

    texts = load_texts(Path(args.corpus), args.docs)
    model_dir = C.resolve_bench_model(args.model, args.random_init)
    tokenizer = load_tokenizer(model_dir)
    lengths = [len(ids) for ids in encode_texts(tokenizer, texts, args.max_length).input_ids]
    real = sum(lengths)
    pad_ours = padded_tokens(lengths, sorted(range(len(texts)), key=lambda i: -lengths[i]), args.batch_size)
    pad_theirs = padded_tokens(lengths, sorted(range(len(texts)), key=lambda i: -len(texts[i])), args.batch_size)
    flops = C.flop_model(C.meta_backbone(model_dir)).forward_flops(lengths)
    peak, peak_source = C.peak_flops(args.device, args.dtype, args.peak_tflops)
    print(f"{SCRIPT}: {args.model} {args.dtype} on {args.device}, {len(texts)} docs, {real} tokens, "
          f"batch {args.batch_size}, max length {args.max_length}, {args.pooling} pooling, "
          f"threads {args.threads}, load {C.load_average()}", flush=True)

    passthrough = ["--model", args.model, "--dtype", args.dtype, "--device", args.device,
                   "--threads", str(args.threads), "--corpus", args.corpus, "--docs", str(args.docs),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--pooling", args.pooling, "--repeat", str(args.repeat)] \
        + (["--random-init"] if args.random_init else [])
    load_before = C.load_average()
    with tempfile.TemporaryDirectory(prefix="llm2emb-bench-") as tmp:
        def side(name: str):
            def run(round_index: int) -> dict:
                extra = ["--save-vectors", f"{tmp}/{name}.npy"] if round_index == 0 else []
                return C.run_worker(SCRIPT_PATH, passthrough + ["--worker", name] + extra)
            return run
        runs = C.alternate({"ours": side("ours"), "theirs": side("theirs")}, args.rounds,
                           quiet_load=args.quiet_load)
        import numpy as np

        a, b = np.load(f"{tmp}/ours.npy"), np.load(f"{tmp}/theirs.npy")
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    load_after = C.load_average()

    secs = {k: [r["seconds"] for r in v] for k, v in runs.items()}
    best = {k: min(v) for k, v in secs.items()}
    paired = C.paired_ratio(secs["ours"], secs["theirs"], higher_is_better=False)
    rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    records = [
        C.record("texts/s (best run)", "texts/s", len(texts) / best["ours"], len(texts) / best["theirs"]),
        C.record("real tokens/s (best run)", "tokens/s", real / best["ours"], real / best["theirs"]),
        C.record("speed-up, median of per-round pairs", "x", paired, None),
        C.record("padding fraction", "fraction", 1 - real / pad_ours, 1 - real / pad_theirs, higher_is_better=False),
        C.record("peak RSS", "MiB", rss["ours"], rss["theirs"], higher_is_better=False, digits=0),
    ]
    if runs["ours"][0].get("gpu_peak_mib") is not None:
        records.append(C.record("peak GPU memory", "MiB", max(r["gpu_peak_mib"] for r in runs["ours"]),
                                max(r["gpu_peak_mib"] for r in runs["theirs"]), higher_is_better=False, digits=0))
    records.append(C.record("model FLOP/s (best run)", "GFLOP/s", flops / best["ours"] / 1e9,
                            flops / best["theirs"] / 1e9))
    if peak:
        records.append(C.record("MFU (best run)", "fraction of peak", flops / best["ours"] / peak,
                                flops / best["theirs"] / peak))
    records.append(C.record("min cosine(llm2emb, ST vectors)", "cosine", float(cosine.min()), None, digits=6))
    records.append(C.meta_record(
        script=SCRIPT, model=args.model, random_init=args.random_init, dtype=args.dtype, device=args.device,
        threads=args.threads, docs=len(texts), real_tokens=real, batch_size=args.batch_size,
        max_length=args.max_length, pooling=args.pooling, rounds=args.rounds, repeat=args.repeat,
        quiet_load=args.quiet_load,
        seconds=secs, load_average_per_run={k: [r.get("load_average") for r in v] for k, v in runs.items()},
        model_gflops_per_run=round(flops / 1e9, 1), peak_gflops=None if not peak else round(peak / 1e9, 1),
        peak_source=peak_source, load_average_before=load_before, load_average_after=load_after,
        identical_tokens=True))
    path = C.save_results(SCRIPT, records, args.output)
    print()
    print(C.markdown_table(records))
    print(f"\nseconds per run: {secs}; load average before {load_before}, after {load_after}")
    print(f"wrote {path}")
    threshold = 0.9999 if args.dtype == "float32" else 0.995  # half precision: batch composition shows
    if float(cosine.min()) < threshold:
        print(f"ERROR: vectors differ (min cosine {cosine.min():.6f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
