"""llama.cpp serving an export: `llm2emb export --llama-cpp DIR` -> llama.cpp's convert_hf_to_gguf.py (f32,
f16, q8_0) -> llama-cpp-python, against llm2emb's torch fp32 vectors of the same export.

Models: a trained run (`--run`, default the strategies study's eos.seed1: smollm2-135m, quickstart recipe, eos
pooling, causal, 80 LoRA steps, exported with --merge-lora) and the untrained built-in model with mean pooling
and bidirectional attention (`--base`; checks the converter's `causal_attention = false`). Texts: the first
`--sts-pairs` pairs of STS-B en dev (both sides). Records per model and GGUF type: the lowest and mean cosine of
each text's llama.cpp vector to torch's, STS-B Spearman of both, GGUF size, and encode speed (texts/s; torch:
Embedder.encode batch 32; llama.cpp: one text per call, as `llm2emb`'s tests and llama-server's /embedding run
it) with `--threads` threads. The llama.cpp tools (a venv with llama-cpp-python, the converter) are
`tests/test_llama_cpp_export.llama_cpp_tools`'s, built on first use.

    .venv/bin/python bench/llama_cpp_route.py            # ~5 min on 2 free cores once the tools are built
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
_ROOT = _BENCH.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))
sys.path.append(str(_ROOT / "tests"))

import _common as C  # noqa: E402

SCRIPT = "llama_cpp_route"
GGUF_TYPES = ("f32", "f16", "q8_0")
LLAMA_POOLING = {"eos": "LAST", "mean": "MEAN"}


def sts_pairs(path: Path, n: int) -> tuple[list[str], list[str], list[float]]:
    from llm2emb.eval.data import load_pairs

    pairs = load_pairs(path)
    return list(pairs.texts1[:n]), list(pairs.texts2[:n]), [float(s) for s in pairs.scores[:n]]


def spearman(vectors, n: int, gold: list[float]) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(spearmanr((v[:n] * v[n:]).sum(1), gold).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(_ROOT / "study_runs/strategies/runs/eos.seed1"))
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--sts", default=str(_ROOT.parent / "shared/data/eval/stsb_en/dev.tsv"))
    parser.add_argument("--sts-pairs", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/llm2emb-llama-cpp-bench")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from llm2emb import Embedder
    from llm2emb.export import export_model
    from test_llama_cpp_export import convert_to_gguf, llama_cpp_tools, llama_cpp_vectors

    torch.set_num_threads(args.threads)
    python, source = llama_cpp_tools()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    s1, s2, gold = sts_pairs(Path(args.sts), args.sts_pairs)
    texts, n = s1 + s2, len(s1)
    records = [C.meta_record(**C.machine_info(), threads=args.threads, sts_pairs=n,
                             serve_script="llama-cpp-python Llama(embedding=True).embed, one text per call")]
    models = {}
    if Path(args.run).is_dir():
        models["trained eos, causal"] = ("run", args.run)
    models["untrained mean, bidirectional"] = ("base", args.base)
    for label, (kind, ref) in models.items():
        slug = label.replace(" ", "").replace(",", "-")
        export, llama = work / f"{slug}-export", work / f"{slug}-llama"
        if not (llama / "config.json").is_file():
            if kind == "run":
                export_model(ref, export, merge_lora=True, llama_cpp=llama, overwrite=True)
            else:
                src = work / f"{slug}-src"
                Embedder.from_pretrained(ref, pooling="mean", bidirectional=True).save(src)
                export_model(str(src), export, llama_cpp=llama, overwrite=True)
        embedder = Embedder.from_pretrained(str(export))
        pooling, bidirectional = embedder.config.pooling, embedder.config.bidirectional
        start = time.perf_counter()
        reference = embedder.encode(texts, batch_size=32)
        torch_speed = len(texts) / (time.perf_counter() - start)
        del embedder
        torch_sts = spearman(reference, n, gold)
        records.append({**C.record(f"{label}: torch fp32 STS-B Spearman", "spearman", torch_sts),
                        "texts_per_s": round(torch_speed, 1)})
        for outtype in GGUF_TYPES:
            gguf = work / f"{slug}-{outtype}.gguf"
            if not gguf.is_file():
                convert_to_gguf(source, llama, gguf, outtype)
            start = time.perf_counter()
            got = llama_cpp_vectors(python, gguf, LLAMA_POOLING[pooling], bidirectional, texts, work,
                                    threads=args.threads)
            seconds = time.perf_counter() - start   # includes loading the GGUF in a fresh process
            cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
            records.append({**C.record(f"{label}: llama.cpp {outtype} STS-B Spearman", "spearman",
                                       spearman(got, n, gold), torch_sts),
                            "min_cosine_to_torch": round(float(cos.min()), 6),
                            "mean_cosine_to_torch": round(float(cos.mean()), 6),
                            "gguf_megabytes": round(gguf.stat().st_size / 2**20, 1),
                            "texts_per_s_with_load": round(len(texts) / seconds, 1)})
            print(json.dumps(records[-1]), flush=True)
    path = C.save_results(SCRIPT, records, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
