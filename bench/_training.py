"""The two training stacks the benchmarks compare, set up identically:

* **ours**: llm2emb's own trainer (`llm2emb.train.Trainer`: MultiTaskBatcher with length grouping, queries /
  positives / negatives each in their own padded forward pass, F2LLM InfoNCE loss with in-batch and hard
  negatives), on data written by `llm2emb prepare`.
* **theirs**: `SentenceTransformerTrainer` with `MultipleNegativesRankingLoss` (scale = 1 / temperature: the
  same temperature), its default random batch sampler (per dataset, proportional), the same LoRA applied
  with `peft.get_peft_model` to the underlying transformers model (ST's `add_adapter` needs a newer peft),
  the same pooling, and the same token ids (chat template off, EOS appended; see `_common`).

Same model, rows, batch size, hard negatives per row, max length, optimiser (AdamW, weight decay on
matrices, gradient clipping 1.0), learning-rate schedule (linear warmup, linear decay to 0), seed, precision
and threads. Both record per optimizer step the wall-clock time at its end and the token lengths of every
sequence it encoded, so throughput is measured over the same steps on both sides (after warm-up).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as C

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainSettings:
    model_dir: str
    variant: str = "lora"               # lora | full
    batch_size: int = 16
    num_hard_neg: int = 1
    max_length: int = 256
    pooling: str = "mean"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    steps: int = 4
    temperature: float = 0.05
    seed: int = 42
    dtype: str = "float32"              # bfloat16: fp32 weights, bf16 autocast (mixed precision) on both sides
    device: str = "cpu"
    threads: int = 2
    gradient_checkpointing: bool = False  # both sides (non-reentrant): same math, less memory, slower
    grad_cache: int = 0                 # > 0: ours grad_cache_chunk_size, theirs CachedMNRL(mini_batch_size=...)
    attn_implementation: str = "sdpa"   # both sides; theirs runs what a plain torch install can (varlen -> sdpa)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # out of the box: each library's own defaults for what the user did not choose -- ours precision auto (bf16
    # where the CPU computes it), theirs SentenceTransformer(model_dir) as it loads (its tokenisation, fp32)
    ootb: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepLog:
    """What one training run measured."""

    step_end: list[float] = field(default_factory=list)      # perf_counter() after each optimizer step
    lengths: list[list[int]] = field(default_factory=list)   # per step: unpadded length of every sequence
    padded: list[int] = field(default_factory=list)          # per step: tokens computed incl. padding
    samples: list[int] = field(default_factory=list)         # per step: rows (query + positive [+ negatives])

    def window(self, warmup: int) -> dict[str, Any]:
        """Totals over steps warmup+1 .. end (the time from the end of step `warmup` to the last step's end)."""
        n = len(self.step_end)
        if n <= warmup:
            raise RuntimeError(f"only {n} steps ran; need more than {warmup} warm-up steps")
        steps = range(warmup, n)
        return {"seconds": self.step_end[-1] - self.step_end[warmup - 1] if warmup > 0 else
                self.step_end[-1] - self.started,
                "steps": n - warmup,
                "samples": sum(self.samples[i] for i in steps),
                "real_tokens": sum(sum(self.lengths[i]) for i in steps),
                "padded_tokens": sum(self.padded[i] for i in steps),
                "lengths": [x for i in steps for x in self.lengths[i]]}

    started: float = 0.0


def _set_precision_env(settings: TrainSettings) -> None:
    # Our trainer takes its precision from the config (`our_config`: precision); accelerate's env setting
    # stays for anything else that builds an Accelerator in the worker.
    if settings.dtype == "bfloat16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    elif settings.dtype == "float16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "fp16"
    if settings.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


# ---------------------------------------------------------------------------------------------- data
def prepare_data(model_dir: str, raw_files: list[Path], out_dir: Path, max_length: int) -> Path:
    """`llm2emb prepare` of `raw_files` (F2LLM parquet) into `out_dir` (no instructions: plain texts)."""
    from llm2emb.data.tokenize import prepare

    raw = out_dir.parent / f"{out_dir.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in raw_files:
        link = raw / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    prepare(model_dir, raw, out_dir, max_seq_length=max_length, workers=1, progress=False)
    return out_dir


def st_dataset(raw_file: Path, num_hard_neg: int, seed: int):
    """A sentence-transformers dataset (anchor, positive[, negative]) of one F2LLM parquet. The negative of a
    row is one of its k negatives, drawn with a seeded generator (llm2emb's batcher draws per row too)."""
    import numpy as np
    import pandas as pd
    from datasets import Dataset

    frame = pd.read_parquet(raw_file)
    negatives = sorted((c for c in frame.columns if c.startswith("negative_")), key=lambda c: int(c.split("_")[1]))
    data = {"anchor": frame["query"].tolist(), "positive": frame["passage"].tolist()}
    if negatives and num_hard_neg > 0:
        if num_hard_neg != 1:
            raise SystemExit("the sentence-transformers side supports 1 hard negative per row (one column)")
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(negatives), size=len(frame))
        values = frame[negatives].to_numpy()
        data["negative"] = [values[i, j] for i, j in enumerate(pick)]
    return Dataset.from_dict(data)


def check_st_tokens(st_model, prepared_dir: Path, raw_files: list[Path], num_hard_neg: int, seed: int,
                    max_length: int) -> int:
    """Every text the ST side trains on is tokenised by ST exactly as llm2emb prepared it; returns the count."""
    import pyarrow.parquet as pq

    from llm2emb.model.tokenization import encode_texts

    checked = 0
    for raw in raw_files:
        ds = st_dataset(raw, num_hard_neg, seed)
        table = pq.read_table(prepared_dir / f"{raw.stem}.parquet")
        prepared_queries = table.column("query_input_ids").to_pylist()
        prepared_passages = table.column("passage_input_ids").to_pylist()
        for column, prepared in (("anchor", prepared_queries), ("positive", prepared_passages)):
            theirs = []
            texts = ds[column]
            for start in range(0, len(texts), 256):
                theirs.extend(C.st_token_ids(st_model, texts[start:start + 256]))
            if theirs != [list(x) for x in prepared]:
                bad = next(i for i, (a, b) in enumerate(zip(theirs, prepared)) if list(a) != list(b))
                raise SystemExit(f"{raw.name} row {bad} {column}: sentence-transformers tokens differ from "
                                 f"llm2emb prepare's ({len(theirs[bad])} vs {len(prepared[bad])} tokens)")
            checked += len(texts)
        if "negative" in ds.column_names:  # sampled per row: compare against the rule prepare uses
            texts = ds["negative"]
            ours = encode_texts(st_model[0].tokenizer, texts, max_length).input_ids
            theirs = []
            for start in range(0, len(texts), 256):
                theirs.extend(C.st_token_ids(st_model, texts[start:start + 256]))
            if theirs != ours:
                raise SystemExit(f"{raw.name}: sentence-transformers tokenises negatives differently from llm2emb")
            checked += len(texts)
    return checked


# ---------------------------------------------------------------------------------------------- ours
def our_config(settings: TrainSettings, data_dir: Path, out_dir: Path):
    from llm2emb.config import load_train_config

    lora = settings.variant == "lora"
    return load_train_config(
        None, model_path=settings.model_dir, experiment_id="bench", train_data_path=str(data_dir),
        output_dir=str(out_dir), tb_dir=str(out_dir / "tb"), num_hard_neg=settings.num_hard_neg,
        max_seq_length=settings.max_length, validation_fraction=0.0, length_grouping=True,
        train_batch_size=settings.batch_size, train_steps=settings.steps, checkpointing_steps=0,
        validation_steps=0, log_interval=max(1, settings.steps), learning_rate=settings.learning_rate,
        min_lr=0.0, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps,
        lr_scheduler="linear", max_grad_norm=1.0, seed=settings.seed, temperature=settings.temperature,
        lora_enabled=lora, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, lora_target_modules=list(settings.lora_targets),
        attn_implementation=settings.attn_implementation,
        gradient_checkpointing=settings.gradient_checkpointing, grad_cache_chunk_size=settings.grad_cache,
        # explicit, never auto: a bench compares like with like on any machine (except out of the box)
        precision="auto" if settings.ootb else C.PRECISION_OF_DTYPE[settings.dtype],
        **({} if settings.ootb else {"pooling_mode": settings.pooling}))   # out of the box: llm2emb's default


def train_ours(settings: TrainSettings, data_dir: Path, out_dir: Path, keep_model: bool = False):
    """Train with llm2emb's Trainer; returns (StepLog, Embedder of the trained model or None)."""
    _set_precision_env(settings)
    C.set_threads(settings.threads)
    from llm2emb.train import Trainer
    from llm2emb.train.encode import truncate

    cfg = our_config(settings, data_dir, out_dir)
    trainer = Trainer(cfg, show_progress=False)
    log = StepLog()
    step = trainer._train_step

    def timed_step(batch, running):
        step(batch, running)
        C.synchronize(settings.device)
        log.step_end.append(time.perf_counter())
        sides = [batch.query_ids, batch.passage_ids]
        if batch.negative_ids and batch.num_negatives:
            sides.append(batch.negative_ids)
        limits = [cfg.query_length, cfg.passage_length, cfg.passage_length]
        lengths, padded = [], 0
        for ids, limit in zip(sides, limits):
            side = [len(truncate(x, limit)) for x in ids]
            lengths += side
            padded += max(side) * len(side)
        log.lengths.append(lengths)
        log.padded.append(padded)
        log.samples.append(len(batch.query_ids))

    trainer._train_step = timed_step  # the real step of the real loop, timed from outside
    log.started = time.perf_counter()
    trainer.train()
    embedder = trainer.embedder if keep_model else None
    if embedder is not None:
        embedder.eval()
    return log, embedder


# ---------------------------------------------------------------------------------------------- theirs
def build_st_for_training(settings: TrainSettings):
    """SentenceTransformer (fp32 weights) with the same LoRA as ours when variant == lora; out of the box: the
    model as `SentenceTransformer(model_dir)` builds it (its own tokenisation and pooling), max length set."""
    if settings.ootb:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(settings.model_dir, device=settings.device)
        model.max_seq_length = settings.max_length
    else:
        from llm2emb.model.attention import portable_attn_implementation

        attn = portable_attn_implementation(settings.attn_implementation)
        model = C.build_sentence_transformer(settings.model_dir, settings.pooling, settings.max_length, "float32",
                                             settings.device, attn)
    if settings.variant == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          bias="none", task_type="FEATURE_EXTRACTION", target_modules=list(settings.lora_targets))
        model[0].model = get_peft_model(model[0].model, lora)
    return model


def train_theirs(settings: TrainSettings, raw_files: list[Path], out_dir: Path):
    """Train with SentenceTransformerTrainer + MNRL; returns (StepLog, the trained SentenceTransformer)."""
    C.set_threads(settings.threads)
    import torch
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    torch.manual_seed(settings.seed)
    model = build_st_for_training(settings)
    datasets = {f.stem: st_dataset(f, settings.num_hard_neg, settings.seed) for f in raw_files}
    train_dataset = DatasetDict(datasets) if len(datasets) > 1 else next(iter(datasets.values()))
    log = StepLog()
    on_gpu = str(settings.device).startswith("cuda")

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            log.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            C.synchronize(settings.device)
            log.step_end.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=settings.batch_size, max_steps=settings.steps,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps,
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=settings.seed, data_seed=settings.seed,
        dataloader_drop_last=True, dataloader_num_workers=0, save_strategy="no", eval_strategy="no",
        logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not on_gpu,
        bf16=settings.dtype == "bfloat16", fp16=settings.dtype == "float16", optim="adamw_torch",
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None)
    if settings.grad_cache > 0:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        loss = CachedMultipleNegativesRankingLoss(model, scale=1.0 / settings.temperature,
                                                  mini_batch_size=settings.grad_cache)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / settings.temperature)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[StepTimer()])
    trainer.data_collator = CountingCollator(trainer.data_collator, log)
    trainer.train()
    n = len(log.step_end)
    log.lengths, log.padded, log.samples = log.lengths[:n], log.padded[:n], log.samples[:n]
    model.eval()
    return log, model


class CountingCollator:
    """Wraps ST's data collator: records each batch's sequence lengths and padded size, delegates the rest.
    The DataLoader may fetch one batch ahead; entries are matched to steps by order."""

    def __init__(self, inner, log: StepLog) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, features):
        batch = self.inner(features)
        lengths, padded, rows = [], 0, 0
        for key, value in batch.items():
            if key.endswith("attention_mask") and hasattr(value, "sum"):
                lengths += value.sum(1).tolist()
                padded += value.numel()
                rows = rows or value.shape[0]
        self.log.lengths.append(lengths)
        self.log.padded.append(padded)
        self.log.samples.append(rows)
        return batch


def lora_param_count(model_dir: str, settings: TrainSettings) -> int:
    """Trainable LoRA parameters: r x (in + out) for every adapted linear layer."""
    from torch import nn

    backbone = C.meta_backbone(model_dir)
    total = 0
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.lora_targets:
            total += settings.lora_r * (module.in_features + module.out_features)
    return total


def num_batches(raw_file: Path, batch_size: int) -> int:
    """Full batches per epoch of one dataset (both trainers drop the last partial batch)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(raw_file).metadata.num_rows // batch_size
