"""Resumable checkpoints, written atomically.

Layout of `output_dir/experiment_id/checkpoints/step_N/`:
    model/               an Embedder folder (`Embedder.save`; LoRA kept as an adapter), loadable on its own;
                         under FSDP the full weights are gathered first (`full_weights`)
    state/               `accelerator.save_state`: optimizer, scheduler, RNG of every process, and the
                         trainable weights (model.safetensors; frozen base weights are not duplicated)
    trainer_state.json   step, epoch, batcher position, ... written LAST

A checkpoint is built in `checkpoints/.step_N.partial/` and renamed to `step_N` only when complete, so a
crash while writing leaves a `.partial` folder (removed on the next start) and never a `step_N` that looks
usable. A `step_N` folder without `trainer_state.json` (e.g. copied half-way) is ignored as well.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2emb import layout
from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINTS = layout.CHECKPOINTS_DIR
TRAINER_STATE = layout.TRAINER_STATE
MODEL_DIR = layout.CHECKPOINT_MODEL_DIR
STATE_DIR = layout.CHECKPOINT_STATE_DIR
read_trainer_state = layout.read_trainer_state
complete_checkpoints = layout.complete_checkpoints
latest_checkpoint = layout.latest_checkpoint


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def remove_partial(run_dir: Path) -> None:
    """Delete leftovers of checkpoints interrupted while being written (main process only)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if layout.is_partial_checkpoint(child.name):
            logger.warning("removing interrupted checkpoint %s", child)
            shutil.rmtree(child, ignore_errors=True)


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def register_trainable_only_hooks(accelerator) -> None:
    """Make `save_state` / `load_state` store only the trainable weights.

    With LoRA the frozen base model is most of the bytes and it is rebuilt from `model_path` on resume, so
    saving it in every checkpoint would only cost disk and time. Loading checks that the checkpoint holds
    exactly the model's trainable parameters. DeepSpeed / FSDP save their own way (their hooks see no
    weights), so this is a no-op there."""
    from safetensors.torch import load_file

    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for i, model in enumerate(models[:len(weights)]):
            keep = _trainable_names(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            path = Path(input_dir) / name
            if not path.exists():
                raise UserError(f"Checkpoint {Path(input_dir).parent} has no {STATE_DIR}/{name}; it is damaged, "
                                "delete that checkpoint folder to resume from an older one.")
            state = load_file(str(path), device="cpu")
            expected = _trainable_names(model)
            if set(state) != expected:
                missing = sorted(expected - set(state))[:3]
                extra = sorted(set(state) - expected)[:3]
                raise UserError(f"Checkpoint {Path(input_dir).parent} does not match this model's trainable "
                                f"weights (missing {missing}, unexpected {extra}); it belongs to another "
                                "configuration.")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@contextmanager
def full_weights(model: nn.Module, is_main_process: bool) -> Iterator[None]:
    """Inside: the main process's `model` holds full, unsharded CPU weights (collective; all processes enter).

    Under FSDP2 every parameter is a DTensor holding this process's shard, and saving one needs the others'
    shards: a save on the main process alone would hang in that gather or write shards. So every process
    gathers each sharded parameter here (one all-gather each, in the same order everywhere); the main
    process keeps them on the CPU and swaps them into the modules until the block ends, when the sharded
    parameters go back. Without sharded parameters (one process, DDP, DeepSpeed ZeRO-2) it does nothing.
    """
    from torch.distributed.tensor import DTensor

    modules = list(model.modules())
    if not any(isinstance(p, DTensor) for m in modules for p in m._parameters.values()):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # A forward pass without backward (validation) leaves FSDP's root parameters unsharded, and saving
    # triggers FSDP's state_dict hook, which would put the shards back over the swapped-in weights: reshard
    # first, so that hook has nothing to do.
    for module in modules:
        if isinstance(module, FSDPModule):
            module.reshard()
    seen: set[int] = set()
    gathered: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for module in modules:
            for name, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in seen:  # tied weights: one gather, on every process alike
                    seen.add(id(param))
                    full = param.full_tensor()
                    if is_main_process:
                        gathered[id(param)] = nn.Parameter(full.cpu(), requires_grad=param.requires_grad)
                    del full
                if is_main_process:
                    swapped.append((module, name, param))
                    module._parameters[name] = gathered[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def save_embedder(accelerator, model: nn.Module, embedder, path: Path) -> None:
    """`embedder.save(path)` on the main process, with full weights under FSDP (collective)."""
    with full_weights(model, accelerator.is_main_process):
        if accelerator.is_main_process:
            embedder.save(path)


def save_checkpoint(accelerator, embedder, run_dir: Path, step: int, trainer_state: dict[str, Any],
                    total_limit: int = 0, model: nn.Module | None = None) -> Path:
    """Write checkpoints/step_{step} atomically; every process must call this (collective).

    `model`: the prepared model that holds `embedder` (needed to gather FSDP shards; default `embedder`)."""
    root = checkpoint_root(run_dir)
    final = root / layout.checkpoint_name(step)
    partial = root / layout.partial_checkpoint_name(step)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial / STATE_DIR))
    accelerator.wait_for_everyone()
    save_embedder(accelerator, embedder if model is None else model, embedder, partial / MODEL_DIR)
    if accelerator.is_main_process:
        write_json_atomic(partial / TRAINER_STATE, trainer_state)  # last: marks the checkpoint complete
        if final.exists():  # an incomplete leftover with the same name
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit > 0:
            for _, old in complete_checkpoints(run_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_state(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (reads one file; no collective, no weights)."""
    state = read_trainer_state(path)
    if state is None:
        raise UserError(f"Checkpoint {path} is incomplete (no {TRAINER_STATE}); delete it to resume from an "
                        "older one.")
    return state


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG and trainable weights from `path`; returns its trainer state.

    Collective under FSDP / DeepSpeed: check `checkpoint_state(path)` against the launch first."""
    state = checkpoint_state(path)
    accelerator.load_state(str(Path(path) / STATE_DIR))
    return state
