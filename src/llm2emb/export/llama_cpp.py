"""The folder llama.cpp's converter (`convert_hf_to_gguf.py`) turns into a GGUF, written next to an export
(`llm2emb export --llama-cpp DIR`).

Why a second folder: the converter identifies a BPE tokenizer by hashing the ids its tokenizer gives for a
fixed text, special tokens included (`get_vocab_base_pre`), and stops on a hash it does not know ("BPE
pre-tokenizer was not recognized"). An export's tokenizer.json appends the end token (its post-processor;
fastembed and plain ONNX Runtime users need that), which changes the hash, so the converter refuses the
export itself. This folder holds the export's config, weights and sentence-transformers pooling files with
the tokenizer's own post-processor back in tokenizer.json; tokenizer_config.json keeps `add_eos_token: true`,
which the converter writes into the GGUF as `tokenizer.ggml.add_eos_token`, so llama.cpp appends the end
token itself. llama.cpp can append only its EOS token, so the end token must be the tokenizer's EOS.

Only plain recipes: eos (llama.cpp `--pooling last`) or mean pooling over the backbone, causal or
bidirectional (the converter writes `causal_attention = false` from `is_causal: false`), no template around the
text, no summary token, merged weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llm2emb.atomic import atomic_dir
from llm2emb.model.input_strategies import get_input_strategy

#: our pooling -> llama.cpp's `--pooling`
LLAMA_CPP_POOLING = {"eos": "last", "mean": "mean"}
#: export files the converter does not read (the model card, the ONNX graphs) or must not see (tokenizer.json
#: with the end-token template, rewritten)
SKIPPED = ("README.md", "onnx", "tokenizer.json")


def llama_cpp_blockers(config, lora_adapter: bool) -> list[str]:
    """Why llama.cpp cannot reproduce this model (empty: it can); known before loading the weights."""
    reasons = []
    if config.representation != "dense":
        reasons.append(f"a {config.representation} representation")
    if config.pooling == "cls":
        reasons.append("a summary token (pooling cls: a GGUF carries no tokenizer post-processor to insert it)")
    elif config.pooling not in LLAMA_CPP_POOLING:
        reasons.append(f"{config.pooling} pooling (llama.cpp pools by last token or mean only)")
    if config.head not in (None, "", "none"):
        reasons.append(f"a {config.head} head")
    if config.skip_instruction and config.pooling == "mean":
        reasons.append("skip-instruction pooling")
    if not get_input_strategy(getattr(config, "input_strategy", None)).is_plain:
        reasons.append(f"input_strategy {config.input_strategy} (a template around every text)")
    if lora_adapter:
        reasons.append("a LoRA adapter (add --merge-lora: a GGUF holds merged weights)")
    return reasons


def end_token_blocker(tokenizer, end_tokens: list[int]) -> str | None:
    """llama.cpp appends only the tokenizer's EOS token (`tokenizer.ggml.add_eos_token`)."""
    if tokenizer.eos_token_id is None or end_tokens != [tokenizer.eos_token_id]:
        names = tokenizer.convert_ids_to_tokens(end_tokens)
        return (f"an end token {names} other than the tokenizer's EOS token {tokenizer.eos_token!r} (llama.cpp can "
                "append only its EOS token)")
    return None


def original_post_processor(tokenizer) -> dict | None:
    """The fast tokenizer's post-processor as saved in tokenizer.json (read before the export changes it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str()).get("post_processor")


def _link_or_copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
        return
    try:
        os.link(source, target)   # weights: no second copy on disk where the filesystem allows
    except OSError:
        shutil.copy2(source, target)


def write_llama_cpp_source(export: Path, target: Path, post_processor: dict | None) -> None:
    """Write `target` from the finished export folder `export`: every file the converter reads, tokenizer.json
    with `post_processor` (the tokenizer's own) instead of the end-token template."""
    tokenizer = json.loads((export / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = post_processor
    config = json.loads((export / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("add_eos_token") is not True:   # export_model checks this first; kept as a guard
        raise RuntimeError("the export's tokenizer_config.json does not say add_eos_token: true")
    with atomic_dir(target) as staging:
        for path in export.iterdir():
            if path.name not in SKIPPED:
                _link_or_copy(path, staging / path.name)
        (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        (staging / "README.md").write_text(
            f"# For llama.cpp's converter\n\nWritten by `llm2emb export --llama-cpp` from `{export}`; convert it with "
            f"`python convert_hf_to_gguf.py {target.name} --outfile model.gguf --outtype f16` (llama.cpp "
            "repository). Its tokenizer.json does not append the end token (the converter would not recognise "
            "the tokenizer); tokenizer_config.json's add_eos_token tells llama.cpp to append it. Load everything "
            f"else from `{export}`.\n", encoding="utf-8")
