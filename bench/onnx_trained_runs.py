"""The ONNX chain on real trained runs: short LoRA runs of smollm2-135m (the quickstart recipe, `--steps` steps,
batch 8, 64 tokens; on the built-in stdlib code-search training split) for each recipe (eos / mean pooling x
causal / bidirectional attention), each exported with `--merge-lora --onnx-int8 auto`, then evaluated with
`llm2emb eval --no-cache` three ways (torch fp32, the ONNX fp32 graph, the ONNX int8 graph), and loaded in
fastembed (its own venv, `tests/test_onnx_fastembed.fastembed_python`'s) against llm2emb's torch vectors.
When the int8 graph misses the export's self-check, the export refuses it (nothing written); the recipe then
records that sentence and goes on with `--onnx` (fp32 only).

Quality: nDCG@10 on a fixed sample of the stdlib held-out split (`--queries` queries drawn with seed 42, their
relevant documents plus evenly spaced others up to `--corpus-docs`, written as a BEIR folder) with the task's
query instruction, and Spearman on the first `--sts-pairs` pairs of STS-B en dev. Records per recipe: the
three backends' scores, the export's self-check cosines (lowest over the probe sets, llm2emb's ONNX backend
and plain ONNX Runtime), fastembed's lowest cosine, graph sizes. Each recipe's results are cached in --work,
so the recipes can run in separate invocations (a short one each on a shared CPU):

    flock /tmp/llm2emb-helper.lock nice -n 10 python bench/onnx_trained_runs.py --work /tmp/onnx-runs \
        --recipes eos-causal

`--use-run eos-causal=study_runs/strategies/runs/eos.seed1` takes a finished run (e.g. a study cell of 80 steps)
instead of training 8 steps; write those records to their own file with --output.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import _common as C  # noqa: E402

SCRIPT = "onnx_trained_runs"
RECIPES = {"eos-causal": ("eos", False), "eos-bidirectional": ("eos", True), "mean-causal": ("mean", False),
           "mean-bidirectional": ("mean", True)}
FASTEMBED_POOLING = {"eos": "LAST_TOKEN", "mean": "MEAN"}
FASTEMBED_SCRIPT = '''
import json, sys
import numpy as np
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType
folder, pooling, dim, texts_file, out_file = sys.argv[1:]
TextEmbedding.add_custom_model(model="local/llm2emb-export", pooling=PoolingType[pooling], normalization=True,
                               sources=ModelSource(hf="local/llm2emb-export"), dim=int(dim),
                               model_file="onnx/model.onnx")
model = TextEmbedding("local/llm2emb-export", specific_model_path=folder)
texts = json.load(open(texts_file, encoding="utf-8"))
np.save(out_file, np.stack(list(model.embed(texts, batch_size=8))))
'''


def prepare_data(work: Path, model: str, args) -> dict:
    """Training data (tokenised), the retrieval sample as a BEIR folder and the STS subset; made once."""
    from llm2emb.data.builtin import build_stdlib_codesearch
    from llm2emb.data.tokenize import prepare
    from onnx_export import retrieval_sample

    info_path = work / "data.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    info = build_stdlib_codesearch(work / "data")
    prepare(model, info["train_dir"], work / "data" / "tokenized", max_seq_length=args.max_length, workers=1,
            progress=False)
    sample = retrieval_sample(Path(info["eval_dir"]), args.queries, args.corpus_docs)
    beir = work / "eval" / "stdlib_sample"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(beir / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, title, body in zip(sample.corpus_ids, sample.corpus_titles, sample.corpus_bodies):
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": body}) + "\n")
    with open(beir / "queries.jsonl", "w", encoding="utf-8") as fh:
        for query_id, text in zip(sample.query_ids, sample.query_texts):
            fh.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    with open(beir / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for query_id, rels in sample.qrels.items():
            for doc_id, score in rels.items():
                fh.write(f"{query_id}\t{doc_id}\t{score}\n")
    lines = (C.SHARED_DATA / "eval" / "stsb_en" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (work / "eval" / "stsb_en_dev.tsv").write_text("\n".join(lines[:args.sts_pairs + 1]) + "\n", encoding="utf-8")
    out = {"tokenized": str(work / "data" / "tokenized"), "retrieval": str(beir),
           "sts": str(work / "eval" / "stsb_en_dev.tsv"), "instruction": info["query_instruction"],
           "queries": len(sample.query_ids), "docs": len(sample.corpus_ids), "sts_pairs": args.sts_pairs,
           "fastembed_texts": sample.query_texts[:8] + sample.corpus_texts[:12]}
    info_path.write_text(json.dumps(out))
    return out


def scores(output: Path) -> dict[str, float]:
    found = {}
    for path in output.rglob("*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "main_score" in record:
            found[record["task"]["name"].rsplit("/", 1)[-1]] = record["metrics"][record["main_score"]]
    return found


def fastembed_cosine(folder: Path, pooling: str, texts: list[str], work: Path) -> float | None:
    """fastembed's vectors (its own venv) against llm2emb's torch vectors of the export: lowest cosine."""
    import numpy as np

    from llm2emb import Embedder
    from llm2emb.model.loading import llm2emb_home

    python = llm2emb_home() / "fastembed-venv" / "bin" / "python"
    if not python.exists():
        print("no fastembed venv (run tests/test_onnx_fastembed.py once to build it): skipped", flush=True)
        return None
    reference = Embedder.from_pretrained(str(folder), precision="fp32").encode(texts)
    (work / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    (work / "fastembed_run.py").write_text(FASTEMBED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(work / "fastembed_run.py"), str(folder), FASTEMBED_POOLING[pooling],
                           str(reference.shape[1]), str(work / "texts.json"), str(work / "fastembed.npy")],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=900)
    if done.returncode:
        raise SystemExit(f"fastembed failed: {done.stderr[-2000:]}")
    got = np.load(work / "fastembed.npy").astype(np.float64)
    ref = reference.astype(np.float64)
    return float(((got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))).min())


def run_recipe(work: Path, name: str, data: dict, args) -> dict:
    from llm2emb.config import load_train_config
    from llm2emb.train import train

    result_path = work / name / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    pooling, bidirectional = RECIPES[name]
    started = time.perf_counter()
    if name in args.use_run:   # a finished run of this recipe (e.g. a study cell): no training here
        run_dir = Path(args.use_run[name])
        saved = json.loads((run_dir / "config.json").read_text())
        saved = saved.get("config", saved)   # a run's config.json keeps the training config under "config"
        if (saved.get("pooling_mode"), bool(saved.get("bi_attn_enabled"))) != (pooling, bidirectional):
            raise SystemExit(f"--use-run {name}={run_dir}: that run is {saved.get('pooling_mode')} pooling, "
                             f"bi_attn_enabled={saved.get('bi_attn_enabled')}, not recipe {name}")
        return finish_recipe(work, name, data, args, run_dir, None)
    cfg = load_train_config(C.ROOT / "configs" / "quickstart.json", [
        f"model_path={args.model}", f"train_data_path={data['tokenized']}", f"output_dir={work / name / 'runs'}",
        f"tb_dir={work / name / 'tb'}", f"experiment_id={name}", f"train_steps={args.steps}",
        "train_batch_size=8", f"max_seq_length={args.max_length}", "query_max_length=32",
        f"passage_max_length={args.max_length}", "checkpointing_steps=0", "warmup_steps=1", "log_interval=1",
        f"pooling_mode={pooling}", f"bi_attn_enabled={str(bidirectional).lower()}", "skip_instruction=false"])
    train(cfg, show_progress=False)
    return finish_recipe(work, name, data, args, cfg.run_dir, time.perf_counter() - started)


def finish_recipe(work: Path, name: str, data: dict, args, run_dir: Path, train_seconds: float | None) -> dict:
    """Export the run with --merge-lora --onnx-int8 auto, evaluate it three ways, load it in fastembed."""
    from llm2emb.cli import main as cli
    from llm2emb.export import backends, export_model
    from llm2emb.export.exporter import ExportCheckError

    result_path = work / name / "result.json"
    pooling, bidirectional = RECIPES[name]
    export = work / name / "export"
    started = time.perf_counter()
    int8_refused = None
    try:
        result = export_model(str(run_dir), export, merge_lora=True, onnx_int8="auto")   # = the CLI's export
    except ExportCheckError as exc:   # the int8 graph missed the self-check: record why, export fp32 only
        if "int8" not in str(exc):
            raise
        int8_refused = str(exc)
        print(f"int8 refused: {exc}", flush=True)
        result = export_model(str(run_dir), export, merge_lora=True, onnx=True)
    export_seconds = time.perf_counter() - started
    int8 = backends.int8_file(backends.resolve_int8_config("auto"))
    tasks = f"{data['retrieval']},{data['sts']}"
    got = {}
    backends_run = [("torch-fp32", ["--precision", "fp32"]), ("onnx-fp32", ["--backend", "onnx"])]
    if int8_refused is None:
        backends_run.append(("onnx-int8", ["--backend", "onnx", "--onnx-file", int8]))
    for backend, extra in backends_run:
        output = work / name / "eval" / backend
        code = cli(["eval", "--model", str(export), "--tasks", tasks, "--no-cache", "--no-progress",
                    "--query-instruction", data["instruction"], "--batch-size", "16",
                    "--max-length", str(args.max_length), "--output", str(output), *extra])
        if code:
            raise SystemExit(f"llm2emb eval --model {export} ({backend}) failed")
        got[backend] = scores(output)
    out = {"recipe": name, "pooling": pooling, "bidirectional": bidirectional, "scores": got,
           "export_min_cosine": {k: result.onnx[k]["min_cosine"] for k in ("fp32", "int8") if k in result.onnx},
           "megabytes": {k: result.onnx[k]["megabytes"] for k in ("fp32", "int8") if k in result.onnx},
           "int8": ({k: result.onnx["int8"].get(k) for k in ("config", "fp32_linears", "reduce_range")}
                    if "int8" in result.onnx else {"refused": int8_refused}),
           "fastembed_min_cosine": fastembed_cosine(export, pooling, data["fastembed_texts"], work / name),
           "run": str(run_dir), "train_seconds": None if train_seconds is None else round(train_seconds, 1),
           "export_seconds": round(export_seconds, 1)}
    result_path.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", required=True, help="folder for data, runs, exports and per-recipe results")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--corpus-docs", type=int, default=150)
    parser.add_argument("--sts-pairs", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--use-run", action="append", default=[], metavar="RECIPE=RUN_DIR",
                        help="take this finished run for RECIPE instead of training one (repeatable)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/onnx_trained_runs.json)")
    args = parser.parse_args(argv)
    args.use_run = dict(item.split("=", 1) for item in args.use_run)
    C.set_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args.model, args)
    for name in args.recipes:
        out = run_recipe(work, name, data, args)
        print(json.dumps(out), flush=True)
    done = [json.loads((work / n / "result.json").read_text()) for n in RECIPES if (work / n / "result.json").exists()]
    records = []
    for res in done:
        tag = res["recipe"]
        for task, label in (("stdlib_sample", "stdlib code search nDCG@10"), ("stsb_en_dev", "STS-B en dev Spearman")):
            base = res["scores"]["torch-fp32"].get(task)
            for backend, values in res["scores"].items():
                records.append(C.record(f"{label} [{tag}, {backend}]", label.rsplit(" ", 1)[1], values.get(task), base))
        for kind, value in res["export_min_cosine"].items():
            records.append(C.record(f"export self-check min cosine [{tag}, onnx-{kind}]", "cosine", value, digits=6))
        records.append(C.record(f"fastembed min cosine to llm2emb torch [{tag}]", "cosine",
                                res["fastembed_min_cosine"], digits=6))
    records.append(C.meta_record(script=SCRIPT, model=args.model, steps=args.steps, use_run=args.use_run, max_length=args.max_length,
                                 threads=args.threads, data={k: v for k, v in data.items() if k != "fastembed_texts"},
                                 runs={r["recipe"]: {k: r.get(k) for k in ("run", "megabytes", "int8", "train_seconds",
                                                                           "export_seconds")} for r in done},
                                 note="theirs = torch fp32 of the same export; eval with --no-cache"))
    path = C.save_results(SCRIPT, records, args.output)
    print(C.markdown_table(records, ours_label="value", theirs_label="torch fp32"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
