"""The training config: the seed's flat field names, loaded from JSON or YAML, with `--set key=value`
overrides, typed parsing and validation that names the file, field and what to do.

    cfg = load_train_config("configs/config.f2llm.json", ["model_path=smollm2-135m", "train_steps=10"])
    cfg.run_dir        # output_dir/experiment_id
    cfg.tb_run_dir     # tb_dir/experiment_id

Every field carries `metadata={"help": ..., "group": ...}`; `field_docs()` turns them into the table the
README shows. Keys starting with "_" (e.g. "_comment") are ignored, so JSON configs can carry notes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from llm2emb.errors import UserError, did_you_mean
from llm2emb.model.attention import ATTN_IMPLEMENTATIONS, canonical_attn_implementation
from llm2emb.model.tokenization import check_end_token_setting
from llm2emb.trackers import check_report_to

LORA_BIASES = ("none", "all", "lora_only")
LORA_TASK_TYPES = ("FEATURE_EXTRACTION", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM")
LR_SCHEDULERS = ("cosine", "linear", "constant")


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    """One training run. Field names follow the seed (`configs/config.*.json`); see `field_docs()`."""

    # paths and experiment id (seed)
    model_path: str = _f("", "base LLM: hub id, local HF folder, .gguf file, built-in alias, or a saved "
                         "Embedder folder", "paths")
    experiment_id: str = _f("", "run name; the run lives in output_dir/experiment_id", "paths")
    train_data_path: str = _f("", "tokenised data folder written by `llm2emb prepare`", "paths")
    output_dir: str = _f("runs", "parent folder of runs", "paths")
    tb_dir: str = _f("runs/tensorboard", "TensorBoard root; events go to tb_dir/experiment_id", "paths")
    report_to: list[str] = _f(["tensorboard"], "experiment trackers for training metrics: tensorboard, wandb, "
                              "mlflow ([]: metrics.jsonl only); not part of the run's identity", "paths")
    run_name: str = _f("", "the run's name in experiment trackers (empty: experiment_id); not part of the run's "
                       "identity", "paths")
    cache_dir: str = _f("", "Hugging Face Hub download cache for model_path (empty: the default cache)",
                        "paths")
    # data
    num_hard_neg: int = _f(7, "hard negatives per row (classification data always uses 1)", "data")
    max_seq_length: int = _f(2048, "max tokens per text (EOS kept last when truncating)", "data")
    query_max_length: int | None = _f(None, "max tokens per query (null: max_seq_length)", "data")
    passage_max_length: int | None = _f(None, "max tokens per passage / negative (null: max_seq_length)",
                                        "data")
    validation_fraction: float = _f(0.01, "share of each dataset's rows held out for the validation loss",
                                    "data")
    length_grouping: bool = _f(True, "group rows of similar length into a batch (less padding)", "data")
    # steps and frequencies (seed)
    train_batch_size: int = _f(8, "rows per process per step (global batch = this x processes)", "steps")
    train_epochs: int = _f(5, "epochs; used when train_steps < 0", "steps")
    train_steps: int = _f(-1, "optimizer steps; -1 = train_epochs x steps per epoch", "steps")
    checkpointing_steps: int = _f(100, "save a resumable checkpoint every N steps (0: only the final model)",
                                  "steps")
    save_total_limit: int = _f(0, "keep only the newest N checkpoints (0: keep all)", "steps")
    validation_steps: int = _f(100, "validation loss every N steps (0: never)", "steps")
    log_interval: int = _f(20, "log loss / lr / samples per second every N steps", "steps")
    eval_steps: int = _f(0, "evaluate the model on eval_tasks every N steps and at the end (0: never); the main "
                         "scores go to metrics.jsonl as \"eval\" entries (studies plot them and report the best "
                         "step)", "steps")
    eval_tasks: list[str] = _f([], "tasks for eval_steps, as `llm2emb eval --tasks` takes them (builtin:stdlib, "
                               "a BEIR folder, an STS .tsv, an mteb task name)", "steps")
    eval_limits: int | None = _f(None, "eval_steps: sample this many queries / pairs per task (null: all)", "steps")
    eval_max_length: int | None = _f(None, "eval_steps: token limit of the evaluated texts (null: max_seq_length)",
                                     "steps")
    # optimizer and schedule (seed)
    learning_rate: float = _f(1e-4, "peak AdamW learning rate", "optim")
    min_lr: float = _f(1e-6, "learning rate at the end of the decay (floor)", "optim")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms)", "optim")
    warmup_steps: int = _f(100, "linear warmup steps", "optim")
    lr_scheduler: str = _f("cosine", "decay after warmup: cosine | linear | constant", "optim")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: no clipping)", "optim")
    seed: int = _f(42, "seed for initialisation, sampling and dropout", "optim")
    # loss
    temperature: float = _f(0.05, "InfoNCE temperature (cosine similarity / temperature)", "loss")
    inbatch_hard_negatives: bool = _f(False, "also use other rows' hard negatives as in-batch negatives",
                                      "loss")
    mrl_enabled: bool = _f(False, "Matryoshka loss over mrl_dims", "loss")
    mrl_dims: list[int] = _f([], "truncated dimensions trained with MRL, e.g. [128, 256]", "loss")
    mrl_dim_weights: list[float] = _f([], "loss weight per mrl_dims entry (empty: all 1)", "loss")
    spread_enabled: bool = _f(False, "spread-out (uniformity) regulariser", "loss")
    spread_weight: float = _f(0.0, "weight of the spread-out term", "loss")
    spread_t: float = _f(2.0, "spread-out RBF temperature t", "loss")
    false_negative_margin: float | None = _f(None, "drop in-batch negatives scoring above the positive + this "
                                             "cosine margin (Qwen3-Embedding uses 0.1; null: off)", "loss")
    losses: list[dict] = _f([], "objectives as a list of {name, weight, ...options} (see `llm2emb train "
                            "--list-losses`); empty: the seed fields above describe them", "loss")
    teacher_model: str = _f("", "distillation teacher run at every step (on the fly): anything `llm2emb eval --model` "
                            "loads; its embeddings of the batch's texts feed distill_kl / margin_mse / "
                            "embedding_mse (one of them must be in losses). Empty: the data's teacher_* columns "
                            "(computed once, e.g. by a pipeline stage's `teacher:`)", "loss")
    teacher_instructions: bool = _f(True, "the on-the-fly teacher sees the queries with their instruction",
                                    "loss")
    teacher_max_length: int | None = _f(None, "token limit of the on-the-fly teacher's texts (null: its own)", "loss")
    mntp_mask_probability: float = _f(0.0, "masked next-token prediction (LLM2Vec's first step): > 0 trains the "
                                      "backbone to predict this share of each text's tokens, masked, from the "
                                      "previous position's LM-head logits, instead of the contrastive objective "
                                      "(LLM2Vec: 0.2; needs bi_attn_enabled, a dense representation, no head and "
                                      "parameter-free pooling); 0: off", "loss")
    mntp_mask_token: str = _f("auto", "MNTP mask token: auto (the tokenizer's mask token, else \"_\" as LLM2Vec) | "
                              "a token string", "loss")
    # LoRA (seed)
    lora_enabled: bool = _f(False, "train a LoRA adapter instead of all weights", "lora")
    lora_r: int = _f(8, "LoRA rank", "lora")
    lora_alpha: int = _f(16, "LoRA scaling alpha", "lora")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", "lora")
    lora_bias: str = _f("none", "none | all | lora_only", "lora")
    lora_task_type: str = _f("FEATURE_EXTRACTION", "peft task type", "lora")
    lora_target_modules: list[str] = _f([], "module names to adapt (empty: all linear layers)", "lora")
    lora_adapter_path: str = _f("", "continue training an existing adapter folder", "lora")
    lora_merge_on_save: bool = _f(False, "also write final_merged/ with the adapter folded in", "lora")
    # model (seed)
    bi_attn_enabled: bool = _f(False, "bidirectional attention (no causal mask)", "model")
    attn_implementation: str = _f("sdpa", "sdpa | eager | flash_attention_2 (flash falls back to sdpa "
                                  "without CUDA)", "model")
    pooling_mode: str = _f("eos", "eos | mean | weighted_mean | attention | latent_attention | cls (the final "
                           "state of a new summary token, see summary_token)", "model")
    skip_instruction: bool = _f(False, "exclude the instruction prefix from pooling", "model")
    instruction_separator: str = _f("Query:", "end of the instruction prefix (must match prepare's "
                                    "--instruction-separator)", "model")
    end_token: str = _f("auto", "token that ends every text (EOS pooling reads it): auto (what the tokenizer's "
                        "post-processor appends, else EOS) | eos | pad | none | a token string; must match "
                        "prepare's --end-token", "model")
    input_strategy: str = _f("plain", "how a text becomes model input and which positions are pooled: plain | "
                             "echo (text twice, mean over the second copy) | prompteol "
                             "('This sentence : \"text\" means in one word:\"', last token); must match "
                             "prepare's --input-strategy", "model")
    summary_token: str = _f("<|embed|>", "pooling cls: the summary token, a string the tokenizer lacks; it is added "
                            "as a special token with a new trainable embedding row (LoRA: peft's trainable token "
                            "rows) and inserted into every text", "model")
    summary_token_position: str = _f("auto", "pooling cls: where the summary token goes: auto (start with "
                                     "bi_attn_enabled, else end) | start (after any BOS; bidirectional only) | "
                                     "end (after the end token, last); must match prepare's "
                                     "--summary-token-position", "model")
    summary_token_init: str = _f("mean", "pooling cls: the new row's initial value: mean (of the input embedding "
                                 "rows) | a token string of the vocabulary (a copy of its row)", "model")
    head: str | None = _f(None, "projection head on the pooled vector: null | linear | mlp", "model")
    head_dim: int | None = _f(None, "output size of the head (null: hidden size)", "model")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, ~30% slower)",
                                      "model")
    gradient_checkpointing_auto: bool = _f(True, "when gradient_checkpointing is false, turn it on for a run whose "
                                           "estimated activations would not fit in the memory left free once the "
                                           "model is loaded (the decision and its numbers are logged)", "model")
    grad_cache_chunk_size: int = _f(0, "gradient cache (GradCache): texts per forward pass of a cached step "
                                    "(queries, positives and hard negatives each cut into chunks of this size, "
                                    "as sentence-transformers' CachedMNRL mini_batch_size); each chunk is embedded "
                                    "without a graph, then re-run with one, so memory is bounded by the chunk "
                                    "instead of the contrastive batch (one extra forward; same gradients); 0: off",
                                    "model")
    tf32: bool = _f(True, "TF32 tensor-core matrix products for float32 work on NVIDIA GPUs (faster; no effect "
                    "on CPU)", "model")
    precision: str = _f("auto", "compute precision of the forward passes: auto (bf16 where the device computes it "
                        "natively: CUDA with bf16, CPUs with AVX512_BF16 / AMX; else fp32) | fp32 | bf16 | fp16 "
                        "(CUDA only). bf16/fp16 autocast on float32 weights; losses in float32. A run records "
                        "what auto chose and a resume keeps it", "model")
    # representation (llm2emb.model.representations)
    representation: str = _f("dense", "what a text becomes: dense (one vector) | multi_vector (token vectors, MaxSim) | "
                             "sparse (vocabulary weights from the LM head) | hybrid (several heads)", "representation")
    token_dim: int = _f(128, "multi_vector: size of each token vector (projection of the hidden state)",
                        "representation")
    skip_special_tokens: bool = _f(True, "multi_vector / sparse: leave special tokens (BOS, EOS, pad) out of the "
                                   "token sets", "representation")
    sparse_skip_first: bool = _f(True, "sparse: leave the first position (attention sink) out of the max-pool",
                                 "representation")
    sparse_query_top_k: int = _f(64, "sparse: largest weights kept per query at inference (0: all)",
                                 "representation")
    sparse_doc_top_k: int = _f(256, "sparse: largest weights kept per document at inference (0: all)",
                               "representation")
    flops_query_weight: float = _f(3e-4, "sparse: FLOPS regulariser weight on queries", "representation")
    flops_doc_weight: float = _f(1e-4, "sparse: FLOPS regulariser weight on documents", "representation")
    hybrid_heads: list[str] = _f(["dense", "sparse", "multi_vector"], "hybrid: the heads trained jointly",
                                 "representation")
    hybrid_weights: list[float] = _f([1.0, 0.3, 1.0], "hybrid: weight of each head in the loss and the score "
                                     "(BGE-M3's 1, 0.3, 1)", "representation")
    hybrid_self_distill: bool = _f(False, "hybrid: self-distillation from the combined score (BGE-M3)",
                                   "representation")
    # informational
    num_processes: int = _f(0, "ignored (the launcher decides); kept so seed configs load", "info")

    # ------------------------------------------------------------------ derived
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.experiment_id

    @property
    def tb_run_dir(self) -> Path:
        return Path(self.tb_dir).expanduser() / self.experiment_id

    @property
    def query_length(self) -> int:
        return self.query_max_length or self.max_seq_length

    @property
    def passage_length(self) -> int:
        return self.passage_max_length or self.max_seq_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config", field_sources: Mapping[str, str] | None = None,
                 untrained: bool = False) -> "TrainConfig":
        """Check ranges and cross-field rules; raises UserError naming `source` and the field.
        `field_sources` names where a field's value came from when the config was merged from several
        places (a study's base, recipe and budget), so the message points at the place to fix.
        `untrained`: `train_steps: 0` is allowed (a study's recipe that evaluates the base model, see
        `UNTRAINED_FIELDS`); `llm2emb train` never sets it."""
        sources = dict(field_sources or {})

        def bad(name: str, why: str) -> UserError:
            return UserError(f"{sources.get(name, source)}: field {name!r} {why}.")

        for name in ("model_path", "experiment_id", "train_data_path"):
            if not getattr(self, name).strip():
                raise bad(name, "is required; set it in the config file or with --set " + name + "=...")
        if re.search(r"[/\\]|^\.+$", self.experiment_id):
            raise bad("experiment_id", f"must be a plain folder name, got {self.experiment_id!r}")
        check_report_to(self.report_to, source)
        positive = ("max_seq_length", "train_batch_size", "log_interval", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        non_negative = ("num_hard_neg", "checkpointing_steps", "validation_steps", "warmup_steps",
                        "save_total_limit", "weight_decay", "spread_weight", "max_grad_norm", "min_lr")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_seq_length < 2:
            raise bad("max_seq_length", "must be >= 2 (one token plus EOS)")
        for name in ("query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise bad(name, f"must be >= 2 or null, got {value}")
        if (self.train_steps == 0 and not untrained) or self.train_steps < -1:
            raise bad("train_steps", f"must be a positive number of steps or -1 (use train_epochs), "
                      f"got {self.train_steps}" + (" (train_steps 0, the untrained model, is a study recipe)"
                                                   if self.train_steps == 0 else ""))
        if self.train_steps < 0 and self.train_epochs < 1:
            raise bad("train_epochs", f"must be >= 1 when train_steps is -1, got {self.train_epochs}")
        for name in ("learning_rate", "temperature", "spread_t", "lora_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(name, f"must be a finite number > 0, got {value}")
        if self.eval_steps < 0:
            raise bad("eval_steps", f"must be >= 0 (0: never), got {self.eval_steps}")
        self.eval_tasks = [t for t in self.eval_tasks if t]
        if self.eval_steps and not self.eval_tasks:
            raise bad("eval_tasks", f"is empty but eval_steps is {self.eval_steps}; list tasks such as "
                      "[builtin:stdlib] or set eval_steps to 0")
        for name in ("eval_limits", "eval_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, f"must be >= 1 or null, got {getattr(self, name)}")
        if self.grad_cache_chunk_size < 0:
            raise bad("grad_cache_chunk_size", f"must be >= 0 (0: off), got {self.grad_cache_chunk_size}")
        if self.min_lr > self.learning_rate:
            raise bad("min_lr", f"({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.validation_fraction < 1:
            raise bad("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")
        self._check_choice("lora_bias", LORA_BIASES, sources.get("lora_bias", source))
        self._check_choice("lora_task_type", LORA_TASK_TYPES, sources.get("lora_task_type", source))
        self._check_choice("lr_scheduler", LR_SCHEDULERS, sources.get("lr_scheduler", source))
        self.attn_implementation = canonical_attn_implementation(self.attn_implementation)
        from llm2emb.model.precision import canonical_precision
        self.precision = canonical_precision(self.precision, f"{sources.get('precision', source)}: field 'precision'")
        self._check_choice("attn_implementation", ATTN_IMPLEMENTATIONS, sources.get("attn_implementation", source))
        from llm2emb.model.heads import HEAD_REGISTRY
        from llm2emb.model.pooling import POOLING_REGISTRY
        self._check_choice("pooling_mode", tuple(POOLING_REGISTRY), sources.get("pooling_mode", source))
        check_end_token_setting(self.end_token, source)
        from llm2emb.model.input_strategies import INPUT_STRATEGIES

        self._check_choice("input_strategy", tuple(INPUT_STRATEGIES), source)
        strategy = INPUT_STRATEGIES[self.input_strategy]
        strategy.check(pooling=self.pooling_mode, bidirectional=self.bi_attn_enabled,
                       representation=self.representation, source=source)
        if not strategy.is_plain and self.train_steps != 0 and any(getattr(self, n) not in (None, self.max_seq_length)
                                         for n in ("query_max_length", "passage_max_length")):
            name = next(n for n in ("query_max_length", "passage_max_length")
                        if getattr(self, n) not in (None, self.max_seq_length))
            raise UserError(f"{source}: input_strategy {strategy.name} shortens a text inside its template when "
                            f"data is prepared, but {name} would cut the prepared tokens again (and the template "
                            f"with them); set {name} to null and size texts with max_seq_length.")
        from llm2emb.model.summary_token import check_settings as check_summary_token

        summary_position = check_summary_token(
            pooling=self.pooling_mode, bidirectional=self.bi_attn_enabled, representation=self.representation,
            input_strategy=self.input_strategy, token=self.summary_token, position=self.summary_token_position,
            init=self.summary_token_init, source=source)
        shortest = min(n for n in (self.max_seq_length, self.query_max_length, self.passage_max_length) if n)
        if summary_position is not None and shortest < 3:
            raise bad("max_seq_length", f"(or query / passage_max_length) is {shortest}, but pooling cls needs at "
                      "least 3 tokens per text: one of text, the end token and the summary token")
        if self.head in ("", "none"):
            self.head = None
        if self.head is not None:
            self._check_choice("head", tuple(HEAD_REGISTRY), sources.get("head", source))
        if self.head_dim is not None and self.head_dim < 1:
            raise bad("head_dim", f"must be >= 1 or null, got {self.head_dim}")
        if self.head_dim is not None and self.head is None:
            raise bad("head_dim", "is set but head is null; set head to linear or mlp, or head_dim to null")
        if self.mrl_enabled:
            if not self.mrl_dims:
                raise bad("mrl_dims", "is empty but mrl_enabled is true; list dimensions like [128, 256]")
            if any(d < 1 for d in self.mrl_dims):
                raise bad("mrl_dims", f"must hold positive integers, got {self.mrl_dims}")
            if len(set(self.mrl_dims)) != len(self.mrl_dims):
                raise bad("mrl_dims", f"lists a dimension twice ({self.mrl_dims})")
            if self.mrl_dim_weights and len(self.mrl_dim_weights) != len(self.mrl_dims):
                raise bad("mrl_dim_weights", f"has {len(self.mrl_dim_weights)} values but mrl_dims has "
                          f"{len(self.mrl_dims)}; give one weight per dimension or leave it empty")
            if any(not math.isfinite(w) or w < 0 for w in self.mrl_dim_weights):
                raise bad("mrl_dim_weights", f"must be finite and >= 0, got {self.mrl_dim_weights}")
            if self.head_dim is not None and max(self.mrl_dims) > self.head_dim:
                raise bad("mrl_dims", f"has {max(self.mrl_dims)}, larger than head_dim {self.head_dim}")
        from llm2emb.model.representations.settings import check_train_settings
        check_train_settings(self, source)
        if self.losses:
            from llm2emb.losses import parse_loss_specs

            if self.mrl_enabled or self.spread_enabled or self.false_negative_margin is not None:
                raise bad("losses", "is set together with mrl_enabled / spread_enabled / false_negative_margin; "
                          "describe every objective in losses (e.g. {name: contrastive, mrl_dims: [128]}) or "
                          "drop losses and use the seed fields")
            parse_loss_specs(self.losses, sources.get("losses", source))
        if self.false_negative_margin is not None and not math.isfinite(self.false_negative_margin):
            raise bad("false_negative_margin", f"must be a finite number or null, got {self.false_negative_margin}")
        if self.spread_enabled and self.spread_weight == 0:
            raise bad("spread_weight", "is 0 but spread_enabled is true; set a weight such as 0.1")
        if self.teacher_max_length is not None and self.teacher_max_length < 1:
            raise bad("teacher_max_length", f"must be >= 1 or null, got {self.teacher_max_length}")
        if not 0 <= self.mntp_mask_probability < 1:
            raise bad("mntp_mask_probability", f"must be in [0, 1) (0: off), got {self.mntp_mask_probability}")
        if self.mntp_mask_probability > 0 and self.grad_cache_chunk_size:
            raise bad("grad_cache_chunk_size", "is set together with mntp_mask_probability; MNTP has no in-batch "
                      "objective to cache (lower train_batch_size instead)")
        if self.mntp_mask_probability > 0:
            own = ("representation" if self.representation != "dense" else
                   "head" if self.head is not None else
                   "pooling_mode" if getattr(POOLING_REGISTRY.get(self.pooling_mode), "trainable", False) else None)
            if own is not None:
                # their weights would get no gradient from MNTP (and DDP refuses parameters without one)
                raise bad(own, f"is {getattr(self, own)!r} together with mntp_mask_probability, but masked next-token "
                          "prediction trains only the backbone; run MNTP with representation dense, parameter-free "
                          "pooling (eos / mean / weighted_mean) and no head, and add those in the next stage")
        if self.mntp_mask_probability > 0 and not self.bi_attn_enabled:
            raise bad("mntp_mask_probability", "is set but bi_attn_enabled is false; masked next-token prediction is "
                      "meant for bidirectional models (LLM2Vec's first step: a causal model sees no later tokens, so "
                      "it learns nothing MNTP adds), set bi_attn_enabled to true or mntp_mask_probability to 0")
        if self.teacher_model:
            from llm2emb.losses import LOSS_REGISTRY, seed_loss_entries

            users = [e.get("name") for e in seed_loss_entries(self)
                     if getattr(LOSS_REGISTRY.get(e.get("name")), "uses_teacher", False)]
            if self.mntp_mask_probability > 0 or not users:
                why = "the run trains masked next-token prediction" if self.mntp_mask_probability > 0 else \
                    "its losses are " + ", ".join(str(e.get("name")) for e in seed_loss_entries(self))
                teachers = ", ".join(n for n, c in LOSS_REGISTRY.items() if getattr(c, "uses_teacher", False))
                raise bad("teacher_model", f"is set but no distillation loss uses teacher_model ({why}); add one of "
                          f"{teachers} to losses, e.g. [{{name: contrastive}}, {{name: distill_kl}}], or drop "
                          "teacher_model")
        if self.teacher_model and self.input_strategy != "plain":
            # the on-the-fly teacher reads the student's token ids back as text, and those hold the template
            raise bad("teacher_model", f"is set with input_strategy {self.input_strategy}, but the on-the-fly "
                      "teacher reads the student's token ids back as text, which hold that strategy's template; "
                      "compute the teacher columns from the raw text (a pipeline stage's teacher:) or use "
                      "input_strategy plain")
        if self.lora_adapter_path and not self.lora_enabled:
            raise bad("lora_adapter_path", "is set but lora_enabled is false; set lora_enabled to true to "
                      "continue training that adapter")
        return self

    def validate_for_model(self, embedding_dim: int, source: str = "config") -> None:
        """Rules that need the loaded model: MRL dims must fit the embedding."""
        from llm2emb.losses import seed_loss_entries

        for entry in seed_loss_entries(self):
            dims = entry.get("mrl_dims") or []
            if dims and max(dims) > embedding_dim:
                where = "field 'mrl_dims'" if not self.losses else f"loss {entry.get('name')!r} option 'mrl_dims'"
                raise UserError(f"{source}: {where} has {max(dims)}, but {self.model_path!r} gives "
                                f"{embedding_dim}-dimensional embeddings; use dimensions <= {embedding_dim}.")

    def _check_choice(self, name: str, choices: Sequence[str], source: str) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise UserError(f"{source}: field {name!r} is {value!r}; choose one of: {', '.join(choices)}."
                            + did_you_mean(str(value), choices))


#: what a `train_steps: 0` recipe (the base model evaluated untrained) may set itself: how texts are tokenised
#: and pooled. Anything else (learning rate, LoRA, losses, a head or trainable pooling that would stay random)
#: only means something to training.
UNTRAINED_FIELDS = frozenset({"model_path", "train_steps", "pooling_mode", "bi_attn_enabled", "skip_instruction",
                              "instruction_separator", "end_token", "input_strategy", "max_seq_length",
                              "attn_implementation", "summary_token", "summary_token_position",
                              "summary_token_init"})


# ---------------------------------------------------------------------- typed parsing
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    if typing.get_origin(inner) is list:
        elem = typing.get_args(inner)[0]
        name = {int: "integers", float: "numbers", str: "strings", dict: "mappings"}[elem]
        text = f"a list of {name}"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[inner]
    return text + (" or null" if optional else "")


def _check_value(name: str, value: Any, source: str) -> Any:
    """Validate a JSON/YAML value against the field's type (ints are accepted for floats)."""
    tp = _field_types()[name]
    inner, optional = _split_optional(tp)

    def fail() -> UserError:
        return UserError(f"{source}: field {name!r} must be {_type_name(tp)}, got {value!r} "
                         f"({type(value).__name__}).")

    if value is None:
        if optional:
            return None
        if typing.get_origin(inner) is list:
            return []  # the seed's Args uses None for empty lists
        raise fail()
    if typing.get_origin(inner) is list:
        elem = typing.get_args(inner)[0]
        if elem is dict and isinstance(value, dict):  # one mapping where a list of them is expected
            value = [value]
        if elem is str and isinstance(value, str):  # "q_proj,v_proj" or "all-linear"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise fail()
        return [_check_scalar(elem, v, fail) for v in value]
    return _check_scalar(inner, value, fail)


def _check_scalar(tp: Any, value: Any, fail) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    raise fail()  # pragma: no cover


_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


def parse_override_value(name: str, text: str, source: str = "--set") -> Any:
    """Turn the text of `--set name=text` into a value of the field's type.

    bools: true/false/yes/no/1/0; ints and floats as Python reads them (1e-4 works); lists as JSON
    (`[128, 256]`) or comma-separated (`128,256`); `null`/`none` for optional fields."""
    tp = _field_types()[name]
    inner, optional = _split_optional(tp)
    stripped = text.strip()

    def fail() -> UserError:
        return UserError(f"{source} {name}={text}: {name} must be {_type_name(tp)}.")

    if stripped.lower() in ("null", "none") and (optional or typing.get_origin(inner) is list):
        return None if optional else []
    if typing.get_origin(inner) is list:
        elem = typing.get_args(inner)[0]
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise UserError(f"{source} {name}={text}: not a valid JSON list ({exc.msg} at column "
                                f"{exc.colno}).") from exc
            return _check_value(name, items, source)
        parts = [p.strip() for p in stripped.split(",") if p.strip()]
        return [_parse_scalar(elem, p, fail) for p in parts]
    return _parse_scalar(inner, stripped if inner is not str else text, fail)


def _parse_scalar(tp: Any, text: str, fail) -> Any:
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise fail()
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:  # "1e3" or "100.0"
            value = float(text)
        except ValueError:
            raise fail() from None
        if not value.is_integer():
            raise fail()
        return int(value)
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise fail() from None
        return value
    if tp is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]  # --set 'instruction_separator="Query: "' keeps the space
        return text
    raise fail()  # pragma: no cover


# ---------------------------------------------------------------------- files
def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON or YAML config into a dict (`llm2emb.structured`: duplicate keys refused, syntax errors
    named on their line)."""
    from llm2emb.structured import read_structured_file

    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise UserError(f"Config file {p} {what}; pass a JSON or YAML file such as "
                        "configs/config.f2llm.json.")
    data = read_structured_file(p, "config file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: the config must be a mapping of field names to values, "
                        f"not a {type(data).__name__}.")
    return data


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a mapping; unknown keys get a did-you-mean error, values are type-checked."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: field names must be strings, got {key!r}.")
        if key.startswith("_"):
            continue
        if key not in FIELD_NAMES:
            raise UserError(f"{source}: unknown field {key!r}." + did_you_mean(key, FIELD_NAMES)
                            + " Run `llm2emb train --list-fields` for all fields.")
        values[key] = _check_value(key, value, source)
    return TrainConfig(**values)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """["lr=1", "mrl_dims=128,256"] -> typed {field: value}; unknown names get a did-you-mean error."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set learning_rate=1e-4.")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in FIELD_NAMES:
            raise UserError(f"--set {key}: unknown field {key!r}." + did_you_mean(key, FIELD_NAMES))
        out[key] = parse_override_value(key, text)
    return out


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (),
                      **values: Any) -> TrainConfig:
    """Config file (optional) <- `--set` overrides <- keyword values; validated."""
    overrides = list(overrides)
    source = str(path) if path is not None else "config"
    data = read_config_file(path) if path is not None else {}
    cfg = config_from_dict(data, source)
    merged = cfg.to_dict()
    merged.update(parse_overrides(overrides))
    for key, value in values.items():
        if key not in FIELD_NAMES:
            raise UserError(f"unknown config field {key!r}." + did_you_mean(key, FIELD_NAMES))
        merged[key] = _check_value(key, value, "config")
    try:
        return TrainConfig(**merged).validate(source)
    except UserError as exc:  # a bad value given with --set is reported as coming from --set, not the file
        set_keys = [item.split("=", 1)[0].strip() for item in overrides]
        if any(f"field {key!r}" in str(exc) for key in set_keys) and str(exc).startswith(f"{source}: "):
            raise UserError("--set: " + str(exc)[len(source) + 2:]) from None
        raise


def field_docs() -> list[dict[str, str]]:
    """[{name, type, default, group, help}] for every field, in declaration order (README, --list-fields)."""
    hints = _field_types()
    rows = []
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": json.dumps(default),
                     "group": f.metadata.get("group", ""), "help": f.metadata.get("help", "")})
    return rows
