"""Helpers shared by the training tests (no tests here): a small synthetic raw dataset in the F2LLM layout,
prepared with `llm2emb.data.tokenize.prepare`, and shortcuts to run the trainer."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SEED_CONFIGS = ("config.f2llm.json", "config.mrl_spread.json", "config.mrl_spread.bi_mean.json",
                "config.mrl_spread.lora.bi_mean.json")

_SUBJECTS = ["sorting", "hashing", "parsing", "caching", "logging", "routing", "testing", "encoding", "merging",
             "scaling", "tracing", "linking", "packing", "mapping", "queueing", "locking"]
_OBJECTS = ["lists", "files", "dates", "tokens", "graphs", "images", "tables", "strings", "events", "urls"]


def write_raw_data(folder: Path, retrieval_rows: int = 48, classification_rows: int = 24, k: int = 3) -> Path:
    """Two raw datasets: `facts` (retrieval, k hard negatives) and `labels` (classification, 1 negative),
    plus a manifest with an instruction, so both loss paths (in-batch and hard-only) are exercised."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    passages = [f"{s} {o} is done by the {o[:-1]} {s} module in step {i}."
                for i, (s, o) in enumerate((s, o) for s in _SUBJECTS for o in _OBJECTS)]
    rows = []
    for i in range(retrieval_rows):
        j = rng.randrange(len(passages))
        row = {"query": f"how are {passages[j].split(' is ')[0]} handled?", "passage": passages[j]}
        for n in range(1, k + 1):
            row[f"negative_{n}"] = passages[(j + 7 * n) % len(passages)]
        rows.append(row)
    pd.DataFrame(rows).to_parquet(folder / "facts.parquet")
    labels = ["positive review", "negative review"]
    rows = []
    for i in range(classification_rows):
        y = i % 2
        rows.append({"query": f"the {rng.choice(_OBJECTS)} were {'great' if y == 0 else 'awful'} today",
                     "passage": labels[y], "negative_1": labels[1 - y]})
    pd.DataFrame(rows).to_parquet(folder / "labels.parquet")
    (folder / "manifest.json").write_text(json.dumps({
        "facts": {"type": "retrieval", "instruction": "Instruct: find the module.\nQuery: "},
        "labels": {"type": "classification", "instruction": "Instruct: classify the review.\nQuery: "}}))
    return folder


def prepare_data(model_dir: Path, raw: Path, out: Path, max_seq_length: int = 48) -> Path:
    from llm2emb.data.tokenize import prepare

    prepare(str(model_dir), raw, out, max_seq_length=max_seq_length, workers=1, progress=False)
    return out


def quick_overrides(model: Path, data: Path, out: Path, experiment: str = "exp", steps: int = 4,
                    **extra) -> list[str]:
    """--set values that make any config a few-second CPU run on a tiny model."""
    values = {"model_path": str(model), "train_data_path": str(data), "output_dir": str(out / "runs"),
              "tb_dir": str(out / "tb"), "experiment_id": experiment, "train_steps": steps,
              "train_batch_size": 4, "num_hard_neg": 2, "max_seq_length": 32, "checkpointing_steps": 2,
              "validation_steps": 2, "log_interval": 1, "warmup_steps": 1, "validation_fraction": 0.2,
              # fp32: `auto` picks bf16 on CPUs with AVX512_BF16, and runs compared for equality (one vs two
              # processes, resumed vs uninterrupted) would then differ by bf16 rounding, not by their logic.
              "precision": "fp32", **extra}
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainable_state(final_dir: Path) -> dict:
    """The weights a final/ folder stores (adapter or full model), as tensors by name."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(final_dir).glob("*.safetensors")):
        state.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return state


def rewind_to_checkpoint(run_dir: Path, last_step: int) -> None:
    """Make a finished run look killed right after its checkpoint of an earlier step: drop the final model,
    the summary and the checkpoint of `last_step` (the end), so the next `train` resumes."""
    for name in ("final", "train_summary.json"):
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(run_dir / "checkpoints" / f"step_{last_step}", ignore_errors=True)
