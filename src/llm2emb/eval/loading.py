"""Find and load the model an evaluation names: whatever `Embedder.from_pretrained` loads (alias, hub id,
Hugging Face folder, .gguf, saved Embedder folder), a training run (`output_dir/experiment_id/`, its
`final/`), a checkpoint (`checkpoints/step_N/`, an Embedder folder in it or in its `model/`), a bare peft
adapter folder, a sentence-transformers folder (`modules.json`; a hub model as `st:<id>`), or mteb's own
implementation of a published model (`mteb:<name>`, e.g. `mteb:BAAI/bge-m3`; MTEB tasks only).

A training config (the seed's JSON/YAML, `--config`) supplies the settings the seed's
`evaluate_extractor_mteb.py --config ... --ckpt_dir ...` takes from it: `pooling_mode`, `bi_attn_enabled`,
`skip_instruction`, `instruction_separator`, `max_seq_length`, `attn_implementation`, the summary token of
`pooling_mode: cls` (`summary_token*`), and `model_path` as the base model. Explicit command-line options win over the config, the config over a saved folder.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_CONFIG, is_embedder_folder, resolve_model_source
from llm2emb.model.attention import runnable_attn_implementation

logger = logging.getLogger(__name__)

#: seed config field -> Embedder.from_pretrained argument
CONFIG_FIELDS: dict[str, str] = {
    "pooling_mode": "pooling",
    "bi_attn_enabled": "bidirectional",
    "skip_instruction": "skip_instruction",
    "instruction_separator": "instruction_separator",
    "max_seq_length": "max_length",
    "end_token": "end_token",
    "attn_implementation": "attn_implementation",
    "summary_token": "summary_token",
    "summary_token_position": "summary_token_position",
    "summary_token_init": "summary_token_init",
}
@dataclass
class LoadedModel:
    """The model to evaluate plus what a result file records about where it came from."""

    model: Any                      # Embedder, SentenceTransformer or mteb ModelMeta
    kind: str                       # "llm2emb", "sentence-transformers" or "mteb"
    source: str                     # what was loaded (path or id)
    label: str                      # default row label in reports
    settings: dict[str, Any] = field(default_factory=dict)  # overrides applied (from config and flags)
    config_path: str | None = None


def read_training_config(path: str | Path) -> dict[str, Any]:
    """The fields of a training config (JSON or YAML) that decide embeddings, as `Embedder.from_pretrained`
    arguments, plus `model_path` when present. Other fields are ignored (eval needs no full validation)."""
    from llm2emb.config import read_config_file

    raw = read_config_file(path)
    out: dict[str, Any] = {}
    for key, arg in CONFIG_FIELDS.items():
        if raw.get(key) is not None:
            out[arg] = raw[key]
    for key in ("bidirectional", "skip_instruction"):
        if key in out and not isinstance(out[key], bool):
            field_name = next(k for k, v in CONFIG_FIELDS.items() if v == key)
            raise UserError(f"Config file {path}: field {field_name!r} must be true or false, got {out[key]!r}.")
    if "attn_implementation" in out:
        out["attn_implementation"] = runnable_attn_implementation(str(out["attn_implementation"]))
    if raw.get("representation") not in (None, "dense"):  # multi_vector / sparse / hybrid and its options
        from llm2emb.model.representations.settings import train_options

        out["representation"] = str(raw["representation"])
        out["representation_options"] = train_options(raw)
    if raw.get("model_path"):
        out["model_path"] = str(raw["model_path"])
    return out


def find_embedder_dir(path: Path) -> Path | None:
    """The saved Embedder folder `path` means (itself, a checkpoint's `model/`, a run's `final/` or newest
    complete checkpoint), or None when `path` is no Embedder folder, checkpoint or run."""
    source = resolve_model_source(path)
    found = Path(source.model_path)
    if source.checkpoint_step is not None and Path(path).resolve() == source.run_dir.resolve():
        logger.info("run %s has no final/ model; using its newest complete checkpoint (step %d)", path,
                    source.checkpoint_step)
    return found if is_embedder_folder(found) else None


def _label(source: str, settings: dict[str, Any]) -> str:
    path = Path(source)
    name = source
    if path.exists():
        parts = [p for p in path.resolve().parts if p not in ("/", "final", "model", "checkpoints")]
        name = "/".join(parts[-2:]) if parts and re.match(r"(step|checkpoint)[-_]?\d+$", parts[-1]) else parts[-1]
    extras = [str(settings["pooling"])] if settings.get("pooling") else []
    if settings.get("representation") not in (None, "dense"):  # its pooling plays no part (or one head's)
        extras = [str(settings["representation"])]
    if settings.get("bidirectional"):
        extras.append("bi")
    if settings.get("skip_instruction"):
        extras.append("skip-instr")
    if settings.get("dim"):
        extras.append(f"dim={settings['dim']}")
    if settings.get("precision"):  # rows of the same model in fp32 and bf16 get different labels
        extras.append(str(settings["precision"]))
    if settings.get("backend"):  # the ONNX graph's rows next to the torch weights' rows
        extras.append(str(settings["backend"]))
    return f"{name} [{', '.join(extras)}]" if extras else name


def load_sentence_transformer(source: str, device: str | None = None):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UserError(f"{source} is a sentence-transformers model; install it with: "
                        "pip install 'llm2emb[st]'.") from exc
    return SentenceTransformer(source, device=device or "cpu")


def load_eval_model(model: str | None = None, *, config: str | None = None, ckpt: str | None = None,
                    pooling: str | None = None, bidirectional: bool | None = None, max_length: int | None = None,
                    skip_instruction: bool | None = None, dtype: str | None = None, device: str | None = None,
                    dim: int | None = None, end_token: str | None = None,
                    precision: str | None = None, default_precision: str | None = None, backend: str = "torch",
                    onnx_file: str | None = None) -> LoadedModel:
    """Load what `llm2emb eval --model/--config/--ckpt` names (see module docstring).

    `precision` (auto | fp32 | bf16 | fp16) is the encode precision of an llm2emb model; None keeps the saved
    model's (fp32 unless saved otherwise), or `default_precision` when that is given (llm2emb's commands pass
    `model.precision.ENCODE_DEFAULT`, auto). The default is not a user setting: it applies to llm2emb models
    on the torch backend only and does not enter row labels. A training config's `precision` is not used: it is
    how the run trained, not how its model should be evaluated. `backend="onnx"` evaluates the ONNX graph
    (`onnx_file`, default onnx/model.onnx) of an `llm2emb export --onnx` folder instead of its torch weights."""
    loaded = _load_eval_model(model, config=config, ckpt=ckpt, pooling=pooling, bidirectional=bidirectional,
                              max_length=max_length, skip_instruction=skip_instruction, dtype=dtype, device=device,
                              dim=dim, end_token=end_token, precision=precision, backend=backend,
                              onnx_file=onnx_file)
    if loaded.kind == "llm2emb" and backend == "torch" and precision is None and default_precision is not None:
        loaded.model.config.precision = default_precision
    return loaded


def _onnx_folder(path: Path, source: str, backend: str, settings: dict[str, Any]) -> Path:
    """The exported Embedder folder whose ONNX graph `--backend onnx` evaluates; refuses a source that is not
    one and settings the fixed graph cannot change (only max_length, and precision auto / fp32)."""
    embedder_dir = find_embedder_dir(path) if path.is_dir() else None
    if embedder_dir is None:
        raise UserError(f"--backend {backend} evaluates the ONNX graph of an `llm2emb export --onnx` folder; "
                        f"{source} is not one.")
    fixed = sorted(k for k, v in settings.items()
                   if k != "max_length" and not (k == "precision" and v in ("auto", "fp32")))
    if fixed:
        raise UserError(f"--backend {backend} runs the exported graph as it is; "
                        f"{', '.join('--' + k.replace('_', '-') for k in fixed)} cannot be changed there "
                        "(export again with the setting, or use --backend torch).")
    return embedder_dir


def _source_and_settings(model: str | None, config: str | None, ckpt: str | None,
                         **flags: Any) -> tuple[str, dict[str, Any]]:
    """The model to evaluate and its Embedder settings: a training config's fields (its `model_path` is the
    source when no --model / --ckpt names one), then the flags that were given. Shared by loading and
    `plan_eval_model`, so a dry run labels a model as loading does."""
    settings: dict[str, Any] = {}
    base_from_config = None
    if config:
        cfg = read_training_config(config)
        base_from_config = cfg.pop("model_path", None)
        settings.update(cfg)
    settings.update({k: v for k, v in flags.items() if v is not None})
    source = ckpt or model or base_from_config
    if not source:
        raise UserError("Name the model to evaluate with --model (or --ckpt, or a --config with model_path).")
    return source, settings


def _load_eval_model(model: str | None, *, config: str | None, ckpt: str | None, pooling: str | None,
                     bidirectional: bool | None, max_length: int | None, skip_instruction: bool | None,
                     dtype: str | None, device: str | None, dim: int | None, end_token: str | None,
                     precision: str | None, backend: str, onnx_file: str | None) -> LoadedModel:
    from llm2emb.model.embedder import Embedder

    source, settings = _source_and_settings(model, config, ckpt, pooling=pooling, bidirectional=bidirectional,
                                            max_length=max_length, skip_instruction=skip_instruction, dtype=dtype,
                                            end_token=end_token, precision=precision)
    label_settings = {**settings, "dim": dim}

    if source.startswith("mteb:"):
        from llm2emb.eval.mteb_adapter import get_mteb_model_meta

        if settings or dim:
            raise UserError(f"{source} runs as mteb implements it; pooling, bidirectional, skip-instruction, "
                            "max-length, precision and dim settings apply to llm2emb models only.")
        meta = get_mteb_model_meta(source[5:])
        return LoadedModel(meta, "mteb", meta.name, meta.name, {}, config)
    if source.startswith("st:"):
        st_id = source[3:]
        return LoadedModel(load_sentence_transformer(st_id, device), "sentence-transformers", st_id,
                           _label(st_id, {"dim": dim}), {}, config)
    path = Path(source).expanduser()
    if backend != "torch" or onnx_file:
        embedder_dir = _onnx_folder(path, source, backend, settings)
        loaded = Embedder.from_pretrained(embedder_dir, backend=backend, onnx_file=onnx_file,
                                          max_length=settings.get("max_length"))
        return LoadedModel(loaded, "llm2emb", str(embedder_dir), _label(str(embedder_dir), {
            **label_settings, "pooling": loaded.config.pooling, "bidirectional": loaded.config.bidirectional,
            "backend": f"{backend}:{Path(loaded.file_name).name}"}), settings, config)
    if path.is_dir():
        embedder_dir = find_embedder_dir(path)
        if embedder_dir is not None:
            loaded = Embedder.from_pretrained(embedder_dir, device=device, **settings)
            return LoadedModel(loaded, "llm2emb", str(embedder_dir), _label(str(embedder_dir), {
                **label_settings, "pooling": loaded.config.pooling, "bidirectional": loaded.config.bidirectional,
                "representation": loaded.config.representation,
                "skip_instruction": loaded.config.skip_instruction}), settings, config)
        if (path / "modules.json").is_file():
            if settings:
                raise UserError(f"{path} is a sentence-transformers folder; pooling, bidirectional, skip-instruction, "
                                "max-length and precision settings apply to llm2emb models only (its modules "
                                "decide them).")
            return LoadedModel(load_sentence_transformer(str(path), device), "sentence-transformers", str(path),
                               _label(str(path), {"dim": dim}), {}, config)
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            base = (model if ckpt and model else None) or base_from_config or json.loads(
                (path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise UserError(f"{path} is a LoRA adapter without a base model; pass the base with --model or a "
                                "--config whose model_path names it.")
            loaded = Embedder.from_pretrained(base, device=device, **settings)
            loaded.load_lora(str(path), is_trainable=False)
            loaded.eval()
            return LoadedModel(loaded, "llm2emb", str(path), _label(str(path), {
                **label_settings, "pooling": loaded.config.pooling}), settings, config)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} holds no {EMBEDDER_CONFIG} (nor model/{EMBEDDER_CONFIG} or final/), no "
                            "config.json and no modules.json; pass an Embedder folder, a training run or checkpoint "
                            "folder, a Hugging Face model folder or a sentence-transformers folder.")
    # an LLM: alias, hub id, .gguf file or Hugging Face folder; pooling defaults to eos as in the seed
    loaded = Embedder.from_pretrained(source, device=device, **settings)
    return LoadedModel(loaded, "llm2emb", source, _label(source, {**label_settings, "pooling": loaded.config.pooling,
                                                                    "bidirectional": loaded.config.bidirectional}),
                       settings, config)


@dataclass
class EvalModelPlan:
    """What `load_eval_model` would load, found without loading any weights (`llm2emb eval --dry-run`)."""

    kind: str                       # "llm2emb", "sentence-transformers" or "mteb"
    source: str                     # what would be loaded (path or id)
    label: str                      # the row label, hence the result file names
    describe: str                   # one line for the user: what the source is


def plan_eval_model(model: str | None = None, *, config: str | None = None, ckpt: str | None = None,
                    pooling: str | None = None, bidirectional: bool | None = None, max_length: int | None = None,
                    skip_instruction: bool | None = None, dtype: str | None = None, dim: int | None = None,
                    end_token: str | None = None, precision: str | None = None, backend: str = "torch",
                    onnx_file: str | None = None) -> EvalModelPlan:
    """The same choice as `load_eval_model` (same arguments, same refusals of a missing or damaged model), made
    from the folders' JSON files alone: the saved Embedder settings decide the label as loading would. Local
    model folders are checked with `check_model_files`; built-in aliases and hub ids are not fetched."""
    from llm2emb.model.embedder import EmbedderConfig
    from llm2emb.model.loading import check_model_files, check_model_reference

    source, settings = _source_and_settings(model, config, ckpt, pooling=pooling, bidirectional=bidirectional,
                                            max_length=max_length, skip_instruction=skip_instruction, dtype=dtype,
                                            end_token=end_token, precision=precision)
    label_settings = {**settings, "dim": dim}

    def saved_config(folder: Path, overrides: dict[str, Any]) -> EmbedderConfig:
        check_model_files(folder)
        saved = json.loads((folder / EMBEDDER_CONFIG).read_text(encoding="utf-8"))
        return EmbedderConfig.from_dict({**saved, **overrides})

    if source.startswith("mteb:"):
        from llm2emb.eval.mteb_adapter import get_mteb_model_meta

        if settings or dim:
            raise UserError(f"{source} runs as mteb implements it; pooling, bidirectional, skip-instruction, "
                            "max-length, precision and dim settings apply to llm2emb models only.")
        meta = get_mteb_model_meta(source[5:])
        return EvalModelPlan("mteb", meta.name, meta.name, f"mteb's implementation of {meta.name}")
    if source.startswith("st:"):
        st_id = source[3:]
        return EvalModelPlan("sentence-transformers", st_id, _label(st_id, {"dim": dim}),
                             f"sentence-transformers model {st_id} (hub)")
    path = Path(source).expanduser()
    if backend != "torch" or onnx_file:
        embedder_dir = _onnx_folder(path, source, backend, settings)
        graph = embedder_dir / (onnx_file or "onnx/model.onnx")
        if not graph.is_file():
            raise UserError(f"{embedder_dir} has no ONNX graph {graph.relative_to(embedder_dir)}; export it with "
                            "`llm2emb export --onnx`, or pass --onnx-file.")
        saved = saved_config(embedder_dir, {})
        return EvalModelPlan("llm2emb", str(embedder_dir), _label(str(embedder_dir), {
            **label_settings, "pooling": saved.pooling, "bidirectional": saved.bidirectional,
            "backend": f"{backend}:{graph.name}"}), f"ONNX graph {graph}")
    if path.is_dir():
        embedder_dir = find_embedder_dir(path)
        if embedder_dir is not None:
            saved = saved_config(embedder_dir, settings)
            if saved.lora_adapter:   # loading it loads the base model too
                check_model_reference(saved.base_model, f"the base model of the LoRA adapter {embedder_dir}")
            return EvalModelPlan("llm2emb", str(embedder_dir), _label(str(embedder_dir), {
                **label_settings, "pooling": saved.pooling, "bidirectional": saved.bidirectional,
                "representation": saved.representation, "skip_instruction": saved.skip_instruction}),
                f"llm2emb model folder {embedder_dir}")
        if (path / "modules.json").is_file():
            if settings:
                raise UserError(f"{path} is a sentence-transformers folder; pooling, bidirectional, skip-instruction, "
                                "max-length and precision settings apply to llm2emb models only (its modules "
                                "decide them).")
            return EvalModelPlan("sentence-transformers", str(path), _label(str(path), {"dim": dim}),
                                 f"sentence-transformers folder {path}")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            check_model_files(path)
            base = (model if ckpt and model else None) or base_from_config or json.loads(
                (path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise UserError(f"{path} is a LoRA adapter without a base model; pass the base with --model or a "
                                "--config whose model_path names it.")
            check_model_reference(str(base), "the adapter's base model")
            planned = EmbedderConfig.from_dict({"base_model": str(base), **settings})
            return EvalModelPlan("llm2emb", str(path), _label(str(path), {**label_settings,
                                                                           "pooling": planned.pooling}),
                                 f"LoRA adapter {path} on {base}")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} holds no {EMBEDDER_CONFIG} (nor model/{EMBEDDER_CONFIG} or final/), no "
                            "config.json and no modules.json; pass an Embedder folder, a training run or checkpoint "
                            "folder, a Hugging Face model folder or a sentence-transformers folder.")
    from llm2emb.model.loading import BUILTIN_MODELS

    check_model_reference(source, "--model")
    planned = EmbedderConfig.from_dict({"base_model": source, **settings})
    where = ("" if path.exists() else " (built-in alias, not fetched)" if source in BUILTIN_MODELS
             else " (hub id, not fetched)")
    return EvalModelPlan("llm2emb", source, _label(source, {**label_settings, "pooling": planned.pooling,
                                                            "bidirectional": planned.bidirectional}),
                         f"LLM {source}{where}")
