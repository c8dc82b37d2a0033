"""The training loop (stages 3 and 5 of the seed), driven by accelerate: one code path for one CPU process,
DDP over CPUs (gloo) or GPUs, DeepSpeed ZeRO-2 and FSDP, chosen by the launcher's accelerate config.

    from llm2emb.config import load_train_config
    from llm2emb.train import train
    result = train(load_train_config("configs/config.f2llm.json", ["train_steps=100"]))

One step: the batcher draws one dataset for the global step (same draw on every process) and gives each
process `train_batch_size` rows; queries, positives and hard negatives are embedded in separate forward
passes (`encode.TripletEncoder`); `EmbeddingObjective` gathers embeddings across processes with their
gradients; AdamW with a warmup + cosine schedule down to `min_lr`; gradient clipping.

Re-running the same command continues from the newest complete checkpoint, exactly: optimizer, scheduler,
RNG of every process, trainable weights and the batcher's position are restored, so a run killed and
resumed ends with the same weights, bit for bit, as one that never stopped.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2emb.allocator import keep_freed_memory
from llm2emb.atomic import write_json_atomic
from llm2emb.config import TrainConfig
from llm2emb.errors import UserError
from llm2emb.model.attention import runnable_attn_implementation
from llm2emb.model.precision import MIXED_PRECISION, Precision, resolve_precision
from llm2emb.layout import FINAL_DIR, MERGED_DIR, RUN_CONFIG, SUMMARY_FILE
from llm2emb.train import checkpoint as ckpt
from llm2emb.train.encode import EncodedBatch, TripletEncoder, collate_batch
from llm2emb.train.grad_cache import GradCachedStep, largest_side
from llm2emb.train.metrics import MetricsWriter, RunningMean, Throughput
from llm2emb.train.run_info import check_run_dir, run_record
from llm2emb.train.schedule import build_scheduler

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 5


class TrainingDiverged(UserError):
    """The loss stayed NaN / inf for several steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    total_steps: int
    resumed_from: int | None = None
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    last_train: dict[str, float] = field(default_factory=dict)
    last_validation: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    already_complete: bool = False


def apply_cache_dir(cache_dir: str) -> None:
    """Point Hugging Face Hub downloads at `cache_dir` (read at call time by huggingface_hub)."""
    if not cache_dir:
        return
    import huggingface_hub.constants as hub_constants

    path = str(Path(cache_dir).expanduser())
    os.environ["HF_HUB_CACHE"] = path
    hub_constants.HF_HUB_CACHE = path


def training_device() -> str:
    """The device type the Accelerator will use (it picks CUDA whenever there is one)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def recorded_precision(run_dir: Path) -> str | None:
    """The precision the run in `run_dir` trains with (its config.json), or None when there is no run.

    Runs from before the `precision` setting trained as accelerate's `mixed_precision` said ("no" = fp32)."""
    import json

    try:
        launch = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8")).get("launch") or {}
    except (OSError, ValueError, AttributeError):
        return None  # no run, or an unreadable one: check_run_dir says what is wrong
    if not isinstance(launch, dict):
        return None
    if launch.get("precision") in MIXED_PRECISION:
        return str(launch["precision"])
    return {v: k for k, v in MIXED_PRECISION.items()}.get(launch.get("mixed_precision"), "fp32")


def training_precision(cfg: TrainConfig, recorded: str | None = None) -> Precision:
    """The precision of this launch: `cfg.precision` resolved on this machine, or for a resumed run the one
    it started with (`recorded`), so its arithmetic does not change half-way even when `auto` would choose
    differently here (then a warning says so); a recorded precision this machine cannot run is refused."""
    device = training_device()
    chosen = resolve_precision(cfg.precision, device)
    # An explicit setting that differs from the record means a changed config: check_run_dir refuses it.
    if recorded is None or recorded == chosen.name or cfg.precision != "auto":
        return chosen
    try:
        kept = resolve_precision(recorded, device)
    except UserError as exc:
        raise UserError(f"The run in {cfg.run_dir} trained in {recorded}, which this machine cannot run ({exc}); "
                        "resume it where it started, or start a new run (another experiment_id or "
                        "--overwrite).") from exc
    logger.warning("resuming %s in %s as it started, although precision=auto would choose %s here (%s)",
                   cfg.run_dir, recorded, chosen.name, chosen.reason)
    return Precision(kept.name, "auto", f"resumed: the run started in {recorded}")


def _fresh_accelerator_state(mixed_precision: str | None) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision; a process that trains several runs (tests, studies, a notebook) may change precision
    between them. Only the precision part is reset: the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and mixed_precision is not None and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def build_accelerator(cfg: TrainConfig, precision: Precision | None = None):
    """Accelerator for the current launch; `cpu=True` when CUDA is absent so torchrun-launched CPU
    processes (accelerate's MULTI_GPU config on a CPU machine) form a gloo group.

    `precision` (default: `cfg.precision` resolved here) becomes accelerate's `mixed_precision`: bf16 / fp16
    autocast around the prepared model's forward (queries, passages, negatives; the loss is computed outside
    it, in float32), float32 master weights, and for fp16 a GradScaler. It replaces the launcher's
    `mixed_precision`. Under DeepSpeed the DeepSpeed config casts the model itself: `precision=auto` follows
    it, an explicit precision must agree with it (checked in `Trainer.setup`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    precision = precision or resolve_precision(cfg.precision, training_device())
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    mixed = None if deepspeed and precision.setting == "auto" else precision.mixed_precision

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        # accelerate turns FSDP off for `cpu=True` and would quietly train with DDP instead; refuse before
        # any process group exists, so every process stops alone and none waits for the others.
        raise UserError("FSDP needs CUDA GPUs in this version; use configs/accelerate_cpu.yaml (DDP) on CPU.")
    # The schedule is defined in optimizer steps; accelerate would otherwise step a prepared scheduler
    # once per process per step. The scheduler is not prepared at all (registered for checkpointing instead).
    _fresh_accelerator_state(mixed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
                              mixed_precision=mixed)
    if not logger.isEnabledFor(logging.DEBUG):  # accelerate logs every file of every checkpoint at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        # Saving gathers DTensor parameters (FSDP2); FSDP1's flat parameters would be saved as shards.
        raise UserError("llm2emb supports FSDP2 only; set `fsdp_version: 2` in the accelerate config "
                        "(see configs/accelerate_fsdp.yaml).")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
        ds_config["train_batch_size"] = cfg.train_batch_size * accelerator.num_processes \
            * int(ds_config.get("gradient_accumulation_steps", 1) or 1)
        _enable_deepspeed_overflow_skip(ds_config)
    return accelerator


def _enable_deepspeed_overflow_skip(ds_config: dict[str, Any]) -> None:
    """Let the DeepSpeed engine skip an update whose gradient is NaN / inf under bf16.

    The engine steps inside `backward()`, before the trainer sees the gradient norm, so only the engine can
    skip such an update. ZeRO-1/2 does for fp16 (loss scaling) and, for bf16, when `bf16.check_grad_overflow`
    is on: added in DeepSpeed 0.17.1, on by default from 0.19.3. An explicit setting in the config is kept."""
    from importlib import metadata

    from packaging.version import Version

    bf16 = ds_config.get("bf16")
    if not isinstance(bf16, dict) or "check_grad_overflow" in bf16:
        return
    try:
        supported = Version(metadata.version("deepspeed")) >= Version("0.17.1")
    except (metadata.PackageNotFoundError, ValueError):
        return
    if supported:  # the key does not exist before 0.17.1
        bf16["check_grad_overflow"] = True


def build_embedder(cfg: TrainConfig):
    """Embedder from the config: pooling, bidirectional attention, head, LoRA, gradient checkpointing."""
    from llm2emb.model.embedder import Embedder
    from llm2emb.model.representations.settings import train_options

    embedder = Embedder.from_pretrained(
        cfg.model_path, pooling=cfg.pooling_mode, bidirectional=cfg.bi_attn_enabled,
        skip_instruction=cfg.skip_instruction, instruction_separator=cfg.instruction_separator,
        end_token=cfg.end_token, input_strategy=cfg.input_strategy,
        summary_token=cfg.summary_token, summary_token_position=cfg.summary_token_position,
        summary_token_init=cfg.summary_token_init, head=cfg.head, head_dim=cfg.head_dim, max_length=cfg.max_seq_length,
        attn_implementation=runnable_attn_implementation(cfg.attn_implementation),
        representation=cfg.representation, representation_options=train_options(cfg))
    if embedder.is_lora:
        raise UserError(f"model_path {cfg.model_path} is a LoRA Embedder folder; pass its base model as "
                        "model_path and the folder as lora_adapter_path, or export a merged model first.")
    if cfg.gradient_checkpointing:
        from llm2emb.train.memory import enable_activation_checkpointing

        enable_activation_checkpointing(embedder.backbone)
    if cfg.lora_adapter_path:
        embedder.load_lora(cfg.lora_adapter_path, is_trainable=True)
    elif cfg.lora_enabled:
        targets = [m for m in cfg.lora_target_modules if m]
        embedder.add_lora(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules="all-linear" if not targets or targets == ["all-linear"] else targets,
                          bias=cfg.lora_bias, task_type=cfg.lora_task_type)
    embedder.train()
    return embedder


def build_encoder(embedder) -> TripletEncoder:
    """The module the accelerator prepares, naming the backbone's decoder layer classes (`_no_split_modules`).

    accelerate's FSDP2 TRANSFORMER_BASED_WRAP shards the classes the prepared module names; a bare
    TripletEncoder names none, and the whole model would be one FSDP unit, gathered whole for every pass."""
    if getattr(embedder, "representation", None) is not None:  # multi_vector / sparse / hybrid: dict outputs
        from llm2emb.train.representation_encoder import RepresentationTripletEncoder

        encoder: TripletEncoder = RepresentationTripletEncoder(embedder)
    else:
        encoder = TripletEncoder(embedder)
    encoder._no_split_modules = list(getattr(embedder.backbone, "_no_split_modules", None) or [])
    return encoder


def check_data(cfg: TrainConfig, embedder) -> dict[str, Any]:
    """The data folder must be prepared with this model's tokenizer (and separator, for skip-instruction)."""
    from llm2emb.data.tokenize import read_prepared, tokenizer_fingerprint

    info = read_prepared(cfg.train_data_path)
    # before the fingerprint: the summary token changes the tokenizer, and this says what to do about it
    want = prepared_summary_setting(embedder)
    have = info.get("summary_token")
    if have != want:
        def said(s):
            return f"summary token {s['token']!r} at the {s['position']}" if s else "no summary token"
        flags = (f"--summary-token {want['token']!r} --summary-token-position {want['position']}" if want
                 else "no --summary-token")
        raise UserError(
            f"train_data_path {cfg.train_data_path} was prepared with {said(have)} but pooling_mode "
            f"{cfg.pooling_mode!r} needs {said(want)}; prepare again with {flags} or change the config.")
    if info.get("tokenizer_fingerprint") != tokenizer_fingerprint(embedder.tokenizer):
        raise UserError(
            f"train_data_path {cfg.train_data_path} was tokenised with {info.get('tokenizer')!r}, whose tokenizer "
            f"differs from model_path {cfg.model_path!r}'s; re-run `llm2emb prepare --model {cfg.model_path} "
            f"--input <raw data> --output <new folder>` and point train_data_path at it.")
    # data prepared before end tokens were configurable ended every text with EOS
    data_end = info.get("end_token_ids", [info.get("eos_token_id")])
    if list(data_end) != list(embedder.config.end_token_ids):
        raise UserError(
            f"train_data_path {cfg.train_data_path} ends texts with token ids {data_end} (prepare's --end-token "
            f"{info.get('end_token', 'eos')!r}) but end_token={cfg.end_token!r} gives {embedder.config.end_token_ids} "
            f"for this model; prepare again with --end-token {cfg.end_token} or set end_token to match the data.")
    if info.get("input_strategy", "plain") != cfg.input_strategy:
        raise UserError(
            f"train_data_path {cfg.train_data_path} was prepared with input strategy "
            f"{info.get('input_strategy', 'plain')!r} but the config has input_strategy={cfg.input_strategy!r}; "
            f"prepare again with --input-strategy {cfg.input_strategy} or change the config.")
    if cfg.skip_instruction and info.get("instruction_separator") not in (None, cfg.instruction_separator):
        raise UserError(
            f"train_data_path {cfg.train_data_path} was prepared with instruction separator "
            f"{info.get('instruction_separator')!r} but the config has instruction_separator="
            f"{cfg.instruction_separator!r}; prepare again with --instruction-separator or change the config.")
    return info


def prepared_summary_setting(embedder) -> dict[str, str] | None:
    """What `prepare` records as `summary_token` for data this embedder trains on (None: no summary token)."""
    if embedder.summary_token_id is None:
        return None
    return {"token": embedder.config.summary_token, "position": embedder.config.summary_token_position}


def resolve_eval_tasks(specs: list[str]) -> list:
    """eval_tasks resolved before training starts, so a task that does not exist fails at once."""
    from llm2emb.eval.tasks import resolve_task

    tasks = []
    for spec in specs:
        try:
            tasks.append(resolve_task(spec))
        except UserError as exc:
            raise UserError(f"eval_tasks: {exc}") from exc
    return tasks


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), as is standard."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise UserError("The model has no trainable parameters; check lora_target_modules.")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


def dataset_names(data_dir: str | Path) -> list[str]:
    import json

    try:
        return sorted(json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


class Trainer:
    """Builds everything from a TrainConfig and runs the loop; `train()` is the entry point."""

    def __init__(self, cfg: TrainConfig, show_progress: bool = True, merge: bool = False,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.merge = merge or cfg.lora_merge_on_save
        self.overwrite = overwrite

    # ------------------------------------------------------------------ setup
    def setup(self) -> bool:
        """Build accelerator, model, data, optimizer; returns False when the run is already complete."""
        from accelerate.utils import set_seed

        from llm2emb.data.batching import MultiTaskBatcher
        from llm2emb.losses.representation import objective_for_config

        cfg = self.cfg
        keep_freed_memory()  # activation buffers stay mapped between steps (llm2emb/allocator.py)
        apply_cache_dir(cfg.cache_dir)
        # Read before the accelerator exists (its mixed precision is fixed at construction): a resumed run
        # keeps the precision it started with. Every process reads the same file; --overwrite ignores it.
        complete = (cfg.run_dir / SUMMARY_FILE).exists() and (cfg.run_dir / FINAL_DIR).is_dir()
        recorded = None if self.overwrite or complete else recorded_precision(cfg.run_dir)
        precision = training_precision(cfg, recorded)
        self.accelerator = acc = build_accelerator(cfg, precision)
        self.precision = self._check_precision(precision, resumed=recorded is not None)
        self._check_grad_cache()
        self.run_dir = cfg.run_dir
        if self.overwrite:
            # Only once the process group exists can the others wait for the deletion: a process that
            # looked earlier would see the old run and resume it (or call it complete) while the main
            # process starts over.
            if acc.is_main_process:
                clear_run(cfg)
            acc.wait_for_everyone()
        resuming = check_run_dir(cfg)
        if resuming and (self.run_dir / SUMMARY_FILE).exists() and (self.run_dir / FINAL_DIR).is_dir():
            return False
        acc.wait_for_everyone()  # everybody has checked before the main process writes
        if acc.is_main_process:
            ckpt.remove_partial(self.run_dir)
        set_seed(cfg.seed)
        if torch.cuda.is_available():  # float32 matmuls on tensor cores (TF32), as HF Trainer's `tf32`
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.embedder = build_embedder(cfg)
        self._auto_checkpointing()
        self.data_info = check_data(cfg, self.embedder)
        cfg.validate_for_model(self.embedder.embedding_dim)
        # EmbeddingObjective, or per head for non-dense representations; None: the model computes its own loss (MNTP)
        self.objective = None if cfg.mntp_mask_probability else objective_for_config(cfg)
        self.batcher = MultiTaskBatcher(
            cfg.train_data_path, batch_size=cfg.train_batch_size, num_hard_neg=cfg.num_hard_neg, seed=cfg.seed,
            num_processes=acc.num_processes, process_index=acc.process_index,
            validation_fraction=cfg.validation_fraction, length_grouping=cfg.length_grouping, drop_last=True)
        self.steps_per_epoch = len(self.batcher)
        if self.steps_per_epoch < 1:
            raise UserError(f"train_data_path {cfg.train_data_path} has too few rows for one step of "
                            f"train_batch_size={cfg.train_batch_size} x {acc.num_processes} process(es); "
                            "lower train_batch_size or add data.")
        self.total_steps = cfg.train_steps if cfg.train_steps > 0 else cfg.train_epochs * self.steps_per_epoch
        self.datasets = dataset_names(cfg.train_data_path)
        self.eval_tasks = resolve_eval_tasks(cfg.eval_tasks) if cfg.eval_steps else []

        self.teacher = None
        if cfg.teacher_model:
            from llm2emb.train.teacher import OnTheFlyTeacher

            from llm2emb.data.tokenize import read_prepared

            manifest = read_prepared(cfg.train_data_path).get("manifest") or {}
            self.teacher = OnTheFlyTeacher(cfg.teacher_model, self.embedder.tokenizer,
                                           instructions=cfg.teacher_instructions, max_length=cfg.teacher_max_length,
                                           device=str(acc.device),
                                           dataset_instructions={name: (spec or {}).get("instruction") or ""
                                                                 for name, spec in manifest.items()})
        if cfg.mntp_mask_probability:
            from llm2emb.train.mntp import MaskedNextTokenPrediction

            encoder = MaskedNextTokenPrediction(self.embedder, cfg.model_path, cfg.mntp_mask_probability,
                                                cfg.mntp_mask_token)
        else:
            encoder = build_encoder(self.embedder)
        optimizer = build_optimizer(encoder, cfg)
        self.scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps,
                                         cfg.learning_rate, cfg.min_lr)
        self.model, self.optimizer = acc.prepare(encoder, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        ckpt.register_trainable_only_hooks(acc)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.step, self.epoch, self.consecutive_nonfinite, self.skipped = 0, 0, 0, 0
        self.resume_position = False
        self.resumed_from: int | None = None
        # training seconds of earlier processes of this run (from the checkpoint), and when this one started
        self.seconds_before, self.started = 0.0, time.perf_counter()
        latest = ckpt.latest_checkpoint(self.run_dir) if resuming else None
        if latest is not None:
            self._resume(latest)
        elif acc.is_main_process:
            write_json_atomic(self.run_dir / RUN_CONFIG, run_record(cfg, self._launch_info()))
        acc.wait_for_everyone()
        return True

    def _auto_checkpointing(self) -> None:
        """gradient_checkpointing_auto: turn checkpointing on when the step would not fit (train/memory.py)."""
        from llm2emb.train.memory import (ModelShape, auto_checkpointing, enable_activation_checkpointing,
                                          forward_passes)

        cfg = self.cfg
        if cfg.gradient_checkpointing or not cfg.gradient_checkpointing_auto:
            return
        passes = forward_passes(cfg.train_batch_size, cfg.query_length, cfg.passage_length, cfg.num_hard_neg,
                                cfg.grad_cache_chunk_size)
        element_bytes = 4 if self.precision.name == "fp32" else 2
        on, why = auto_checkpointing(ModelShape.of(self.embedder.backbone), passes, element_bytes,
                                     cfg.attn_implementation, self.accelerator.device)
        if on:
            enable_activation_checkpointing(self.embedder.backbone)
            self.accelerator.print(f"gradient checkpointing (auto): {why}")
        else:
            logger.info("gradient checkpointing (auto): %s", why)

    def _check_precision(self, precision: Precision, resumed: bool) -> Precision:
        """The precision the accelerator really applies (DeepSpeed's config may decide), logged once."""
        acc = self.accelerator
        effective = {v: k for k, v in MIXED_PRECISION.items()}.get(acc.mixed_precision)
        if effective != precision.name:
            if self._deepspeed and precision.setting == "auto" and not resumed and effective is not None:
                precision = Precision(effective, "auto", "auto under DeepSpeed: its config's bf16/fp16 sections "
                                      "decide")
            else:
                raise UserError(f"precision is {precision.name} ({precision.reason}) but this launch computes in "
                                f"{acc.mixed_precision} (its DeepSpeed config decides); make the DeepSpeed config's "
                                "bf16 / fp16 sections and the precision field agree.")
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        ignored = (f"; the launcher's mixed_precision={launcher} does not apply, the config's precision decides"
                   if launcher and launcher != acc.mixed_precision else "")
        if acc.is_main_process:
            logger.info("training: %s%s", precision.describe(), ignored)
        return precision

    def _launch_info(self) -> dict[str, Any]:
        acc = self.accelerator
        return {"num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
                "mixed_precision": acc.mixed_precision, "device": str(acc.device),
                # what a resume must keep (see training_precision); `precision_setting` is cfg.precision
                "precision": self.precision.name, "precision_setting": self.precision.setting,
                "precision_reason": self.precision.reason,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "global_batch_size": self.cfg.train_batch_size * acc.num_processes,
                "trainable_parameters": sum(p.numel() for p in self.embedder.parameters() if p.requires_grad),
                "data": {k: self.data_info.get(k) for k in ("tokenizer", "max_seq_length",
                                                            "instruction_separator", "llm2emb_version")}}

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        # Checked from trainer_state.json before `load_state`: with FSDP / DeepSpeed loading is collective,
        # and shards of another world size fail on some processes only, leaving the others waiting forever.
        # Every process reads the same file, so all of them stop here alike.
        state = ckpt.checkpoint_state(path)
        if state.get("num_processes") != acc.num_processes:
            raise UserError(f"Checkpoint {path} was written by {state.get('num_processes')} process(es) but this "
                            f"launch has {acc.num_processes}; resume with the same number of processes.")
        if state.get("total_steps") != self.total_steps:
            raise UserError(f"Checkpoint {path} belongs to a run of {state.get('total_steps')} steps but this "
                            f"config gives {self.total_steps}; the data or the config changed.")
        ckpt.load_checkpoint(acc, path)
        self.batcher.load_state_dict(state["batcher"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.skipped = int(state.get("skipped_steps", 0))
        self.seconds_before = float(state.get("train_seconds", 0.0))
        self.resume_position = True
        self.resumed_from = self.step
        acc.print(f"resumed from {path} (step {self.step} of {self.total_steps})")

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batcher": self.batcher.state_dict(),
                "num_processes": self.accelerator.num_processes, "total_steps": self.total_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite, "skipped_steps": self.skipped,
                "train_seconds": round(self.seconds_before + time.perf_counter() - self.started, 3)}

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        if not self.setup():
            logger.info("run %s is already complete; delete it or change experiment_id to train again",
                        self.cfg.run_dir)
            return TrainResult(self.cfg.run_dir, self.cfg.run_dir / FINAL_DIR, 0, 0, already_complete=True)
        cfg, acc = self.cfg, self.accelerator
        from llm2emb.train.trackers import start_trackers

        writer = MetricsWriter(self.run_dir, lambda: start_trackers(cfg, self.run_dir), self.total_steps, self.step,
                               acc.is_main_process, self.show_progress)
        running, speed = RunningMean(), Throughput()
        global_batch = cfg.train_batch_size * acc.num_processes
        result = TrainResult(self.run_dir, self.run_dir / FINAL_DIR, self.step, self.total_steps, self.resumed_from)
        started = self.started = time.perf_counter()
        start_step = self.step
        self.model.train()
        try:
            while self.step < self.total_steps:
                if not self.resume_position:
                    self.batcher.set_epoch(self.epoch)
                self.resume_position = False
                for batch in self.batcher:
                    self._train_step(batch, running)
                    self.step += 1
                    speed.add(global_batch)
                    if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                        values = self._reduce(running.pop())
                        values.update(lr=self.scheduler.get_last_lr()[0], samples_per_s=speed.rate(),
                                      epoch=self.epoch + 1)
                        result.last_train = values
                        writer.log("train", self.step, values)
                        writer.progress(1, {"loss": values.get("loss", float("nan")), "lr": values["lr"],
                                            "samples/s": values["samples_per_s"]})
                    else:
                        writer.progress(1)
                    if cfg.validation_steps and self.step % cfg.validation_steps == 0:
                        result.last_validation = self._validate(writer)
                        speed.reset()  # samples/s measures training only
                    if cfg.eval_steps and (self.step % cfg.eval_steps == 0 or self.step == self.total_steps):
                        self._periodic_eval(writer)
                        speed.reset()
                    if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0 \
                            and self.step < self.total_steps:
                        ckpt.save_checkpoint(acc, self.embedder, self.run_dir, self.step, self._trainer_state(),
                                             cfg.save_total_limit, model=self.model)
                        speed.reset()
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
            if cfg.validation_steps and self.total_steps % cfg.validation_steps != 0:
                result.last_validation = self._validate(writer)
        finally:
            writer.close()
        result.train_seconds = time.perf_counter() - started
        result.steps = self.step
        result.skipped_steps = self.skipped
        done = self.step - start_step
        result.samples_per_second = done * global_batch / result.train_seconds if done else 0.0
        self._save_final(result)
        return result

    def _train_step(self, batch, running: RunningMean) -> None:
        """One update, or one skipped on every process alike when the loss or gradient is not finite.

        A skipped step still consumes its batch and advances the learning-rate schedule; it counts in
        `skipped_steps`, and MAX_CONSECUTIVE_NONFINITE in a row stop the run (TrainingDiverged).

        NaN / inf loss on any process, every launcher: found before backward by an all-reduce of a
        non-finite flag; no process runs backward or the optimizer, so weights and optimizer state are those
        of the previous step.

        NaN / inf gradient with a finite loss:
          1 process, DDP   the global gradient norm (identical on every process: DDP averages gradients
                           first) is not finite -> no optimizer step anywhere; weights unchanged.
          FSDP2 (GPU only) the same, with accelerate's norm over the sharded gradients (untested here).
          precision=fp16   (not DeepSpeed; untested here) accelerate's GradScaler: the optimizer step still runs,
                           the scaler skips the update and lowers its scale; counted as skipped, and toward
                           TrainingDiverged only once the scale is below 1.
          DeepSpeed ZeRO-2 the engine steps inside backward(), so only it can skip: with fp16 (loss scaling)
                           and with bf16 when `bf16.check_grad_overflow` is on (llm2emb turns it on for
                           DeepSpeed >= 0.17.1 unless the config sets it; DeepSpeed's default from 0.19.3)
                           the engine agrees on the overflow over processes and skips the update; counted
                           as a skipped step. Without that check (fp32, older DeepSpeed, or turned off) the
                           update is applied: the run stops at once with TrainingDiverged naming the last
                           checkpoint, instead of training on NaN weights.
        """
        cfg, acc = self.cfg, self.accelerator
        encoded = self._collate(batch)
        out, cached = self._loss(encoded, self.step)
        # Decided before backward, from the loss of every process: under DeepSpeed `backward()` also runs the
        # optimizer step, so a check after it could skip nothing.
        if not self._finite_on_every_process(out.total):
            self._skip_update(batch, "the loss")
        else:
            if cached is not None:
                cached.backward(out.total, acc.backward, lambda: acc.no_sync(self.model))
            else:
                acc.backward(out.total)
            norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            deepspeed = self._deepspeed
            # A second host sync (the norm): every process has the same global norm, so all decide alike.
            if deepspeed and self.optimizer.step_was_skipped:
                # the engine's own overflow check (agreed over processes) skipped it; its norm is stale then
                self._skip_update(batch, "the gradient")
            elif norm is None or math.isfinite(float(norm)):
                self.optimizer.step()  # a no-op under DeepSpeed, whose engine stepped inside backward()
                self.consecutive_nonfinite = 0
                running.add("loss", out.total)
                running.add(f"loss/{batch.dataset}", out.total)
                for name, value in out.parts.items():
                    running.add(name, value)
                if norm is not None:
                    running.add("grad_norm", norm)
            elif deepspeed:
                latest = ckpt.latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"Training stopped at step {self.step + 1}: DeepSpeed applied an update whose gradient was NaN "
                    "or infinite, so the weights are unusable; turn on its overflow skip (\"bf16\": "
                    "{\"check_grad_overflow\": true}, DeepSpeed >= 0.17.1) or lower learning_rate, and resume "
                    f"from the last good checkpoint ({latest or 'none'}).")
            elif acc.scaler is not None:
                # precision=fp16: an inf in the scaled gradient is how the GradScaler finds its scale too large.
                # Its step skips the update and halves the scale; without that step the scale never comes
                # down and every later step overflows too. Such skips stop the run only once the scale is
                # below 1, where an overflow no longer comes from the scale.
                self.optimizer.step()
                self._skip_update(batch, "the fp16 gradient", counts=acc.scaler.get_scale() < 1.0)
            else:
                self._skip_update(batch, "the gradient")
        with warnings.catch_warnings():  # after a skipped update torch warns that the optimizer did not step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _collate(self, batch) -> EncodedBatch:
        """The batch's model inputs on the training device, with the on-the-fly teacher's view when there is one."""
        cfg = self.cfg
        encoded = collate_batch(self.embedder, batch, cfg.query_length, cfg.passage_length)
        if self.teacher is not None:
            if encoded.teacher is not None:
                raise UserError(f"train_data_path {cfg.train_data_path} has teacher_* columns and teacher_model is "
                                f"set ({cfg.teacher_model}); use one teacher: drop teacher_model, or prepare the "
                                "data without a teacher.")
            encoded.teacher = self.teacher(batch)
        return encoded.to(self.accelerator.device)

    def _loss(self, encoded, step: int):
        """(LossOutput, gradient-cached step or None) of one batch; `step` seeds MNTP's masks (negative for
        validation batches), so a resumed run draws the same ones."""
        if self.objective is None:  # MNTP: the prepared module computes its loss
            from llm2emb.train.mntp import mask_seed

            return self.model(encoded, mask_seed(self.cfg.seed, step, self.accelerator.process_index)), None
        (q, p, n), cached = self._embed(encoded)
        return self.objective(q, p, n, encoded.use_inbatch, **encoded.loss_keys), cached

    def _embed(self, encoded) -> tuple[tuple, GradCachedStep | None]:
        """(q, p, n) of a batch, and the gradient-cached step that made them when `grad_cache_chunk_size` is
        smaller than the batch's largest forward pass (its `backward` then fills the gradients), else None."""
        chunk = self.cfg.grad_cache_chunk_size
        if 0 < chunk < largest_side(encoded):
            cached = GradCachedStep(self.model, encoded, chunk)
            return cached.embed(), cached
        return self.model(encoded), None

    def _check_grad_cache(self) -> None:
        """The cached step runs several backward passes per update: DeepSpeed's engine steps inside each one,
        and FSDP's deferred reduction is untested here, so both are refused rather than silently wrong."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if self.cfg.grad_cache_chunk_size and kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise UserError(f"grad_cache_chunk_size={self.cfg.grad_cache_chunk_size} is not supported under "
                            f"{kind.value}; set it to 0, or launch with DDP (configs/accelerate_*.yaml without "
                            "DeepSpeed / FSDP)")

    @property
    def _deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _finite_on_every_process(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every process (collective: one all-reduce of one number)."""
        acc = self.accelerator
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        return not bool(bad.item())

    def _skip_update(self, batch, what: str, counts: bool = True) -> None:
        """Count a skipped update (the same on every process); stop after too many in a row that `count`
        (fp16 loss-scale calibration does not)."""
        self.skipped += 1
        if not counts:
            logger.info("step %d: %s overflowed; update skipped, loss scale lowered", self.step + 1, what)
            return
        self.consecutive_nonfinite += 1
        logger.warning("step %d: %s is not finite on some process (dataset %s); skipped this update on all "
                       "(%d in a row)", self.step + 1, what, batch.dataset, self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            latest = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"Training stopped at step {self.step + 1}: the loss or its gradient was NaN or infinite for "
                f"{self.consecutive_nonfinite} steps in a row; lower learning_rate or check the data "
                f"(last good checkpoint: {latest or 'none'}).")

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over processes of the logged values (collective; every process has the same keys)."""
        acc = self.accelerator
        if acc.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=acc.device)
        reduced = acc.reduce(tensor, reduction="mean")
        return dict(zip(keys, reduced.tolist()))

    @torch.no_grad()
    def _validate(self, writer: MetricsWriter) -> dict[str, float]:
        """Mean loss over the held-out rows, per dataset and overall (weighted by batches)."""
        acc = self.accelerator
        names = self.datasets
        index = {name: i for i, name in enumerate(names)}
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=acc.device)
        counts = torch.zeros(len(names) + 1, dtype=torch.float64, device=acc.device)
        self.model.eval()
        for number, batch in enumerate(self.batcher.validation_batches()):
            encoded = self._collate(batch)
            # chunked like training (bounded memory here too); MNTP draws the same masks at every validation
            loss = self._loss(encoded, -1 - number)[0].total.double()
            i = index.get(batch.dataset, len(names))
            sums[i] += loss
            counts[i] += 1
        self.model.train()
        if acc.num_processes > 1:
            sums, counts = acc.reduce(sums, "sum"), acc.reduce(counts, "sum")
        if counts.sum() == 0:
            return {}
        values = {"loss": float(sums.sum() / counts.sum())}
        for name, i in index.items():
            if counts[i] > 0:
                values[f"loss/{name}"] = float(sums[i] / counts[i])
        writer.log("validation", self.step, values)
        acc.print(f"[validation] step {self.step}: loss {values['loss']:.4f}")
        return values

    def _periodic_eval(self, writer: MetricsWriter) -> dict[str, float]:
        """The current model on `eval_tasks` (main process; the others wait): each task's main score, logged as
        an "eval" entry of metrics.jsonl at this step."""
        from llm2emb.eval.evaluate import evaluate_embedder
        from llm2emb.eval.tasks import TaskOptions

        cfg, acc = self.cfg, self.accelerator
        values: dict[str, float] = {}
        if acc.is_main_process:
            options = TaskOptions(limits=cfg.eval_limits, seed=cfg.seed, cache=False, show_progress=False,
                                  max_length=cfg.eval_max_length or cfg.max_seq_length)
            self.embedder.eval()
            try:
                records = evaluate_embedder(self.embedder, self.eval_tasks, label=f"step {self.step}",
                                            options=options, source=str(self.run_dir))
            finally:
                self.embedder.train()
            for record in records:
                name = record["task"]["name"]
                values[f"{name}/{record['main_score']}"] = float(record["metrics"][record["main_score"]])
            writer.log("eval", self.step, values)
            acc.print(f"[eval] step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        acc.wait_for_everyone()
        return values

    def _save_final(self, result: TrainResult) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        embedder = self.embedder
        embedder.eval()
        with ckpt.full_weights(self.model, acc.is_main_process):  # collective: FSDP shards are gathered
            if acc.is_main_process:
                embedder.save(self.run_dir / FINAL_DIR)
                if self.merge and embedder.is_lora:
                    embedder.save(self.run_dir / MERGED_DIR, merge_lora=True)
        if acc.is_main_process:
            summary = {"status": "complete", "steps": result.steps, "total_steps": result.total_steps,
                       "resumed_from": result.resumed_from,
                       # the whole run's training time, earlier processes included; samples/s is this process's
                       "train_seconds": round(self.seconds_before + result.train_seconds, 3),
                       "samples_per_second": round(result.samples_per_second, 3),
                       "skipped_steps": result.skipped_steps, "last_train": result.last_train,
                       "last_validation": result.last_validation,
                       "final": FINAL_DIR, "final_merged": MERGED_DIR if (self.run_dir / MERGED_DIR).exists() else None}
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        acc.wait_for_everyone()


def train(cfg: TrainConfig, show_progress: bool = True, merge: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train (or resume, or notice a finished run) as `cfg` says; returns where the model went.

    `overwrite`: delete the run folder (and its TensorBoard events) first and start over; the main process
    deletes, and every process waits for it before looking at the folder."""
    return Trainer(cfg, show_progress=show_progress, merge=merge, overwrite=overwrite).train()


def clear_run(cfg: TrainConfig) -> None:
    """Delete a run folder and its TensorBoard events (used by `--overwrite`)."""
    for path in (cfg.run_dir, cfg.tb_run_dir):
        if path.exists():
            shutil.rmtree(path)
