"""The model a training stage starts from: the previous result as it is, or a folder made for the stage.

A stage trains directly from its source (the pipeline's model or an earlier stage's result) unless one of
these needs a folder of its own (`stages/<stage>/input/`, written atomically, weights hard-linked where the
file system allows, copied otherwise):

  * dropout: the stage wants other dropout values than the source's config (SimCSE sets attention / hidden
    dropout; later stages go back to the starting model's values, decoder LLMs usually 0);
  * the source is a LoRA adapter and the stage says `start: merge`: the adapter is folded into its base;
  * `start: continue`: the adapter's base (with the adapter folder's trained pooling / head weights) is the
    model and the adapter is trained on (`lora_adapter_path`);
  * the stage trains a new LoRA adapter on an earlier stage's full-weight result: the folder records itself as
    `base_model`, so the saved adapter loads over these weights and not over the original base.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2emb.atomic import atomic_dir
from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_CONFIG, EMBEDDER_MODULES

# config.json fields that set dropout in transformers' decoder configs (those present are set)
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")
HF_CONFIG = "config.json"


@dataclass
class StageInput:
    model_path: str
    lora_adapter_path: str = ""
    made: bool = False          # a folder was written for the stage


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_fingerprint(model: str) -> str:
    """The model as given, plus size and mtime of its files when it is a local folder (a model retrained at
    the same path gets a new fingerprint)."""
    from llm2emb.layout import resolve_model_source

    path = Path(resolve_model_source(model).model_path)
    if not path.is_dir():
        return str(model)
    parts = [str(path.resolve())]
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin"):
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def local_folder(model: str) -> Path | None:
    """The local folder of a model reference (folder, alias, .gguf), or None for a hub id."""
    from llm2emb.layout import resolve_model_source
    from llm2emb.model.loading import resolve_model_path

    path = Path(resolve_model_path(resolve_model_source(model).model_path))
    return path if path.is_dir() else None


def dropout_values(folder: Path | None) -> dict[str, float]:
    """The dropout fields of a model folder's config.json (the backbone config, or the base of an adapter)."""
    if folder is None:
        return {}
    settings = read_json(folder / EMBEDDER_CONFIG)
    if settings.get("lora_adapter") and settings.get("base_model"):
        folder = local_folder(settings["base_model"])
        if folder is None:
            return {}
    config = read_json(folder / HF_CONFIG)
    return {k: float(config[k]) for k in DROPOUT_FIELDS if isinstance(config.get(k), (int, float))
            and not isinstance(config.get(k), bool)}


def is_adapter(folder: str | Path) -> bool:
    return bool(read_json(Path(folder) / EMBEDDER_CONFIG).get("lora_adapter"))


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_copy(source: Path, target: Path, dropout: dict[str, float], extra: dict[str, Path] | None = None,
              settings: dict[str, Any] | None = None) -> None:
    """`source`'s files in `target` (hard links), config.json with `dropout`, llm2emb_config.json (when there
    is one, or `settings` is given) recording `target` as its base_model; `extra` files added (name -> path)."""
    target_abs = target.resolve()
    with atomic_dir(target) as tmp:
        for child in source.iterdir():
            if child.name.startswith(".") or child.name in (HF_CONFIG, EMBEDDER_CONFIG, "README.md"):
                continue
            _link_or_copy(child, tmp / child.name)
        config = read_json(source / HF_CONFIG)
        if not config:
            raise UserError(f"{source} has no readable {HF_CONFIG}; it is not a model folder.")
        config.update({k: v for k, v in dropout.items() if k in config})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        embedder = settings if settings is not None else read_json(source / EMBEDDER_CONFIG)
        if embedder:
            embedder = {**embedder, "base_model": str(target_abs), "lora_adapter": False}
            (tmp / EMBEDDER_CONFIG).write_text(json.dumps(embedder, indent=2) + "\n", encoding="utf-8")
        for name, path in (extra or {}).items():
            _link_or_copy(path, tmp / name)


def wanted_dropout(stage_dropout: float | None, start_values: dict[str, float],
                   source: Path | None) -> dict[str, float]:
    """The dropout values a stage trains with: its own `dropout` on every dropout field of the model, else the
    starting model's values."""
    fields = dropout_values(source) or start_values
    if stage_dropout is not None:
        if not fields and stage_dropout > 0:
            raise UserError(f"The model {source} has no dropout setting in its {HF_CONFIG} (none of "
                            f"{', '.join(DROPOUT_FIELDS)}), so a stage cannot train it with dropout {stage_dropout}.")
        return {k: float(stage_dropout) for k in fields}
    return {k: start_values.get(k, 0.0) for k in fields}


def prepare_stage_input(source: str, target: Path, *, dropout: float | None, start_values: dict[str, float],
                        start: str | None, trains_lora: bool, source_is_stage: bool) -> StageInput:
    """Where a training stage's model comes from (see the module docstring); writes `target` when needed."""
    from llm2emb.model.embedder import Embedder

    folder = local_folder(source)
    adapter = folder is not None and is_adapter(folder)
    if adapter and start == "merge":
        embedder = Embedder.from_pretrained(str(folder))
        merged = target.with_name(target.name + ".merged")
        embedder.save(merged, merge_lora=True)
        del embedder
        try:
            link_copy(merged, target, wanted_dropout(dropout, start_values, merged))
        finally:
            shutil.rmtree(merged, ignore_errors=True)
        return StageInput(str(target), made=True)
    if adapter and start == "continue":
        settings = read_json(folder / EMBEDDER_CONFIG)
        base = local_folder(settings["base_model"])
        if base is None:
            raise UserError(f"The adapter {folder} was trained over {settings['base_model']!r}, which is not a local "
                            "folder; continuing it needs the base weights on disk.")
        extra = {EMBEDDER_MODULES: folder / EMBEDDER_MODULES} if (folder / EMBEDDER_MODULES).exists() else {}
        link_copy(base, target, wanted_dropout(dropout, start_values, base), extra, settings=settings)
        return StageInput(str(target), lora_adapter_path=str(folder), made=True)
    if adapter:
        raise UserError(f"{folder} is a LoRA adapter; the stage needs start: merge or start: continue.")
    current = dropout_values(folder)
    wanted = wanted_dropout(dropout, start_values, folder)
    needs_dropout = any(current.get(k, 0.0) != v for k, v in wanted.items())
    needs_base = trains_lora and source_is_stage
    if not needs_dropout and not needs_base:
        return StageInput(source)
    if folder is None:       # a hub id: save a local copy first
        Embedder.from_pretrained(source).save(target.with_name(target.name + ".hub"))
        folder = target.with_name(target.name + ".hub")
    link_copy(folder, target, wanted)
    return StageInput(str(target), made=True)
