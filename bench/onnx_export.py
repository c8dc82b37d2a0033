"""Backends of an exported model: encode speed and quality of `llm2emb export --onnx-int8 auto`'s
smollm2-135m folder (mean pooling) run by llm2emb as torch fp32 (the baseline), torch bf16 (autocast,
`precision="bf16"`), the ONNX fp32 graph and the ONNX int8 graph (`Embedder.from_pretrained(backend="onnx")`,
ONNX Runtime; export by torch.onnx.export and ONNX Runtime's dynamic quantiser, no optimum).

Each variant runs in its own process, alternately (A B C ... C B A), on the same texts and threads. Speed:
texts/s encoding `--docs` scifact_mini documents (title + text, max length 256, batch 32). Quality, once per
variant: nDCG@10 on a fixed sample of the built-in stdlib code search's held-out split (`--queries` queries
drawn with seed 42, their relevant documents plus evenly spaced others up to `--corpus-docs`; no instruction),
Spearman on the first `--sts-pairs` pairs of STS-B en dev, and the lowest cosine of each document vector to
the torch fp32 one. File sizes: the meta record's onnx_export (MB per graph, torch_weights_megabytes).

Records (`bench/results/onnx_export.json`): `ours` is the variant, `theirs` the torch fp32 baseline (not
another library here), ratio > 1 = the variant is faster / scores higher. The meta record names the CPU
model and its SIMD flags from /proc/cpuinfo.

    flock /tmp/llm2emb-cpu.lock .venv/bin/python bench/onnx_export.py          # ~10 min on 2 busy cores
    python bench/onnx_export.py --docs 128 --rounds 3 --corpus-docs 0 --queries 0  # longer, whole split
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "onnx_export"
SCRIPT_PATH = Path(__file__).resolve()
VARIANTS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
              "amx_int8", "avx_vnni")


def cpu_flags() -> list[str]:
    from llm2emb.export.backends import cpu_flags as flags

    present = flags()
    return [f for f in SIMD_FLAGS if f in present]


def load_docs(corpus: Path, docs: int) -> list[str]:
    from encode_throughput import load_texts

    return load_texts(corpus, docs)


def retrieval_sample(folder: Path, queries: int, corpus_docs: int, seed: int = 42):
    """A BEIR folder with `queries` sampled queries and a corpus of their relevant documents plus evenly
    spaced others up to `corpus_docs` (0: everything)."""
    from dataclasses import replace

    from llm2emb.eval.data import load_beir, sample_queries

    data = load_beir(folder)
    chosen = sample_queries(data.evaluable_query_ids(), queries or None, seed)
    keep_q = set(chosen)
    if not corpus_docs:
        qrels = {q: r for q, r in data.qrels.items() if q in keep_q}
        return replace(data, qrels=qrels)
    relevant = {d for q in chosen for d in data.qrels[q]}
    others = [i for i, d in enumerate(data.corpus_ids) if d not in relevant]
    room = max(corpus_docs - len(relevant), 0)
    step = len(others) / room if room else 0
    picked = {others[int(i * step)] for i in range(min(room, len(others)))}
    rows = [i for i, d in enumerate(data.corpus_ids) if d in relevant or i in picked]
    qrows = [i for i, q in enumerate(data.query_ids) if q in keep_q]
    return replace(data, corpus_ids=[data.corpus_ids[i] for i in rows],
                   corpus_texts=[data.corpus_texts[i] for i in rows],
                   corpus_titles=[data.corpus_titles[i] for i in rows],
                   corpus_bodies=[data.corpus_bodies[i] for i in rows],
                   query_ids=[data.query_ids[i] for i in qrows], query_texts=[data.query_texts[i] for i in qrows],
                   qrels={q: r for q, r in data.qrels.items() if q in keep_q},
                   self_doc_ids={q: d for q, d in data.self_doc_ids.items() if q in keep_q})


def load_variant(folder: str, variant: str, threads: int):
    """llm2emb's own backends on the same exported folder: torch fp32, torch bf16 (autocast on the fp32
    weights, `precision="bf16"`; AMX on this CPU), the ONNX fp32 graph and the ONNX int8 graph (ONNX Runtime
    with `threads` intra-op threads)."""
    from llm2emb import Embedder
    from llm2emb.model.onnx_embedder import OnnxEmbedder

    if variant == "torch-fp32":
        return Embedder.from_pretrained(folder, precision="fp32")
    if variant == "torch-bf16":
        return Embedder.from_pretrained(folder, precision="bf16")
    files = json.loads((Path(folder) / "onnx_files.json").read_text())
    return OnnxEmbedder.from_pretrained(folder, files["fp32" if variant == "onnx-fp32" else "int8"], threads=threads)


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    C.set_threads(args.threads)
    import numpy as np

    docs = load_docs(Path(args.corpus), args.docs)
    model = load_variant(args.folder, args.worker, args.threads)

    def encode(texts):
        return model.encode(texts, batch_size=args.batch_size, max_length=args.max_length)

    encode(sorted(docs, key=len, reverse=True)[:args.batch_size])   # warm-up: the longest batch
    start = time.perf_counter()
    vectors = encode(docs)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "peak_rss_mib": C.peak_rss_mib()}
    if args.quality:
        from llm2emb.eval.data import PairData, load_pairs
        from llm2emb.eval.retrieval import run_retrieval
        from llm2emb.eval.sts import run_sts

        np.save(args.quality + ".npy", vectors.astype(np.float32))
        data = retrieval_sample(Path(args.retrieval), args.queries, args.corpus_docs)
        ret = run_retrieval(model, data, batch_size=args.batch_size, max_length=args.max_length, cache=False,
                            show_progress=False)
        pairs = load_pairs(args.sts)
        if args.sts_pairs:
            pairs = PairData(pairs.path, pairs.texts1[:args.sts_pairs], pairs.texts2[:args.sts_pairs],
                             pairs.scores[:args.sts_pairs])
        sts = run_sts(model, pairs, batch_size=args.batch_size, show_progress=False)
        out.update(ndcg_at_10=ret.metrics["ndcg_at_10"], n_queries=ret.n_queries, n_docs=ret.n_docs,
                   spearman=sts.metrics["spearman"], n_pairs=len(pairs.scores))
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def export_folder(out: Path, model: str, max_length: int, onnx: bool) -> tuple[Path, dict]:
    """The benchmarked folder: `llm2emb export` of `model` with mean pooling (+ ONNX files when possible)."""
    from llm2emb import Embedder
    from llm2emb.export import export_model

    src = out / "src"
    Embedder.from_pretrained(model, pooling="mean", max_length=max_length).save(src)
    result = export_model(str(src), out / "export", onnx=onnx, onnx_int8="auto" if onnx else None)
    result.onnx["torch_weights_megabytes"] = round(sum(p.stat().st_size for p in (out / "export").glob(
        "*.safetensors")) / 2**20, 1)
    if result.route != "native":
        raise SystemExit(f"expected a native export, got {result.route}: {result.route_reasons}")
    files = {kind: data["file"] for kind, data in result.onnx.items() if isinstance(data, dict)}
    (out / "export" / "onnx_files.json").write_text(json.dumps(files))
    return out / "export", result.onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads per process")
    parser.add_argument("--corpus", default=str(C.SHARED_DATA / "eval" / "scifact_mini" / "corpus.jsonl"))
    parser.add_argument("--retrieval", default=None,
                        help="BEIR folder for nDCG@10 (default: the built-in stdlib code search's held-out split)")
    parser.add_argument("--sts", default=str(C.SHARED_DATA / "eval" / "stsb_en" / "dev.tsv"))
    parser.add_argument("--docs", type=int, default=64, help="documents per timed run (0 = all)")
    parser.add_argument("--queries", type=int, default=80, help="retrieval queries for nDCG@10 (0 = all)")
    parser.add_argument("--corpus-docs", type=int, default=300, help="retrieval corpus size (0 = all)")
    parser.add_argument("--sts-pairs", type=int, default=300, help="first STS-B dev pairs (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per variant (alternating)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run, wait until the 1-minute load average is below this")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/onnx_export.json)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--quality", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import numpy as np

    from llm2emb.export import backends

    if args.retrieval is None:
        from llm2emb.data.builtin import build_stdlib_codesearch
        from llm2emb.model.loading import llm2emb_home

        args.retrieval = build_stdlib_codesearch(llm2emb_home() / "builtin" / "stdlib")["eval_dir"]
    for path in (args.corpus, args.retrieval, args.sts):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found (the shared data lives at ../shared/data)")
    blocked = backends.onnx_unavailable()
    variants = [v for v in args.variants if not (blocked and v.startswith("onnx"))]
    load_before = C.load_average()
    print(f"{SCRIPT}: {args.model}, mean pooling, {C.machine_info()['cpu']} {cpu_flags()}, threads {args.threads}, "
          f"variants {variants}" + (f"; ONNX blocked: {blocked}" if blocked else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="llm2emb-onnx-bench-") as tmp:
        started = time.perf_counter()
        folder, onnx_info = export_folder(Path(tmp), args.model, args.max_length, onnx=not blocked and any(
            v.startswith("onnx") for v in variants))
        export_seconds = time.perf_counter() - started
        passthrough = ["--folder", str(folder), "--threads", str(args.threads), "--corpus", args.corpus,
                       "--retrieval", args.retrieval, "--sts", args.sts, "--docs", str(args.docs),
                       "--queries", str(args.queries), "--corpus-docs", str(args.corpus_docs),
                       "--sts-pairs", str(args.sts_pairs), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length)]

        def side(name: str):
            def run(round_index: int) -> dict:
                extra = ["--quality", f"{tmp}/{name}"] if round_index == 0 else []
                return C.run_worker(SCRIPT_PATH, passthrough + ["--worker", name] + extra)
            return run
        runs = C.alternate({v: side(v) for v in variants}, args.rounds, quiet_load=args.quiet_load)
        vectors = {v: np.load(f"{tmp}/{v}.npy") for v in variants}
    load_after = C.load_average()

    base = "torch-fp32"
    ndocs = len(load_docs(Path(args.corpus), args.docs))
    best = {v: min(r["seconds"] for r in runs[v]) for v in variants}
    quality = {v: runs[v][0] for v in variants}
    records = []
    for v in args.variants:
        if v not in variants:
            for name, unit in (("texts/s (best run)", "texts/s"), ("stdlib code search nDCG@10", "nDCG@10"),
                               ("STS-B en dev Spearman", "Spearman"), ("min cosine to torch fp32", "cosine")):
                records.append(C.record(f"{name} [{v}]", unit, None, None))
            continue
        ref = vectors.get(base)
        cos = None
        if ref is not None:
            a, b = vectors[v].astype(np.float64), ref.astype(np.float64)
            cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        theirs = base in variants
        records += [
            C.record(f"texts/s (best run) [{v}]", "texts/s", ndocs / best[v], ndocs / best[base] if theirs else None),
            C.record(f"stdlib code search nDCG@10 [{v}]", "nDCG@10", quality[v]["ndcg_at_10"],
                     quality[base]["ndcg_at_10"] if theirs else None),
            C.record(f"STS-B en dev Spearman [{v}]", "Spearman", quality[v]["spearman"],
                     quality[base]["spearman"] if theirs else None),
            C.record(f"min cosine to torch fp32 [{v}]", "cosine", cos, None, digits=6),
            C.record(f"peak RSS [{v}]", "MiB", max(r["peak_rss_mib"] for r in runs[v]),
                     max(r["peak_rss_mib"] for r in runs[base]) if theirs else None, higher_is_better=False, digits=0),
        ]
    any_q = next(iter(quality.values()))
    records.append(C.meta_record(
        script=SCRIPT, model=args.model, pooling="mean", route="native", cpu_flags=cpu_flags(),
        threads=args.threads, docs=ndocs, batch_size=args.batch_size, max_length=args.max_length,
        rounds=args.rounds, variants=args.variants, ran=variants, blocked={} if not blocked else {
            v: blocked for v in args.variants if v.startswith("onnx")},
        onnx_export=onnx_info, exporter="torch.onnx.export (see llm2emb/export/backends.py), no optimum",
        export_seconds=round(export_seconds, 1),
        retrieval=str(args.retrieval),
        retrieval_sample={"queries": any_q["n_queries"], "docs": any_q["n_docs"], "seed": 42},
        sts_pairs=any_q["n_pairs"], seconds={v: [r["seconds"] for r in runs[v]] for v in variants},
        load_average_per_run={v: [r.get("load_average") for r in runs[v]] for v in variants},
        load_average_before=load_before, load_average_after=load_after, baseline=base,
        note="theirs = the torch fp32 baseline of the same exported folder, not another library"))
    path = C.save_results(SCRIPT, records, args.output)
    print(C.markdown_table(records, ours_label="variant", theirs_label="torch fp32"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
