"""Write the sentence-transformers side of an export into an Embedder folder.

Two layouts, chosen per model:

* **native**: `Transformer -> Pooling -> Normalize`, plain sentence-transformers modules, loads with
  `SentenceTransformer(dir)` and no llm2emb installed. Used when the recipe is expressible: pooling eos
  (ST "lasttoken"), mean or weighted_mean (ST "weightedmean": weight i+1 for the i-th real token, the same
  SGPT weighting as ours), causal or bidirectional attention (the saved config.json carries
  `is_causal: false`, which transformers >= 5.2 honours), no head, no skip-instruction, weights merged.
* **module**: `LLM2EmbModule -> Normalize`, where `LLM2EmbModule` (llm2emb.export.st_module) runs the
  Embedder itself; needs llm2emb installed and `trust_remote_code=True`.

Two sentence-transformers behaviours must be switched off or matched for identical tokens (docs/contracts.md):
it wraps plain texts in the tokenizer's chat template when the tokenizer has one (the Transformer
module's `modality_config` lists only "text", which disables that), and it never appends EOS itself
(the exported tokenizer is told to append EOS via its post-processor, `add_eos_token`; truncation then
keeps EOS last, as `llm2emb.model.tokenization.encode_texts` does).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Sequence

from llm2emb.model.tokenization import encode_texts, resolve_end_tokens
from llm2emb.model.embedder import EmbedderConfig

logger = logging.getLogger(__name__)

NATIVE, MODULE = "native", "module"
#: our pooling name -> sentence-transformers Pooling mode (same formula, see module docstring)
ST_POOLING_MODES: dict[str, str] = {"eos": "lasttoken", "mean": "mean", "weighted_mean": "weightedmean"}
TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
MODULE_TYPE = "llm2emb.export.st_module.LLM2EmbModule"
NORMALIZE_CONFIG = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}
ST_CONFIG_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")

#: texts whose token ids must come out identical from both tokenisation paths
TOKEN_PROBES = ("Hello world.", "", "  leading spaces and a trailing newline\n", "向量检索：把文本变成向量。",
                "Instruct: Given a query, retrieve passages.\nQuery: what is an embedding?")


def _json_dump(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def st_route_blockers(config: EmbedderConfig, is_lora_adapter: bool) -> list[str]:
    """Reasons this model cannot use the native layout (empty: it can)."""
    reasons = []
    if config.pooling not in ST_POOLING_MODES:
        reasons.append(f"pooling {config.pooling!r}")
    if config.skip_instruction:
        reasons.append("skip-instruction pooling")
    if config.head not in (None, "", "none"):
        reasons.append(f"a {config.head} head")
    if is_lora_adapter:
        reasons.append("an unmerged LoRA adapter")
    return reasons


def tokenizer_appends_eos(tokenizer, max_length: int, texts: Sequence[str] = TOKEN_PROBES,
                          end_token: str = "auto") -> bool:
    """True when `tokenizer(texts, truncation=True, max_length=...)` (what sentence-transformers calls) gives
    exactly the ids of `encode_texts` (with the model's end token), also for a text cut by truncation."""
    long_text = " ".join(["token"] * (max_length + 8))
    cases = list(texts) + [long_text]
    want = encode_texts(tokenizer, cases, max_length, end_token=end_token).input_ids
    got = tokenizer(cases, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return [list(ids) for ids in got] == want


def make_tokenizer_append_eos(tokenizer, max_length: int, end_token: str = "auto") -> bool:
    """Make a (fast) tokenizer append EOS after its own special tokens; True on success (checked).

    Uses transformers' own `add_bos_token` / `add_eos_token` switches (they rebuild the post-processor).
    BOS is kept exactly when the tokenizer already adds it. Returns False, leaving the tokenizer unchanged,
    for tokenizers whose special-token pattern is something else."""
    if tokenizer_appends_eos(tokenizer, max_length, end_token=end_token):
        return True
    if list(resolve_end_tokens(tokenizer, end_token)) != [tokenizer.eos_token_id]:
        return False  # only "append EOS" can be switched on through transformers' own flags
    if not hasattr(type(tokenizer), "add_eos_token") or tokenizer.eos_token_id is None:
        return False
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    if full == plain:
        add_bos = False
    elif tokenizer.bos_token_id is not None and full == [tokenizer.bos_token_id] + plain:
        add_bos = True
    else:
        return False
    trial = copy.deepcopy(tokenizer)
    try:
        trial.add_bos_token = add_bos
        trial.add_eos_token = True
    except (AttributeError, TypeError, ValueError) as exc:
        logger.info("tokenizer cannot be told to append EOS (%s)", exc)
        return False
    if not tokenizer_appends_eos(trial, max_length, end_token=end_token):
        return False
    tokenizer.add_bos_token = add_bos
    tokenizer.add_eos_token = True
    return True


def record_tokenizer_settings(folder: Path, tokenizer, appends_eos: bool, padding_side: str) -> None:
    """Write into tokenizer_config.json what `save_pretrained` leaves out: the padding side, and
    add_bos_token/add_eos_token so tokenizer classes that rebuild their post-processor on load keep
    appending EOS."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data["padding_side"] = padding_side
    if appends_eos:
        data["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
        data["add_eos_token"] = True
    _json_dump(path, data)


def saved_tokenizer_appends_eos(folder: Path, max_length: int, end_token: str = "auto") -> bool:
    """Reload the tokenizer the way sentence-transformers will and check it appends EOS like llm2emb."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:  # pragma: no cover - the folder was just written by us
        logger.warning("could not reload the exported tokenizer: %s", exc)
        return False
    return tokenizer_appends_eos(tokenizer, max_length, end_token=end_token)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("sentence_transformers", "transformers", "torch", "llm2emb"):
        try:
            out[name if name != "torch" else "pytorch"] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


def write_st_files(folder: Path, route: str, config: EmbedderConfig, embedding_dim: int,
                   hidden_size: int) -> None:
    """Write modules.json and the module configs for `route` into an Embedder folder."""
    prompts = {"query": config.query_instruction or "", "document": ""}
    _json_dump(folder / "config_sentence_transformers.json", {
        "__version__": _versions(),
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    if route == NATIVE:
        _json_dump(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_TYPE},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_TYPE},
        ])
        _json_dump(folder / "sentence_bert_config.json", {
            "transformer_task": "feature-extraction",
            # "text" only: no "message" entry, so plain texts are never wrapped in the chat template.
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings",
            "max_seq_length": config.max_length,
            # attention kernel left to transformers' default (sdpa): portable, same vectors up to rounding
            "model_kwargs": {"dtype": config.dtype},
        })
        _json_dump(folder / "1_Pooling" / "config.json", {
            "embedding_dimension": hidden_size,
            "pooling_mode": ST_POOLING_MODES[config.pooling],
            "include_prompt": True,
        })
        _json_dump(folder / "2_Normalize" / "config.json", NORMALIZE_CONFIG)
        if config.bidirectional:
            _ensure_non_causal_config(folder)
    else:
        _json_dump(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE},
            {"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE_TYPE},
        ])
        _json_dump(folder / "1_Normalize" / "config.json", NORMALIZE_CONFIG)
    logger.debug("wrote %s sentence-transformers layout (dim %d) to %s", route, embedding_dim, folder)


def _ensure_non_causal_config(folder: Path) -> None:
    """A bidirectional backbone's config.json must say so for a plain transformers load."""
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("is_causal") is not False:
        data["is_causal"] = False
        _json_dump(path, data)
