"""`merge_models`: merge several embedding models (runs, checkpoints, Embedder folders, LoRA adapters) into
one Embedder folder with a registered merge method.

Inputs are anything `llm2emb.layout.resolve_model_source` resolves: a run (its final model, else its newest
complete checkpoint), a checkpoint folder, an Embedder folder or a plain model folder. LoRA adapters are
folded into their base weights first (in float32), so every method sees full weights; `adapter_level=True`
with the linear method instead writes one LoRA adapter (`llm2emb.merge.adapters`). Trainable pooling and
head weights (modules.safetensors) are merged with the same method; a task-vector method (TIES, Model
Stock) merges them linearly when the base has no such weights (a plain LLM has no trained pooling).

Before any weights are loaded: the number of inputs, the weights, the method's options, the inputs'
pooling / head settings and their recorded base model (`llm2emb_config.json: base_model`) are checked; while
loading, every tensor's name and shape against the first input and the base. Each problem is one UserError
naming the input and the tensor. Weights are merged in float32 and the result is written in the first
input's dtype, atomically, with `merge_info.json` (method, options, inputs, weights, base) beside the
Embedder files: `Embedder.from_pretrained`, `llm2emb eval` and `llm2emb export` read it like any model.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2emb.atomic import atomic_dir, check_output_folder
from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_CONFIG, ModelSource, resolve_model_source
from llm2emb.merge.registry import MergeMethod, get_method, parse_options
from llm2emb.model.summary_token import uses_summary_token

logger = logging.getLogger(__name__)

MERGE_INFO = "merge_info.json"
# Embedder settings that decide which trainable tensors exist: inputs must agree on them.
ARCHITECTURE_FIELDS = ("pooling", "pooling_kwargs", "head", "head_dim")
# pooling cls (llm2emb.model.summary_token): inputs must insert the same summary token at the same place
SUMMARY_FIELDS = ("summary_token", "summary_token_position")
# Settings taken from the first input (a difference is logged, not refused).
SETTING_FIELDS = ("bidirectional", "skip_instruction", "instruction_separator", "max_length", "end_token",
                  "padding_side", "query_instruction", "attn_implementation")


@dataclass
class MergeInput:
    """One input as the user named it, resolved, with its saved llm2emb settings (empty for a plain LLM)."""

    index: int                   # 1-based, as in messages
    arg: str
    source: ModelSource
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"input {self.index} ({self.arg})"

    @property
    def path(self) -> str:
        return self.source.model_path

    @property
    def is_adapter(self) -> bool:
        return bool(self.settings.get("lora_adapter"))

    @property
    def base_model(self) -> str:
        """The model this one was trained from: recorded base_model, else the input itself (a plain LLM)."""
        return str(self.settings.get("base_model") or self.path)


@dataclass
class MergeResult:
    path: Path
    method: str
    inputs: list[str]
    weights: list[float]
    base: str | None
    linear_fallback: list[str]    # tensors merged linearly because the base lacks them
    adapter_level: bool
    seconds: float


def read_settings(path: str | Path) -> dict[str, Any]:
    """llm2emb_config.json of an Embedder folder, or {} for anything else."""
    file = Path(path) / EMBEDDER_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); the folder is damaged, save or export it again.") from exc
    return data if isinstance(data, dict) else {}


def same_model(a: str, b: str) -> bool:
    """Whether two model references (alias, hub id, path) name the same model."""
    return _canonical(a) == _canonical(b)


def _canonical(ref: str) -> str:
    from llm2emb.model.loading import BUILTIN_MODELS

    if ref in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[ref].converted_path.resolve())
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def describe_inputs(models: Sequence[str | os.PathLike[str]]) -> list[MergeInput]:
    inputs = []
    from llm2emb.model.loading import check_model_reference

    for i, model in enumerate(models, 1):
        check_model_reference(str(model), f"input {i} ({model})")
        source = resolve_model_source(model)
        inputs.append(MergeInput(i, str(model), source, read_settings(source.model_path)))
    return inputs


def check_inputs(inputs: Sequence[MergeInput], method: type[MergeMethod], weights: Sequence[float] | None,
                 any_base: bool = False) -> list[float]:
    """Checks that need no weights; returns the per-input weights (1 each unless given)."""
    n = len(inputs)
    if n < method.min_inputs:
        raise UserError(f"Merge method {method.name!r} needs at least {method.min_inputs} inputs, got {n}.")
    if method.max_inputs is not None and n > method.max_inputs:
        raise UserError(f"Merge method {method.name!r} takes exactly {method.max_inputs} inputs, got {n}.")
    paths = [_canonical(x.path) for x in inputs]
    for x, path in zip(inputs, paths):
        if paths.index(path) != x.index - 1:
            first = inputs[paths.index(path)]
            raise UserError(f"{x.label} is the same model as {first.label}; give each model once "
                            "(use --weights to weigh one more).")
    if weights is not None:
        if not method.uses_weights:
            raise UserError(f"Merge method {method.name!r} takes no --weights"
                            + (" (it interpolates with --param t=...)." if method.name == "slerp" else "."))
        if len(weights) != n:
            raise UserError(f"--weights has {len(weights)} values but there are {n} inputs; give one weight "
                            "per input, in input order.")
        for w in weights:
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and float(w) == float(w)
                    and abs(float(w)) != float("inf")):
                raise UserError(f"--weights must be finite numbers, got {w!r}.")
        for x, w in zip(inputs, weights):
            if float(w) < 0:
                raise UserError(f"--weights {' '.join(f'{v:g}' for v in weights)}: the weight of {x.label} is "
                                f"{float(w):g}; merge weights are each model's share and must be >= 0 (a negative "
                                "weight extrapolates away from that model, which no merge method here defines).")
        if not any(float(w) > 0 for w in weights):
            raise UserError(f"--weights {' '.join(f'{v:g}' for v in weights)} sum to 0, so no model has a share; "
                            "give at least one input a positive weight.")
    first = inputs[0]
    for x in inputs[1:]:
        # the base model first: a different base explains every other difference (pooling, shapes)
        if not any_base and not same_model(x.base_model, first.base_model):
            raise UserError(f"{x.label} was trained from {x.base_model!r} but {first.label} from "
                            f"{first.base_model!r}; merge models of one base model, or pass --any-base to merge "
                            "them anyway (tensor names and shapes must still match).")
        for key in ARCHITECTURE_FIELDS:
            mine, theirs = x.settings.get(key), first.settings.get(key)
            if key == "pooling":
                mine, theirs = mine or "eos", theirs or "eos"
            if key == "pooling_kwargs":
                mine, theirs = mine or {}, theirs or {}
            if mine != theirs:
                raise UserError(f"{x.label} has {key}={mine!r} but {first.label} has {theirs!r}; merge models with "
                                "the same pooling and head (their trainable weights must match).")
        if uses_summary_token(str(first.settings.get("pooling") or "eos")):
            for key in SUMMARY_FIELDS:
                if x.settings.get(key) != first.settings.get(key):
                    raise UserError(f"{x.label} has {key}={x.settings.get(key)!r} but {first.label} has "
                                    f"{first.settings.get(key)!r}; merge cls models that insert the same summary "
                                    "token at the same place (their token ids and rows must match).")
        differing = [k for k in SETTING_FIELDS if x.settings.get(k) != first.settings.get(k)]
        if differing:
            logger.warning("%s differs from %s in %s; the merged model takes %s's settings", x.label, first.label,
                           ", ".join(differing), "input 1")
    return [float(w) for w in weights] if weights is not None else [1.0] * n


def _load_state(path: str, label: str, like: Mapping[str, Any] | None = None):
    """(Embedder in float32 with any LoRA adapter folded in, its state dict).

    `like` (a base model of cls inputs: their llm2emb settings): load it with their summary token, so it has
    the token's row as the inputs had it before training (its init rule) and the same vocabulary size."""
    from llm2emb.model.embedder import Embedder

    extra: dict[str, Any] = {}
    if like is not None and uses_summary_token(str(like.get("pooling") or "eos")) \
            and not uses_summary_token(str(read_settings(path).get("pooling") or "eos")):
        extra = {"pooling": like["pooling"], "bidirectional": bool(like.get("bidirectional")),
                 **{k: like[k] for k in ("summary_token", "summary_token_position", "summary_token_init")
                    if like.get(k) is not None}}
    try:
        embedder = Embedder.from_pretrained(path, dtype="float32", **extra)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"Could not load {label}: {exc}") from exc
    if embedder.is_lora:
        embedder.merge_lora()
    state = {k: v.detach() for k, v in embedder.state_dict().items()}
    return embedder, state


#: the input embedding matrix's name ends so (one row per token of the vocabulary)
_EMBEDDING_ROWS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def _check_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], label: str,
                 reference_label: str) -> None:
    for key, tensor in reference.items():
        if key not in state:
            raise UserError(f"{label} has no tensor {key!r}, which {reference_label} has; merge models of the same "
                            "architecture.")
        if tuple(state[key].shape) != tuple(tensor.shape) and key.endswith(_EMBEDDING_ROWS):
            raise UserError(f"{label} has a vocabulary of {state[key].shape[0]} tokens but {reference_label} has "
                            f"{tensor.shape[0]} ({key}), so their token ids mean different tokens; merge models "
                            "with the same tokenizer and summary token (pooling cls adds one row).")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{label} has tensor {key!r} of shape {tuple(state[key].shape)} but {reference_label} "
                            f"has {tuple(tensor.shape)}; merge models of the same architecture and size.")
    extra = [key for key in state if key not in reference]
    if extra:
        raise UserError(f"{label} has tensor {extra[0]!r}, which {reference_label} lacks; merge models of the same "
                        "architecture.")


def check_output(output: Path, inputs: Sequence[MergeInput], overwrite: bool) -> None:
    out = _canonical(str(output))
    for x in inputs:
        if out == _canonical(x.path) or (x.source.run_dir is not None and out == _canonical(str(x.source.run_dir))):
            raise UserError(f"--output {output} is {x.label}; write the merged model to a new folder.")
    check_output_folder(output, overwrite, MERGE_INFO, "merge")


@dataclass
class MergePlan:
    """What `merge_models` will do, decided from the inputs' JSON files before any weights load
    (`llm2emb merge --dry-run` prints it)."""

    method: type[MergeMethod]
    merger: MergeMethod
    inputs: list[MergeInput]
    weights: list[float]
    output: Path
    base: str | None              # resolved base model of task-vector methods
    adapter_level: bool
    info: dict[str, Any]          # merge_info.json, without the results of the merge


def plan_merge(models: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], method: str = "linear",
               weights: Sequence[float] | None = None, base: str | None = None,
               options: Mapping[str, Any] | Sequence[str] | None = None, adapter_level: bool = False,
               any_base: bool = False, overwrite: bool = False) -> MergePlan:
    """Every check `merge_models` makes before loading weights (method and options, inputs, weights, output
    folder, base model, --adapter-level); writes nothing."""
    cls = get_method(method)
    opts = parse_options(cls, options)
    inputs = describe_inputs(models)
    if not inputs:
        raise UserError("No inputs to merge; name two or more runs, checkpoints or model folders.")
    weight_list = check_inputs(inputs, cls, weights, any_base)
    output = Path(output).expanduser()
    check_output(output, inputs, overwrite)
    merger = cls(opts, weight_list)
    base_ref: str | None = None
    if cls.uses_base:
        base_ref = base or inputs[0].base_model
        if base is None and not inputs[0].settings.get("base_model"):
            raise UserError(f"Merge method {method!r} needs the base model the inputs were fine-tuned from, and "
                            f"{inputs[0].label} records none; pass --base MODEL.")
        base_ref = resolve_model_source(base_ref).model_path
    elif base is not None:
        raise UserError(f"Merge method {method!r} does not use a base model; drop --base (it is for "
                        "task-vector methods: ties, model_stock).")
    if adapter_level:
        if method != "linear":
            raise UserError(f"--adapter-level works with the linear method only (a weighted sum of LoRA updates is "
                            f"again a LoRA update), not {method!r}.")
        if not opts.normalize:
            raise UserError("--adapter-level needs normalised weights (--param normalize=true): only then is the "
                            "merged adapter the average of the adapted models.")
    info = {"method": method, "options": asdict(opts), "inputs": [x.arg for x in inputs],
            "resolved_inputs": [x.source.description for x in inputs], "weights": weight_list, "base": base_ref,
            "adapter_level": adapter_level}
    return MergePlan(cls, merger, inputs, weight_list, output, base_ref, adapter_level, info)


def merge_models(models: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], method: str = "linear",
                 weights: Sequence[float] | None = None, base: str | None = None,
                 options: Mapping[str, Any] | Sequence[str] | None = None, adapter_level: bool = False,
                 any_base: bool = False, overwrite: bool = False) -> MergeResult:
    """Merge `models` into the Embedder folder `output` (see the module docstring)."""
    started = time.perf_counter()
    plan = plan_merge(models, output, method=method, weights=weights, base=base, options=options,
                      adapter_level=adapter_level, any_base=any_base, overwrite=overwrite)
    cls, merger, inputs, weight_list, output, base_ref, info = (plan.method, plan.merger, plan.inputs, plan.weights,
                                                                plan.output, plan.base, plan.info)
    if adapter_level:
        from llm2emb.merge.adapters import merge_adapters

        merge_adapters(inputs, output, merger.scaled, info)
        return MergeResult(output, method, info["inputs"], weight_list, None, [], True,
                           time.perf_counter() - started)

    template, reference = _load_state(inputs[0].path, inputs[0].label)
    saved_dtype = inputs[0].settings.get("dtype") or "float32"
    states = [reference]
    for x in inputs[1:]:
        loaded, state = _load_state(x.path, x.label)
        _check_state(state, reference, x.label, inputs[0].label)
        if loaded.summary_token_id != template.summary_token_id:   # same vocabulary size, other token ids
            raise UserError(f"{x.label} has its summary token at id {loaded.summary_token_id} but {inputs[0].label} "
                            f"at {template.summary_token_id}, so their tokenizers differ; merge cls models with the "
                            "same tokenizer.")
        del loaded
        states.append(state)
    base_state: dict[str, torch.Tensor] = {}
    if cls.uses_base:
        _, base_state = _load_state(base_ref, f"base {base_ref}", like=inputs[0].settings)
        for key, tensor in base_state.items():
            if key in reference and tuple(tensor.shape) != tuple(reference[key].shape) and key.endswith(
                    _EMBEDDING_ROWS):
                raise UserError(f"Base {base_ref} has a vocabulary of {tensor.shape[0]} tokens but "
                                f"{inputs[0].label} has {reference[key].shape[0]} ({key}); pass the base model the "
                                "inputs were fine-tuned from (--base).")
            if key in reference and tuple(tensor.shape) != tuple(reference[key].shape):
                raise UserError(f"Base {base_ref} has tensor {key!r} of shape {tuple(tensor.shape)} but "
                                f"{inputs[0].label} has {tuple(reference[key].shape)}; pass the base model the "
                                "inputs were fine-tuned from (--base).")
        missing = [k for k in reference if k.startswith("backbone.") and k not in base_state]
        if missing:
            raise UserError(f"Base {base_ref} has no tensor {missing[0]!r}, which {inputs[0].label} has; pass the "
                            "base model the inputs were fine-tuned from (--base).")

    from llm2emb.merge.linear import LinearMerge

    fallback = LinearMerge(LinearMerge.Options(), weight_list)
    linear_fallback: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in list(reference):
            tensors = [state[key] for state in states]
            if not tensors[0].is_floating_point():
                for x, tensor in zip(inputs[1:], tensors[1:]):
                    if not torch.equal(tensor, tensors[0]):
                        raise UserError(f"{x.label} has a different integer tensor {key!r} than {inputs[0].label}; "
                                        "merge models of the same architecture.")
                merged[key] = tensors[0].clone()
            elif cls.uses_base and key not in base_state:
                linear_fallback.append(key)
                merged[key] = fallback.merge(tensors, None)
            else:
                merged[key] = merger.merge(tensors, base_state.get(key))
            for state in states[1:]:
                del state[key]     # frees the other inputs' tensors as the merge proceeds
    if linear_fallback:
        logger.info("%d tensors (%s) are not in the base model %s; merged linearly", len(linear_fallback),
                    ", ".join(linear_fallback[:4]), base_ref)
    states.clear()
    base_state.clear()
    template.load_state_dict(merged, strict=True)
    _save(template, saved_dtype, output, info | {"linear_fallback": linear_fallback})
    return MergeResult(output, method, info["inputs"], weight_list, base_ref, linear_fallback, False,
                       time.perf_counter() - started)


def _save(embedder, dtype: str, output: Path, info: dict[str, Any]) -> None:
    """Embedder folder + merge_info.json, all appearing at once."""
    from llm2emb import __version__
    from llm2emb.model.embedder import DTYPES

    embedder.to(DTYPES[dtype])
    embedder.config.dtype = dtype
    embedder.config.lora_adapter = False
    with atomic_dir(output) as tmp:
        inner = embedder.save(tmp / "model")
        for child in inner.iterdir():
            os.replace(child, tmp / child.name)
        inner.rmdir()
        info = {**info, "llm2emb_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
