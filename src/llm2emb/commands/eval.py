"""`llm2emb eval`: evaluate a model on local retrieval / STS / pair tasks or MTEB tasks; one JSON per task.

    llm2emb eval --model smollm2-135m --pooling mean --tasks data/scifact_mini,data/stsb_en/dev.tsv --limits 100
    llm2emb eval --config configs/config.f2llm.json --ckpt runs/f2llm/checkpoints/step_1000 --tasks T2Retrieval \\
        --limits 500 --query-instruction "Instruct: 检索相关段落。\\nQuery: "
"""
from __future__ import annotations

import argparse
import logging
import os
import re

from llm2emb.commands import add_end_token_argument
from llm2emb.commands._args import add_dry_run_argument
from llm2emb.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "eval_results"
SUMMARY_METRICS = {"ndcg_at_10": "nDCG@10", "mrr_at_10": "MRR@10", "recall_at_100": "Recall@100",
                   "cosine_spearman": "Spearman", "max_ap": "max AP"}


def unescape(text: str | None) -> str | None:
    r"""Turn the two-character escapes \n, \t and \\ into the characters (shells pass them literally)."""
    if text is None:
        return None
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def add_parser(subparsers) -> None:
    from llm2emb.eval.tasks import TASK_KINDS

    kinds = "; ".join(f"{k.name}: {k.description}" for k in TASK_KINDS.values())
    p = subparsers.add_parser(
        "eval", help="evaluate a model on retrieval / STS / pair tasks or MTEB tasks",
        description="Evaluate a model; writes one result JSON per task and prints a summary table. The seed "
                    "scripts' spellings --ckpt_dir, --query_instruction, --batch_size, --output_folder also work. "
                    f"Task kinds ({kinds}). Prefix 'KIND:' to force a kind.")
    p.add_argument("--model", "-m", help="built-in alias, hub id, model folder, .gguf, saved Embedder, training run or "
                                   "checkpoint folder, sentence-transformers folder, st:<hub id>, or "
                                   "mteb:<name> (mteb's own implementation, for MTEB tasks)")
    p.add_argument("--config", "-c", help="training config (JSON/YAML): pooling_mode, bi_attn_enabled, skip_instruction, "
                                    "instruction_separator, max_seq_length, attn_implementation, model_path")
    p.add_argument("--ckpt", "--ckpt_dir", dest="ckpt", help="checkpoint folder with the weights")
    p.add_argument("--tasks", required=True, help="comma-separated task folders, files or MTEB task names")
    p.add_argument("--limits", type=int, help="evaluate N queries per retrieval task (seeded draw; the whole "
                                              "corpus is kept), as the seed's limits=500")
    p.add_argument("--seed", type=int, default=42, help="seed of the --limits draw (default 42)")
    p.add_argument("--query-instruction", "--query_instruction", dest="query_instruction",
                   help="prepended to retrieval queries only; \\n in it becomes a newline")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="tokens per text including EOS (default: the model's)")
    p.add_argument("--index", default="exact",
                   help="dense retrieval search: exact (default), faiss-flat, or faiss-hnsw (approximate, for large "
                        "corpora; pip install 'llm2emb[index]')")
    p.add_argument("--dim", type=int, help="truncate embeddings to D dimensions (Matryoshka), then normalise")
    p.add_argument("--pooling", help="pooling override: eos, mean, weighted_mean, ...")
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None,
                   help="bidirectional attention on/off (default: the model's or config's)")
    p.add_argument("--skip-instruction", action=argparse.BooleanOptionalAction, default=None,
                   help="exclude the instruction prefix from pooling")
    add_end_token_argument(p)
    p.add_argument("--split", help="qrels split of local retrieval folders (default test, then dev)")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--precision", type=str.lower, choices=("auto", "fp32", "bf16", "fp16"),
                   help="encode precision of llm2emb models: autocast on the weights; auto = bf16 where the device "
                        "computes it natively (CUDA with bf16, CPUs with AVX512_BF16 / AMX), else fp32; fp16 needs "
                        "CUDA (default: auto; fp32 gives vectors that are bit-stable across machines); what it "
                        "resolves to is recorded in the result and is part of the embedding cache key")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch (default) or onnx: evaluate the ONNX graph of an `llm2emb export --onnx` folder "
                        "(ONNX Runtime, CPU); part of the embedding cache key with the graph file's hash")
    p.add_argument("--onnx-file", default=None, metavar="FILE",
                   help="with --backend onnx: the graph inside the folder (default onnx/model.onnx)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--name", help="row label in reports (default: model name and pooling)")
    p.add_argument("--output", "-o", "--output_folder", dest="output", default=DEFAULT_OUTPUT,
                   help=f"folder for result JSON files (default {DEFAULT_OUTPUT})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the corpus embedding cache")
    p.add_argument("--cache-dir", help="corpus embedding cache (default $LLM2EMB_HOME/cache/embeddings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dry_run_argument(p, "the arguments, every task and the model reference (its folder's files, not its "
                            "weights)")
    p.set_defaults(func=run)


def _device(requested: str | None) -> str:
    if requested:
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from llm2emb.eval.encoders import as_encoder
    from llm2emb.eval.loading import load_eval_model
    from llm2emb.eval.report import markdown_table
    from llm2emb.eval.evaluate import evaluate_tasks
    from llm2emb.eval.search import SEARCHERS
    from llm2emb.eval.tasks import TaskOptions, resolve_task, split_task_list

    if args.limits is not None and args.limits < 1:
        raise UserError(f"--limits must be a positive number of queries, got {args.limits}.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2 (one token plus EOS), got {args.max_length}.")
    if args.index not in SEARCHERS:
        raise UserError(f"--index {args.index!r} is not a search index; choose one of: {', '.join(SEARCHERS)}."
                        + did_you_mean(str(args.index), SEARCHERS))
    if args.dim is not None and args.dim < 1:
        raise UserError(f"--dim must be a positive number of dimensions, got {args.dim}.")
    tasks = [resolve_task(spec) for spec in split_task_list(args.tasks)]  # bad task names fail before loading
    from llm2emb.model.precision import ENCODE_DEFAULT, encode_setting, resolve_precision

    resolve_precision(encode_setting(args.precision), _device(args.device))  # fp16 on a CPU fails before loading
    if args.dry_run:
        return dry_run(args, tasks)
    from llm2emb.eval.distributed import finish, join_process_group

    # started by accelerate launch / torchrun with N processes: corpus and queries are encoded in N shards
    rank, world = join_process_group()
    device = _device(args.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    loaded = load_eval_model(args.model, config=args.config, ckpt=args.ckpt, pooling=args.pooling,
                             bidirectional=args.bidirectional, skip_instruction=args.skip_instruction,
                             max_length=args.max_length, dtype=args.dtype, device=device, dim=args.dim,
                             end_token=args.end_token, precision=args.precision, default_precision=ENCODE_DEFAULT,
                             backend=args.backend, onnx_file=args.onnx_file)
    if loaded.kind == "mteb":  # mteb's own implementation of a published model: MTEB tasks only
        wrong = [t.name for t in tasks if t.kind.name not in ("mteb", "mteb-local")]
        if wrong:
            raise UserError(f"{loaded.source} is an mteb model and runs on MTEB tasks only (a task name, or "
                            f"mteb-local:FOLDER), not on {', '.join(wrong)}.")
        encoder = loaded.model
        fingerprint = f"mteb:{loaded.model.name}@{loaded.model.revision}"
        describe = {"kind": "mteb", "base_model": loaded.model.name, "revision": loaded.model.revision}
    else:
        encoder = as_encoder(loaded.model, dim=args.dim, name=loaded.source)
        fingerprint = encoder.fingerprint()
        describe = encoder.describe()
        if loaded.kind == "llm2emb" and args.backend == "torch":  # what auto resolved to on this machine
            describe["precision"] = loaded.model.compute_precision().name
    cache = False if args.no_cache else (args.cache_dir or True)
    options = TaskOptions(limits=args.limits, seed=args.seed, query_instruction=unescape(args.query_instruction),
                          batch_size=args.batch_size, max_length=args.max_length, dim=args.dim, split=args.split,
                          cache=cache, show_progress=not args.no_progress, index=args.index)
    label = args.name or loaded.label
    model_info = {"source": loaded.source, "kind": loaded.kind, "fingerprint": fingerprint, **describe,
                  "overrides": loaded.settings}
    summary: list[list[str]] = []
    records = evaluate_tasks(encoder, tasks, options, label=label, model_info=model_info,
                             config_path=loaded.config_path, output_dir=args.output if rank == 0 else None)
    finish()
    if rank != 0:
        return 0   # the main process writes and prints the results
    for record in records:
        metrics, main_score = record["metrics"], record["main_score"]
        main = metrics.get(main_score)
        extras = ", ".join(f"{name} {metrics[key]:.5f}" for key, name in SUMMARY_METRICS.items()
                           if key in metrics and key != main_score)
        summary.append([record["task"]["name"], main_score, "" if main is None else f"{main:.5f}", extras,
                        f"{record['seconds']['total']:.1f}", record["path"]])
    print(f"model: {label}")
    print(markdown_table(["task", "main score", "value", "other", "seconds", "result file"], summary))
    return 0


def dry_run(args: argparse.Namespace, tasks) -> int:
    """Print the model eval would load, each task with the result file it would write (and whether one is
    there already, to be replaced), and the embedding cache it would use; load no weights, write nothing."""
    from pathlib import Path

    from llm2emb.eval.cache import default_cache_dir
    from llm2emb.eval.loading import plan_eval_model
    from llm2emb.eval.results import slug

    plan = plan_eval_model(args.model, config=args.config, ckpt=args.ckpt, pooling=args.pooling,
                           bidirectional=args.bidirectional, skip_instruction=args.skip_instruction,
                           max_length=args.max_length, dtype=args.dtype, dim=args.dim, end_token=args.end_token,
                           precision=args.precision, backend=args.backend, onnx_file=args.onnx_file)
    if plan.kind == "mteb":
        wrong = [t.name for t in tasks if t.kind.name not in ("mteb", "mteb-local")]
        if wrong:
            raise UserError(f"{plan.source} is an mteb model and runs on MTEB tasks only (a task name, or "
                            f"mteb-local:FOLDER), not on {', '.join(wrong)}.")
    label = args.name or plan.label
    output = Path(args.output).expanduser()
    print(f"dry run: would evaluate {plan.describe} as {label!r} on {len(tasks)} task(s)"
          + (f", {args.limits} queries per retrieval task (seed {args.seed})" if args.limits else ""))
    for task in tasks:
        path = output / f"{slug(task.name)}__{slug(label)}.json"
        state = "exists, would be replaced" if path.exists() else "new"
        print(f"  {task.name} ({task.kind.name}, {task.target}) -> {path} ({state})")
    if args.no_cache or plan.kind == "mteb":
        print("  corpus embedding cache: not used")
    else:
        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        print(f"  corpus embedding cache of retrieval tasks: {cache} (entries are keyed by the weights' "
              "fingerprint, so whether one applies is known only once the model is loaded)")
    print("nothing loaded or written")
    return 0
