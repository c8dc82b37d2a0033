"""Where the time goes: torch.profiler op categories of one encode batch and one LoRA training step, for
llm2emb and sentence-transformers on the same model, the same token ids and the same shapes.

Both libraries run the same transformers model code, so the split between matrix multiplications (MKL /
cuBLAS), attention kernels and element-wise ops (norms, rotary embedding, SiLU, residual adds, their
gradients) shows the ceiling of any library-level speed-up: only padding, data handling and per-step
overhead differ.

    python bench/profile_step.py                       # encode 8 x 256 tokens, train 4 SciFact-like rows
    python bench/profile_step.py --encode-batch 32 --train-rows 16
    python bench/profile_step.py --dtype bfloat16 --output bench/results/profile_step_bf16.json   # both under
                                                       # bf16 autocast (llm2emb's precision: auto on AVX512_BF16)
    python bench/profile_step.py --dtype bfloat16 --attn-implementation eager   # attention as bf16 matmuls
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by linecache / inspect): keep
# the bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402
import _training as T  # noqa: E402

SCRIPT = "profile_step"

#: profiler op name -> category; the first matching prefix wins, anything else is "other"
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("attention", ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt",
                      "aten::silu", "aten::neg", "aten::mean", "aten::sum", "aten::where", "aten::cat",
                      "aten::exp", "aten::log", "aten::masked_fill", "aten::_softmax", "aten::_log_softmax",
                      "aten::norm", "aten::linalg_vector_norm", "aten::clamp", "aten::maximum", "aten::sqrt",
                      "aten::cumsum", "aten::embedding", "aten::index", "aten::gather", "aten::scatter",
                      "aten::nll_loss", "aten::_foreach", "aten::lerp", "aten::addcmul", "aten::addcdiv")),
    ("memory (copy / fill)", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous",
                              "aten::empty", "aten::to", "aten::_to_copy")),
)


def categorise(prof, on_device: bool) -> dict[str, float]:
    """Self seconds per category from a torch.profiler run: CPU time, or device (kernel) time on a GPU."""
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        seconds = (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e6
        for category, prefixes in CATEGORIES:
            if name.startswith(prefixes):
                out[category] += seconds
                break
        else:
            out["other"] += seconds
    return dict(out)


def profile(fn, device: str, dtype: str = "float32") -> tuple[float, dict[str, float]]:
    """Wall seconds and self time per op category of one call of `fn` after a warm-up call; with bfloat16
    both calls run under bf16 autocast (fp32 weights), as mixed-precision training does."""
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def autocast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                              dtype=getattr(torch, dtype))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with autocast():
        fn()  # warm-up
    C.synchronize(device)
    with torch_profile(activities=activities) as prof, autocast():
        start = time.perf_counter()
        fn()
        C.synchronize(device)
        wall = time.perf_counter() - start
    return wall, categorise(prof, device.startswith("cuda"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encode-batch", type=int, default=8, help="texts in the profiled encode batch")
    parser.add_argument("--encode-length", type=int, default=256)
    parser.add_argument("--train-rows", type=int, default=4, help="rows (query, positive, negative) per step")
    parser.add_argument("--query-length", type=int, default=20)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: both sides under bf16 autocast (fp32 weights)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                        help="both sides' attention (eager: transformers' matmul + softmax attention)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["encode", "train"])
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/profile_step.json)")
    args = parser.parse_args(argv)

    C.set_threads(args.threads)
    import torch

    from llm2emb.model.embedder import Embedder

    model_dir = C.resolve_bench_model(args.model)
    g = torch.Generator().manual_seed(0)
    settings = T.TrainSettings(model_dir=model_dir, device=args.device, threads=args.threads,
                               attn_implementation=args.attn_implementation)

    def ids(rows: int, length: int) -> list[list[int]]:
        return torch.randint(1000, 30000, (rows, length), generator=g).tolist()

    load = C.load_average()
    results: dict[str, dict[str, tuple[float, dict[str, float]]]] = {}
    if "encode" not in args.skip:
        batch_ids = ids(args.encode_batch, args.encode_length)
        ours = Embedder.from_pretrained(model_dir, pooling="mean", max_length=args.encode_length, device=args.device,
                                        attn_implementation=settings.attn_implementation)
        theirs = C.build_sentence_transformer(model_dir, "mean", args.encode_length, "float32", args.device,
                                              settings.attn_implementation)
        features = ours.collate(batch_ids, device=ours.device)
        st_features = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}

        def encode_ours():
            with torch.inference_mode():
                ours(features["input_ids"], features["attention_mask"])

        def encode_theirs():
            with torch.inference_mode():
                theirs(dict(st_features))
        results["encode"] = {"ours": profile(encode_ours, args.device, args.dtype),
                             "theirs": profile(encode_theirs, args.device, args.dtype)}
        del ours, theirs

    if "train" not in args.skip:
        from llm2emb.losses import EmbeddingObjective
        from llm2emb.train.encode import EncodedBatch, TripletEncoder
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        rows = args.train_rows
        q, p, n = ids(rows, args.query_length), ids(rows, args.passage_length), ids(rows, args.passage_length)
        ours = Embedder.from_pretrained(model_dir, pooling="mean", max_length=args.passage_length, device=args.device,
                                        attn_implementation=settings.attn_implementation)
        ours.add_lora(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets))
        ours.train()
        encoder = TripletEncoder(ours)
        objective = EmbeddingObjective.build(temperature=settings.temperature, gather=False)
        batch = EncodedBatch(ours.collate(q, device=ours.device), ours.collate(p, device=ours.device),
                             ours.collate(n, device=ours.device), 1, True, "bench", rows)

        def train_ours():
            qv, pv, nv = encoder(batch)
            objective(qv, pv, nv, True).total.backward()

        theirs = T.build_st_for_training(settings)
        theirs.train()
        mnrl = MultipleNegativesRankingLoss(theirs, scale=1.0 / settings.temperature)
        columns = [{k: v for k, v in ours.collate(x, device=ours.device).items()} for x in (q, p, n)]

        def train_theirs():
            mnrl([dict(c) for c in columns], None).backward()
        results["train"] = {"ours": profile(train_ours, args.device, args.dtype),
                            "theirs": profile(train_theirs, args.device, args.dtype)}

    records = []
    lines = []
    for workload, sides in results.items():
        shape = (f"{args.encode_batch} x {args.encode_length} tokens" if workload == "encode" else
                 f"{args.train_rows} rows x (query {args.query_length} + positive {args.passage_length} + "
                 f"negative {args.passage_length}) tokens, LoRA r=8 q,k,v,o")
        lines.append(f"\n{workload} ({shape}):\n")
        lines.append("| category | llm2emb s | llm2emb % | sentence-transformers s | sentence-transformers % |")
        lines.append("|---|---:|---:|---:|---:|")
        cats = [c for c, _ in CATEGORIES] + ["other"]
        totals = {side: sum(sides[side][1].values()) for side in sides}
        for cat in cats:
            o, t = sides["ours"][1].get(cat, 0.0), sides["theirs"][1].get(cat, 0.0)
            lines.append(f"| {cat} | {o:.2f} | {100 * o / totals['ours']:.0f}% | {t:.2f} | "
                         f"{100 * t / totals['theirs']:.0f}% |")
            records.append(C.record(f"{workload}: {cat} share", "fraction of op time", o / totals["ours"],
                                    t / totals["theirs"], higher_is_better=False))
        lines.append(f"| wall clock | {sides['ours'][0]:.2f} | | {sides['theirs'][0]:.2f} | |")
        records.append(C.record(f"{workload}: wall clock", "s", sides["ours"][0], sides["theirs"][0],
                                higher_is_better=False))
    records.append(C.meta_record(script=SCRIPT, model=args.model, device=args.device, dtype=args.dtype,
                                 attn_implementation=args.attn_implementation,
                                 threads=args.threads,
                                 encode_batch=args.encode_batch, encode_length=args.encode_length,
                                 train_rows=args.train_rows, query_length=args.query_length,
                                 passage_length=args.passage_length, load_average_before=load,
                                 load_average_after=C.load_average(),
                                 categories={c: list(p) for c, p in CATEGORIES}))
    path = C.save_results(SCRIPT, records, args.output)
    print("\n".join(lines))
    print(f"\nload average before {load}, after {C.load_average()}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
