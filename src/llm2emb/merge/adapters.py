"""Linear merge of LoRA adapters at adapter level: one adapter whose update is the weighted sum of theirs.

A LoRA adapter adds s * B A to a weight W (A: r x in, B: out x r, s = lora_alpha / r, or alpha / sqrt(r)
with rsLoRA). For adapters 1..N over the same base and normalised weights w_i (sum 1),

    sum_i w_i (W + s_i B_i A_i) = W + [B_1 ... B_N] [w_1 s_1 A_1; ...; w_N s_N A_N]

so concatenating the ranks (peft's `add_weighted_adapter(combination_type="cat")`) gives an adapter of rank
sum r_i with lora_alpha = rank (s = 1) whose model equals the linear merge of the adapted models exactly,
without materialising full weights: the output stays a small adapter over the same base. The adapters must
share the base model and the adapted modules, and use plain LoRA (no DoRA, no rank / alpha patterns, no
trained biases or modules_to_save). Trainable pooling / head weights are averaged with the same weights, and
so are trained token rows (peft's `trainable_token_indices`, the summary token of pooling cls: they hold the
rows' values, so their weighted average is the linear merge's row exactly); the adapters must train the same
token rows.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm2emb.atomic import atomic_dir
from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_MODULES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's trained token rows (their values, not deltas, despite the name)
TOKEN_ROWS = "trainable_tokens_delta"
_SKIP = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, EMBEDDER_MODULES, "README.md", "merge_info.json"}


def _read_adapter(folder: Path, label: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{label} is not a LoRA adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} missing); "
                        "--adapter-level merges adapters only, drop it to merge full weights.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = [key for key, bad in (("use_dora", config.get("use_dora")),
                                        ("rank_pattern", config.get("rank_pattern")),
                                        ("alpha_pattern", config.get("alpha_pattern")),
                                        ("modules_to_save", config.get("modules_to_save")),
                                        ("bias", config.get("bias", "none") != "none"),
                                        ("lora_bias", config.get("lora_bias"))) if bad]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        what = unsupported[0] if unsupported else f"peft_type {config.get('peft_type')!r}"
        raise UserError(f"{label} uses {what}, which an adapter-level merge cannot combine; drop --adapter-level to "
                        "merge the folded full weights instead.")
    return config, load_file(str(weights_path))


def _scaling(config: dict[str, Any]) -> float:
    r, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pairs(state: dict[str, torch.Tensor], label: str) -> dict[str, tuple[str, str]]:
    """module prefix -> (A key, B key)."""
    out: dict[str, tuple[str, str]] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b = f"{prefix}.lora_B.weight"
            if b not in state:
                raise UserError(f"{label} has {key!r} without its {b!r}; the adapter file is damaged.")
            out[prefix] = (key, b)
        elif not key.endswith(".lora_B.weight") and TOKEN_ROWS not in key:
            raise UserError(f"{label} holds {key!r}, not a lora_A / lora_B matrix; drop --adapter-level to merge the "
                            "folded full weights instead.")
    return out


def merge_adapters(inputs: Sequence[Any], output: Path, weights: Sequence[float], info: dict[str, Any]) -> None:
    """Write the rank-concatenated adapter of `inputs` (MergeInput, all LoRA Embedder folders) to `output`."""
    from safetensors.torch import load_file, save_file

    from llm2emb import __version__

    for x in inputs:
        if not x.is_adapter:
            raise UserError(f"{x.label} is not a LoRA adapter (its llm2emb_config.json has lora_adapter false); "
                            "--adapter-level merges adapters only, drop it to merge full weights.")
    from llm2emb.merge.api import same_model

    for x in inputs[1:]:     # also with --any-base: adapters of different bases cannot share one base
        if not same_model(x.base_model, inputs[0].base_model):
            raise UserError(f"{x.label} is an adapter over {x.base_model!r} but {inputs[0].label} over "
                            f"{inputs[0].base_model!r}; an adapter-level merge needs one base, drop --adapter-level "
                            "to merge the folded full weights.")
    read = [_read_adapter(Path(x.path), x.label) for x in inputs]
    first_pairs = _pairs(read[0][1], inputs[0].label)
    targets0 = sorted(read[0][0].get("target_modules") or [])
    for x, (config, state) in zip(inputs[1:], read[1:]):
        pairs = _pairs(state, x.label)
        if set(pairs) != set(first_pairs):
            odd = sorted(set(pairs) ^ set(first_pairs))[0]
            raise UserError(f"{x.label} and {inputs[0].label} adapt different modules (e.g. {odd!r}); an "
                            "adapter-level merge needs the same modules, drop --adapter-level to merge full weights.")
        if sorted(config.get("target_modules") or []) != targets0:
            raise UserError(f"{x.label} has other target_modules than {inputs[0].label}; drop --adapter-level to "
                            "merge full weights.")
        if config.get("trainable_token_indices") != read[0][0].get("trainable_token_indices") or \
                sorted(k for k in state if TOKEN_ROWS in k) != sorted(k for k in read[0][1] if TOKEN_ROWS in k):
            raise UserError(f"{x.label} trains other token rows (trainable_token_indices "
                            f"{config.get('trainable_token_indices')}) than {inputs[0].label} "
                            f"({read[0][0].get('trainable_token_indices')}); merge cls models with the same summary "
                            "token.")
    merged: dict[str, torch.Tensor] = {}
    dtype = next(iter(read[0][1].values())).dtype
    for prefix, (a_key, b_key) in first_pairs.items():
        a_parts, b_parts = [], []
        for x, (config, state), w in zip(inputs, read, weights):
            a, b = state[a_key].float(), state[b_key].float()
            if a.shape[1] != read[0][1][a_key].shape[1] or b.shape[0] != read[0][1][b_key].shape[0]:
                raise UserError(f"{x.label} has {a_key!r} for a layer of another shape than {inputs[0].label}; "
                                "merge adapters of the same base model.")
            a_parts.append(a * (w * _scaling(config)))
            b_parts.append(b)
        merged[a_key] = torch.cat(a_parts, 0).to(dtype).contiguous()
        merged[b_key] = torch.cat(b_parts, 1).to(dtype).contiguous()
    for key in (k for k in read[0][1] if TOKEN_ROWS in k):   # row values: their weighted average
        merged[key] = sum(state[key].float() * w for (_, state), w in zip(read, weights)).to(dtype).contiguous()
    rank = int(sum(config["r"] for config, _ in read))
    adapter_config = {**read[0][0], "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
                      "alpha_pattern": {}}
    modules = None
    module_files = [Path(x.path) / EMBEDDER_MODULES for x in inputs]
    if any(f.is_file() for f in module_files):
        if not all(f.is_file() for f in module_files):
            which = next(x for x, f in zip(inputs, module_files) if not f.is_file())
            raise UserError(f"{which.label} has no trained pooling / head weights ({EMBEDDER_MODULES}) but "
                            f"{inputs[0].label} has; merge models with the same pooling and head.")
        states = [load_file(str(f)) for f in module_files]
        modules = {}
        for key, tensor in states[0].items():
            for x, state in zip(inputs[1:], states[1:]):
                if key not in state or state[key].shape != tensor.shape:
                    raise UserError(f"{x.label} has no {EMBEDDER_MODULES} tensor {key!r} of shape "
                                    f"{tuple(tensor.shape)}, which {inputs[0].label} has; merge models with the "
                                    "same pooling and head.")
            total = sum(state[key].float() * w for state, w in zip(states, weights))
            modules[key] = total.to(tensor.dtype).contiguous()
    source = Path(inputs[0].path)
    with atomic_dir(output) as tmp:
        for child in source.iterdir():
            if child.name in _SKIP or child.name.startswith("."):
                continue
            (shutil.copytree if child.is_dir() else shutil.copy2)(child, tmp / child.name)
        save_file(merged, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        if modules is not None:
            save_file(modules, str(tmp / EMBEDDER_MODULES))
        import time
        (tmp / "merge_info.json").write_text(json.dumps(
            {**info, "adapter_rank": rank, "llm2emb_version": __version__,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2, default=str) + "\n", encoding="utf-8")
