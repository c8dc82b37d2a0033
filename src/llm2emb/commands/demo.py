"""`llm2emb demo` (`make demo`): the whole pipeline, offline, in 10-20 minutes on two CPU cores (matmul-bound).

1. build the built-in standard-library code-search task (docstring -> function; held-out packages for eval)
2. tokenise its training split for the model (`llm2emb prepare`)
3. evaluate the base model on the held-out split (nDCG@10, MRR@10, Recall@10)
4. train a LoRA adapter with the quickstart recipe (configs/quickstart.json)
5. evaluate the trained model, print a before/after table, write demo_results.json and demo_results.png

Every stage is reused when it is already done with the same settings, so a second `make demo` only prints
the table; an interrupted training run resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from llm2emb.commands import add_set_argument
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# The quickstart recipe, identical to configs/quickstart.json (a test keeps the two in sync). A plain
# torch + peft prototype of it reached nDCG@10 0.531 from 0.063 in 80 steps (docs/contracts.md).
DEMO_RECIPE: dict[str, Any] = {
    "num_hard_neg": 0, "max_seq_length": 160, "query_max_length": 64, "passage_max_length": 160,
    "validation_fraction": 0.0, "train_batch_size": 16, "train_steps": 80, "checkpointing_steps": 20,
    "save_total_limit": 1, "validation_steps": 0, "log_interval": 5, "learning_rate": 3e-4, "min_lr": 0.0,
    "weight_decay": 0.0, "warmup_steps": 5, "lr_scheduler": "linear", "temperature": 0.05, "seed": 42,
    "lora_enabled": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": ["all-linear"],
    "bi_attn_enabled": False, "attn_implementation": "sdpa", "pooling_mode": "mean", "skip_instruction": True,
    "instruction_separator": "Query:", "gradient_checkpointing": False,
}
QUICK_STEPS = 20
METRICS = (("ndcg_at_10", "nDCG@10"), ("mrr_at_10", "MRR@10"), ("recall_at_10", "Recall@10"))
RESULTS_JSON = "demo_results.json"
RESULTS_PNG = "demo_results.png"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo: prepare, evaluate, train with LoRA, evaluate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "-o", default="demo_runs", help="folder for data, run and results (default demo_runs)")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"base LLM (default {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {DEMO_RECIPE['train_steps']}; --quick: {QUICK_STEPS})")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} training steps and 200 evaluation queries: a smoke test of a few minutes")
    p.add_argument("--eval-limits", type=int, default=None, metavar="N",
                   help="evaluate on N sampled held-out queries (default: all; --quick: 200)")
    add_set_argument(p, help="override training config fields, as in `llm2emb train` (--set a=1 b=2 or --set repeated)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training and encoding)")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------- stages
def build_data(out: Path) -> dict[str, Any]:
    from llm2emb.data.builtin import build_stdlib_codesearch

    return build_stdlib_codesearch(out / "data")


def prepare_data(model: str, train_dir: Path, out: Path, max_seq_length: int) -> Path:
    from llm2emb.data.tokenize import prepare
    from llm2emb.model.loading import BUILTIN_MODELS

    name = model if model in BUILTIN_MODELS else Path(model).name or "model"
    target = out / "data" / f"tokenized-{name}"
    prepare(model, train_dir, target, max_seq_length=max_seq_length, progress=False)
    return target


def evaluate(model_dir: str | Path, task_dir: Path, instruction: str, limits: int | None, max_length: int,
             show_progress: bool = True, **embedder_kwargs: Any) -> dict[str, Any]:
    """Retrieval metrics of one model on the held-out split, with the time it took."""
    from llm2emb import Embedder
    from llm2emb.eval.retrieval import evaluate_retrieval

    started = time.perf_counter()
    embedder = Embedder.from_pretrained(model_dir, **embedder_kwargs)
    metrics = evaluate_retrieval(embedder, task_dir, limits=limits, query_instruction=instruction,
                                 batch_size=32, max_length=max_length, show_progress=show_progress)
    return {"metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}


def _cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def results_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", *[label for _, label in METRICS], "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], *[f"{row['metrics'].get(key, float('nan')):.3f}" for key, _ in METRICS], row["time"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(path: Path, base: dict[str, float], trained: dict[str, float], losses: list[tuple[int, float]],
                 title: str) -> Path:
    """Left: training loss per logged step; right: base vs trained bars for the table's metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        ax_loss.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
    ax_loss.set(xlabel="step", ylabel="training loss", title="InfoNCE loss")
    xs = range(len(METRICS))
    width = 0.38
    ax_bar.bar([x - width / 2 for x in xs], [base.get(k, 0) for k, _ in METRICS], width, label="base")
    ax_bar.bar([x + width / 2 for x in xs], [trained.get(k, 0) for k, _ in METRICS], width, label="trained")
    ax_bar.set_xticks(list(xs), [label for _, label in METRICS])
    ax_bar.set(ylim=(0, 1), title="held-out stdlib code search")
    ax_bar.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from llm2emb.config import load_train_config
    from llm2emb.train.metrics import METRICS_FILE
    from llm2emb.atomic import write_json_atomic
    from llm2emb.train.trainer import train

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}.")
    out = Path(args.output).expanduser()
    steps = args.steps or (QUICK_STEPS if args.quick else DEMO_RECIPE["train_steps"])
    limits = args.eval_limits if args.eval_limits is not None else (200 if args.quick else None)
    t0 = time.perf_counter()

    print(f"[1/5] building the standard-library code-search task in {out / 'data'}", flush=True)
    info = build_data(out)
    task_dir, instruction = Path(info["eval_dir"]), info["query_instruction"]
    print(f"      {info['train_rows']} training pairs, {info['eval_queries']} held-out queries", flush=True)

    recipe = {**DEMO_RECIPE, "train_steps": steps, "checkpointing_steps": min(DEMO_RECIPE["checkpointing_steps"], steps)}
    print(f"[2/5] tokenising the training split for {args.model}", flush=True)
    tokenized = prepare_data(args.model, Path(info["train_dir"]), out, recipe["max_seq_length"])

    slug = Path(args.model).name if args.model not in ("", ".") else "model"
    cfg = load_train_config(None, args.overrides, **{
        **recipe, "model_path": args.model, "train_data_path": str(tokenized), "output_dir": str(out / "runs"),
        "tb_dir": str(out / "tensorboard"), "experiment_id": f"quickstart-{slug}-{steps}steps"})
    eval_kwargs = dict(pooling=cfg.pooling_mode, skip_instruction=cfg.skip_instruction,
                       instruction_separator=cfg.instruction_separator)
    max_length = cfg.passage_length

    print(f"[3/5] evaluating the base model ({cfg.pooling_mode} pooling) on the held-out split", flush=True)
    base_key = {"model": args.model, "task": str(task_dir), "limits": limits, "max_length": max_length,
                "instruction": instruction, **eval_kwargs}
    base_path = out / "eval" / f"base-{slug}.json"
    base = _cached(base_path, base_key)
    if base is None:
        base = {"key": base_key, **evaluate(args.model, task_dir, instruction, limits, max_length,
                                            show_progress=not args.no_progress, **eval_kwargs)}
        write_json_atomic(base_path, base)
    print(f"      nDCG@10 {base['metrics']['ndcg_at_10']:.3f} ({_fmt_seconds(base['seconds'])})", flush=True)

    print(f"[4/5] training LoRA r{cfg.lora_r} for {cfg.train_steps} steps (batch {cfg.train_batch_size}) -> "
          f"{cfg.run_dir}", flush=True)
    result = train(cfg, show_progress=not args.no_progress)
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text(encoding="utf-8"))

    print("[5/5] evaluating the trained model", flush=True)
    trained_key = {**base_key, "model": str(cfg.run_dir / "final"), "trained_seconds": summary["train_seconds"]}
    trained_path = cfg.run_dir / "eval" / "stdlib_code.json"
    trained = _cached(trained_path, trained_key)
    if trained is None:
        trained = {"key": trained_key, **evaluate(cfg.run_dir / "final", task_dir, instruction, limits, max_length,
                                                  show_progress=not args.no_progress)}
        write_json_atomic(trained_path, trained)

    rows = [
        {"label": f"{args.model} (base, {cfg.pooling_mode} pooling)", "metrics": base["metrics"],
         "time": f"eval {_fmt_seconds(base['seconds'])}"},
        {"label": f"+ LoRA r{cfg.lora_r}, {cfg.train_steps} steps", "metrics": trained["metrics"],
         "time": f"train {_fmt_seconds(summary['train_seconds'])} + eval {_fmt_seconds(trained['seconds'])}"},
    ]
    table = results_table(rows)
    losses = []
    metrics_file = cfg.run_dir / METRICS_FILE
    if metrics_file.exists():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("type") == "train" and record.get("loss") is not None:
                losses.append((record["step"], record["loss"]))
    results = {
        "model": args.model, "task": "stdlib_code (held-out packages)", "eval_dir": str(task_dir),
        "eval_queries": limits or info["eval_queries"], "train_rows": info["train_rows"],
        "steps": cfg.train_steps, "train_batch_size": cfg.train_batch_size,
        "train_seconds": summary["train_seconds"], "samples_per_second": summary["samples_per_second"],
        "run_dir": str(cfg.run_dir), "final_model": str(result.final_dir),
        "base": {"metrics": base["metrics"], "eval_seconds": base["seconds"]},
        "trained": {"metrics": trained["metrics"], "eval_seconds": trained["seconds"]},
        "config": cfg.to_dict(), "table": table, "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / RESULTS_JSON, results)
    written = [out / RESULTS_JSON]
    if not args.no_plot:
        written.append(plot_results(out / RESULTS_PNG, base["metrics"], trained["metrics"], losses,
                                    f"{args.model}: base vs LoRA ({cfg.train_steps} steps)"))
    print()
    print(table)
    print()
    print(f"wrote {', '.join(str(p) for p in written)}; the trained model is {result.final_dir} "
          "(load it with Embedder.from_pretrained).")
    return 0
