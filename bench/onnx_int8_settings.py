"""Which dynamic int8 setting keeps eos (last-token) pooling usable: ONNX Runtime's `quantize_dynamic` of
one fp32 graph (smollm2-135m exported by `llm2emb.export.backends.export_graph`, eos pooling, right padding)
with different options, each compared to the fp32 graph on the same real texts.

Both poolings come from the same graph: eos is the graph's `sentence_embedding` (last real token), mean is
the masked mean of its `token_embeddings` output (padding rows are zero), so one export serves both. Texts:
`--docs` scifact_mini documents (title + text) and `--sentences` STS-B en dev first sentences, tokenised by
llm2emb (end token appended), max length `--max-length`. Per setting: lowest and mean cosine of eos and mean
vectors to fp32, graph size, encode seconds (ONNX Runtime with `--threads` threads).

Settings (`SETTINGS`): the options of `quantize_dynamic` (per_channel, reduce_range, op types) and which
linear layers stay fp32 (`nodes_to_exclude`, picked by the module path the exporter records for each MatMul;
see `backends.linear_modules`).

    flock /tmp/llm2emb-helper.lock nice -n 10 python bench/onnx_int8_settings.py --work /tmp/int8 \
        --settings all8 per_tensor
    python bench/onnx_int8_settings.py --work /tmp/int8     # every setting; the fp32 graph is reused from --work
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "onnx_int8_settings"

#: name -> (quantize_dynamic options, linear layers to keep in fp32: a predicate over (layer index, projection
#: name, number of layers, {"layer.projection": max|x|/mean|x| of its input on CALIBRATION_TEXTS}));
#: "default" is what `--onnx-int8` writes (backends.quantize_int8)
SETTINGS = {
    "all8": ({"per_channel": True, "reduce_range": False}, None),
    "per_tensor": ({"per_channel": False, "reduce_range": False}, None),
    "reduce_range": ({"per_channel": True, "reduce_range": True}, None),
    "matmul_only": ({"per_channel": True, "reduce_range": False, "op_types_to_quantize": ["MatMul"]}, None),
    "keep_down_proj": ({"per_channel": True, "reduce_range": False}, lambda i, proj, n, r: proj == "down_proj"),
    "keep_o_proj": ({"per_channel": True, "reduce_range": False}, lambda i, proj, n, r: proj == "o_proj"),
    "keep_last_layer": ({"per_channel": True, "reduce_range": False}, lambda i, proj, n, r: i == n - 1),
    "keep_last_3_layers": ({"per_channel": True, "reduce_range": False}, lambda i, proj, n, r: i >= n - 3),
    "keep_first_3_layers": ({"per_channel": True, "reduce_range": False}, lambda i, proj, n, r: i < 3),
    "keep_mlp": ({"per_channel": True, "reduce_range": False},
                 lambda i, proj, n, r: proj in ("gate_proj", "up_proj", "down_proj")),
    "keep_down_proj_first_half": ({"per_channel": True, "reduce_range": False},
                                  lambda i, proj, n, r: proj == "down_proj" and i < n // 2),
    "keep_down_proj_second_half": ({"per_channel": True, "reduce_range": False},
                                   lambda i, proj, n, r: proj == "down_proj" and i >= n // 2),
    "keep_down_proj_per_tensor": ({"per_channel": False, "reduce_range": False},
                                  lambda i, proj, n, r: proj == "down_proj"),
    "keep_down_proj_last_layer": ({"per_channel": True, "reduce_range": False},
                                  lambda i, proj, n, r: proj == "down_proj" or i == n - 1),
    "keep_outliers_1000": ({"per_channel": True, "reduce_range": False},
                           lambda i, proj, n, r: r.get(f"{i}.{proj}", 0) > 1000),
    "keep_outliers_300": ({"per_channel": True, "reduce_range": False},
                          lambda i, proj, n, r: r.get(f"{i}.{proj}", 0) > 300),
    "keep_outliers_100": ({"per_channel": True, "reduce_range": False},
                          lambda i, proj, n, r: r.get(f"{i}.{proj}", 0) > 100),
    "default": (None, None),
}


#: texts whose activations rank the linear layers' inputs (the `keep_outliers_*` settings): massive
#: activations sit on fixed tokens (the first token, punctuation) and show up for any text, so a few do
CALIBRATION_TEXTS = (
    "The cat sits on the mat.",
    "Embeddings turn text into vectors that can be compared, for search and for clustering.",
    "what is a text embedding?",
    "def add(a, b):\n    return a + b",
    "今天天气很好，我们去公园散步吧。",
    "Photosynthesis converts light energy into chemical energy stored in glucose; oxygen is released.",
)


def linear_input_ratios(embedder, texts=CALIBRATION_TEXTS) -> dict[tuple[int, str], float]:
    """{(decoder layer, projection name): max |x| / mean |x| of that linear layer's input} over `texts`.

    Why: dynamic int8 quantises each activation tensor with one scale from its largest value; a layer whose
    input carries a few huge values (LLMs' "massive activations", e.g. SmolLM2-135M's mlp.down_proj of
    layers 11 and 28, ratio > 4000) loses every other value's precision, and the last token's state, what
    eos pooling reads, does not average that error away as mean pooling does."""
    import torch
    from torch import nn

    ratios: dict[tuple[int, str], float] = {}
    hooks = []

    def hook(key):
        def record(module, inputs):
            x = inputs[0].detach().abs().float()
            ratios[key] = max(ratios.get(key, 0.0), float(x.max() / x.mean().clamp_min(1e-12)))
        return record
    for name, module in embedder.backbone.named_modules():
        match = re.search(r"layers\.(\d+)\.(?:.*\.)?([^.]+)$", name)
        if isinstance(module, nn.Linear) and match:
            hooks.append(module.register_forward_pre_hook(hook((int(match.group(1)), match.group(2)))))
    try:
        with torch.no_grad():
            embedder.encode(list(texts), batch_size=1)   # one text per call: no padding in the statistics
    finally:
        for handle in hooks:
            handle.remove()
    return ratios


def load_texts(docs: int, sentences: int) -> list[str]:
    from encode_throughput import load_texts as load_docs

    texts = load_docs(C.SHARED_DATA / "eval" / "scifact_mini" / "corpus.jsonl", docs)
    with open(C.SHARED_DATA / "eval" / "stsb_en" / "dev.tsv", encoding="utf-8") as fh:
        rows = [line.split("\t")[0] for line in fh.read().splitlines()[1:]]
    return texts + rows[:sentences]


def prepare(work: Path, model: str, texts: list[str], max_length: int, bidirectional: bool = False) -> dict:
    """The fp32 graph and the tokenised texts in `work` (made once, reused by later runs)."""
    import numpy as np

    from llm2emb import Embedder
    from llm2emb.export import backends

    info_path = work / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    embedder = Embedder.from_pretrained(model, pooling="eos", dtype="float32", max_length=max_length,
                                        bidirectional=bidirectional)
    started = time.perf_counter()
    exporter = backends.export_graph(embedder, work / "model.onnx")
    ratios = {f"{layer}.{proj}": round(value, 1) for (layer, proj), value in
              linear_input_ratios(embedder).items()}
    batch = embedder.collate(embedder.tokenize(texts).input_ids)
    np.savez(work / "inputs.npz", input_ids=batch["input_ids"].numpy(), attention_mask=batch["attention_mask"].numpy())
    info = {"model": model, "exporter": exporter, "export_seconds": round(time.perf_counter() - started, 1),
            "padding_side": embedder.config.padding_side, "texts": len(texts),
            "tokens": int(batch["attention_mask"].sum()), "max_length": max_length, "bidirectional": bidirectional,
            "linear_input_ratios": ratios}
    info_path.write_text(json.dumps(info))
    return info


def run_graph(path: Path, inputs: dict, threads: int, batch: int = 10):
    """(eos vectors, mean vectors, seconds) of the graph at `path`."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    eos, mean = [], []
    started = time.perf_counter()
    for start in range(0, len(inputs["input_ids"]), batch):
        ids, mask = inputs["input_ids"][start:start + batch], inputs["attention_mask"][start:start + batch]
        keep = mask.sum(0) > 0                      # drop columns that are padding in the whole slice
        ids, mask = ids[:, keep], mask[:, keep]
        tokens, pooled = session.run(["token_embeddings", "sentence_embedding"],
                                     {"input_ids": ids, "attention_mask": mask})
        eos.append(pooled)
        mean.append((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    return np.concatenate(eos), np.concatenate(mean), time.perf_counter() - started


def cosines(a, b) -> tuple[float, float]:
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def quantize(work: Path, name: str, ratios: dict[str, float]) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from llm2emb.export import backends

    target = work / f"{name}.onnx"
    if name == "default":
        backends.quantize_int8(work / "model.onnx", target, "avx512_vnni")
        return target
    options, keep = SETTINGS[name]
    exclude = []
    if keep is not None:
        modules = backends.linear_modules(onnx.load(str(work / "model.onnx"), load_external_data=False))
        n_layers = 1 + max(layer for layer, _ in modules.values())
        exclude = [node for node, (layer, proj) in modules.items() if keep(layer, proj, n_layers, ratios)]
    quantize_dynamic(model_input=str(work / "model.onnx"), model_output=str(target), weight_type=QuantType.QInt8,
                     nodes_to_exclude=exclude, **options)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", required=True, help="folder for the fp32 graph, inputs and quantised graphs")
    parser.add_argument("--settings", nargs="+", default=["all"], help=f"'all' or names from {list(SETTINGS)}")
    parser.add_argument("--docs", type=int, default=25)
    parser.add_argument("--sentences", type=int, default=25)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true", help="export the model with bidirectional attention")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/onnx_int8_settings["
                        "_bidirectional].json); "
                        "records of settings not run this time are kept")
    args = parser.parse_args(argv)
    import numpy as np

    C.set_threads(args.threads)
    work = Path(args.work)
    texts = load_texts(args.docs, args.sentences)
    info = prepare(work, args.model, texts, args.max_length, args.bidirectional)
    inputs = dict(np.load(work / "inputs.npz"))
    if (work / "fp32.npz").exists():
        ref = dict(np.load(work / "fp32.npz"))
    else:
        eos, mean, seconds = run_graph(work / "model.onnx", inputs, args.threads)
        ref = {"eos": eos, "mean": mean, "seconds": np.array(seconds)}
        np.savez(work / "fp32.npz", **ref)
    names = list(SETTINGS) if args.settings == ["all"] else args.settings
    path = Path(args.output) if args.output else C.RESULTS_DIR / (
        f"{SCRIPT}_bidirectional.json" if args.bidirectional else f"{SCRIPT}.json")
    old = json.loads(path.read_text()) if path.exists() else []
    rows = {r["name"].rsplit(" [", 1)[1][:-1]: [] for r in old if r["name"] != "meta"}
    for r in old:
        if r["name"] != "meta":
            rows[r["name"].rsplit(" [", 1)[1][:-1]].append(r)
    load_before = C.load_average()
    for name in names:
        started = time.perf_counter()
        graph = quantize(work, name, info["linear_input_ratios"])
        quant_seconds = time.perf_counter() - started
        eos, mean, seconds = run_graph(graph, inputs, args.threads)
        eos_min, eos_avg = cosines(eos, ref["eos"])
        mean_min, mean_avg = cosines(mean, ref["mean"])
        mb = graph.stat().st_size / 2**20
        print(f"{name:22s} eos min {eos_min:.4f} avg {eos_avg:.4f} | mean min {mean_min:.4f} avg {mean_avg:.4f} | "
              f"{mb:.1f} MB | {seconds:.1f} s (fp32 {float(ref['seconds']):.1f} s) | quantise {quant_seconds:.0f} s",
              flush=True)
        rows[name] = [
            C.record(f"eos min cosine to fp32 [{name}]", "cosine", eos_min, digits=4),
            C.record(f"eos mean cosine to fp32 [{name}]", "cosine", eos_avg, digits=4),
            C.record(f"mean-pooling min cosine to fp32 [{name}]", "cosine", mean_min, digits=4),
            C.record(f"mean-pooling mean cosine to fp32 [{name}]", "cosine", mean_avg, digits=4),
            C.record(f"graph size [{name}]", "MB", mb, digits=1),
            C.record(f"encode seconds [{name}]", "s", seconds, float(ref["seconds"]), higher_is_better=False, digits=1),
        ]
        graph.unlink()
    records = [r for name in rows for r in rows[name]]
    records.append(C.meta_record(script=SCRIPT, **info, threads=args.threads, docs=args.docs,
                                 sentences=args.sentences, fp32_megabytes=round((work / "model.onnx").stat().st_size
                                                                                 / 2**20, 1),
                                 load_average_before=load_before, load_average_after=C.load_average(),
                                 note="cosines of the int8 graph's vectors to the fp32 graph's; encode seconds: "
                                      "theirs = the fp32 graph, same texts and threads"))
    C.save_results(SCRIPT, records, str(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
