"""Write the sentence-transformers side of an export into an Embedder folder.

Two routes, chosen per export (`native_route_blockers`):

* **native**: `Transformer -> Pooling -> Normalize`, plain sentence-transformers modules; loads with
  `SentenceTransformer(dir)`, no llm2emb and no remote code. Every recipe plain modules can express:
  pooling eos (ST "lasttoken"), mean or weighted_mean (ST "weightedmean": weight i+1 for the i-th real token,
  the same SGPT weighting as ours, kept when the prompt is excluded), causal or bidirectional attention (the
  saved config.json carries `is_causal: false`, which transformers >= 5.2 honours), full weights or a causal
  LoRA adapter (sentence-transformers loads the base model named in adapter_config.json through peft).
  Skip-instruction mean / weighted_mean pooling is `Pooling(include_prompt=False)` with the query instruction
  as the "query" prompt: sentence-transformers then excludes the prompt's tokens from pooling. It counts them
  by tokenising the prompt alone and not counting a trailing special token (ST >= 6
  `Transformer._get_prompt_length`; ST 5 always drops one token, the same count here since the exported
  tokenizer appends EOS); BOS, when the tokenizer adds one, counts in both libraries. llm2emb's prefix ends at
  the `instruction_separator` inside the instruction (`instruction_prefix_end`), so the counts agree when the
  instruction ends at its separator (or has none) and differ when something follows it: "...\nQuery: "
  alone ends in a lone-space token that, before a query, merges into the query's first word. The export
  checks the counts on probe queries (`prompt_length_mismatch`) and takes the module route when they differ.
  EOS pooling reads the last token whatever the prefix, so it is native with any instruction.
* **module**: `LLM2EmbModule -> Normalize`, where `LLM2EmbModule` (llm2emb.export.st_module) runs the
  Embedder itself; needs llm2emb installed and `trust_remote_code=True`. Left for what plain modules cannot
  hold: trainable pooling (attention, latent_attention), heads, a LoRA adapter over a bidirectional model
  (sentence-transformers builds the base model's config itself and transformers ignores an `is_causal`
  argument, so only a merged folder can say it is bidirectional), and instructions whose prompt length
  disagrees as above.

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
import re
from pathlib import Path
from typing import Sequence

from llm2emb.model.tokenization import (encode_texts, forget_post_processor, instruction_prefix_end,
                                        mark_summary_token, post_processor_prefix, resolve_end_tokens,
                                        summary_token_id)
from llm2emb.model.embedder import EmbedderConfig
from llm2emb.model.summary_token import saved_setting, uses_summary_token

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


#: query texts on which the prompt length of sentence-transformers must equal llm2emb's instruction prefix
#: (starts that could merge with the instruction's last token: spaces, punctuation, digits, CJK, newlines)
PROMPT_PROBES = ("what is a text embedding?", "如何把文本变成向量？", " leading space", "(parenthesised) start",
                 "123 numbers", "\nnew line", "'quoted'", "-dash", "Query: again", "ing", "。句号", "a")
#: poolings whose vector changes when the instruction prefix is excluded (eos reads the last token only)
PREFIX_POOLINGS = ("mean", "weighted_mean")


def st_prompt_length(tokenizer, prompt: str, max_length: int) -> int:
    """Prompt tokens sentence-transformers excludes with `include_prompt=False`: the prompt tokenised alone
    (special tokens and truncation as for any text), less a trailing special token."""
    ids = list(tokenizer(prompt, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)


def prompt_length_mismatch(tokenizer, instruction: str | None, separator: str | None, max_length: int,
                           end_token: str = "auto", probes: Sequence[str] = PROMPT_PROBES) -> str | None:
    """None when sentence-transformers' prompt length equals llm2emb's instruction prefix on every probe
    query; otherwise why not (one clause, for the route message)."""
    if not instruction:
        return None
    texts = [instruction + p for p in probes] + [instruction + " ".join(["token"] * (max_length + 8))]
    ours = encode_texts(tokenizer, texts, max_length, instruction_prefix_end(instruction, separator),
                        end_token=end_token).prefix_lengths
    theirs = st_prompt_length(tokenizer, instruction, max_length)
    differing = sorted({n for n in ours if n != theirs})
    if not differing:
        return None
    cut = instruction_prefix_end(instruction, separator)
    tail = f" (the instruction goes on after its separator {separator!r} with {instruction[cut:]!r})" \
        if cut < len(instruction) else ""
    return (f"skip-instruction pooling with query instruction {instruction!r}: sentence-transformers would exclude "
            f"{theirs} prompt tokens where llm2emb excludes {'/'.join(map(str, differing))}{tail}")


def _adapter_base(folder: Path) -> str | None:
    try:
        data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = data.get("base_model_name_or_path")
    return str(base) if base else None


def _loadable_base(base: str | None) -> bool:
    """A local transformers folder, or something shaped like a hub id (not checked offline)."""
    if not base:
        return False
    path = Path(base).expanduser()
    if path.exists():
        return (path / "config.json").is_file()
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", base))


def native_route_blockers(config: EmbedderConfig, is_lora_adapter: bool, tokenizer=None,
                          folder: Path | None = None) -> list[str]:
    """Reasons this export cannot use plain sentence-transformers modules (empty: it can).

    `tokenizer` (as saved, appending EOS) is needed for the skip-instruction check, `folder` (the saved
    Embedder folder) for an adapter's base model."""
    reasons = []
    if config.representation != "dense":
        reasons.append(f"a {config.representation} representation (LM-head SPLADE weights / llm2emb's token sets "
                       "over a decoder: no plain sentence-transformers module computes them)")
        return reasons
    if getattr(config, "input_strategy", "plain") != "plain":
        reasons.append(f"input_strategy {config.input_strategy} (a template around every text, with its own "
                       "pooled positions, that sentence-transformers' tokenizer and Pooling do not apply)")
    if uses_summary_token(config.pooling):
        if st_pooling_mode(config, tokenizer) is None:
            reasons.append("cls pooling with the summary token at the start after a BOS token or with left "
                           "padding (sentence-transformers' cls mode reads the first position of every row)")
    elif config.pooling not in ST_POOLING_MODES:
        reasons.append(f"{config.pooling} pooling (trainable weights that sentence-transformers' Pooling cannot "
                       "hold)")
    if config.head not in (None, "", "none"):
        reasons.append(f"a {config.head} head")
    if is_lora_adapter:
        if config.bidirectional:
            reasons.append("an unmerged LoRA adapter over a bidirectional model (sentence-transformers builds the "
                           "base model's causal config itself; export with --merge-lora for a plain folder)")
        elif folder is not None and not _loadable_base(_adapter_base(folder)):
            reasons.append(f"an unmerged LoRA adapter whose base model {_adapter_base(folder)!r} is not a "
                           "transformers folder or hub id (export with --merge-lora for a plain folder)")
    if config.skip_instruction and config.pooling in PREFIX_POOLINGS and tokenizer is not None:
        mismatch = prompt_length_mismatch(tokenizer, config.query_instruction, config.instruction_separator,
                                          config.max_length, config.end_token)
        if mismatch:
            reasons.append(mismatch)
    return reasons


def st_pooling_mode(config: EmbedderConfig, tokenizer=None) -> str | None:
    """The sentence-transformers Pooling mode that computes `config`'s pooling (None: none does).

    Summary-token pooling (cls): the token at the end is the last token (ST "lasttoken", which finds it for
    either padding side); at the start it is ST "cls" (the first position) only when nothing comes before it
    (no BOS, `tokenizer` as saved) and rows are right-padded."""
    if not uses_summary_token(config.pooling):
        return ST_POOLING_MODES.get(config.pooling)
    if config.summary_token_position == "end":
        return "lasttoken"
    if config.padding_side != "right":
        return None
    if tokenizer is not None:
        saved_setting(config, tokenizer)  # marks the token, so an inserting post-processor is seen as such
        if post_processor_prefix(tokenizer):
            return None
    return "cls"


def include_prompt(config: EmbedderConfig) -> bool:
    """The ST Pooling's include_prompt: False exactly when llm2emb excludes the instruction from pooling."""
    return not (config.skip_instruction and config.pooling in PREFIX_POOLINGS)


def tokenizer_appends_eos(tokenizer, max_length: int, texts: Sequence[str] = TOKEN_PROBES,
                          end_token: str = "auto", summary: tuple[str, str] | None = None) -> bool:
    """True when `tokenizer(texts, truncation=True, max_length=...)` (what sentence-transformers calls) gives
    exactly the ids of `encode_texts` (with the model's end token, and `summary` = (summary token, start |
    end) for pooling cls), also for a text cut by truncation."""
    long_text = " ".join(["token"] * (max_length + 8))
    cases = list(texts) + [long_text]
    kwargs = {}
    if summary is not None:
        mark_summary_token(tokenizer, summary_token_id(tokenizer, summary[0]))
        kwargs = {"summary_token": summary[0], "summary_position": summary[1]}
    want = encode_texts(tokenizer, cases, max_length, end_token=end_token, **kwargs).input_ids
    got = tokenizer(cases, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return [list(ids) for ids in got] == want


def make_tokenizer_append_eos(tokenizer, max_length: int, end_token: str = "auto",
                              summary: tuple[str, str] | None = None) -> bool:
    """Make a (fast) tokenizer append EOS after its own special tokens; True on success (checked).

    Uses transformers' own `add_bos_token` / `add_eos_token` switches (they rebuild the post-processor).
    BOS is kept exactly when the tokenizer already adds it. Returns False, leaving the tokenizer unchanged,
    for tokenizers whose special-token pattern is something else. With a summary token (`summary`, pooling
    cls) the post-processor is a template that also inserts it (`insert_summary_token`)."""
    if summary is not None:
        return insert_summary_token(tokenizer, max_length, end_token, summary)
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


def insert_summary_token(tokenizer, max_length: int, end_token: str, summary: tuple[str, str]) -> bool:
    """Give a fast tokenizer a post-processor (tokenizers' `TemplateProcessing`, saved in tokenizer.json) that
    adds what `encode_texts` adds: its own leading special tokens, the summary token at the start or the end,
    and the end tokens; True when checked equal (truncation included), else False and the tokenizer is left
    as it was."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers.processors import TemplateProcessing

    token, position = summary
    token_id = summary_token_id(tokenizer, token)
    mark_summary_token(tokenizer, token_id)
    lead = list(post_processor_prefix(tokenizer))
    tail = list(resolve_end_tokens(tokenizer, end_token))
    ids = [*lead, *([token_id] if position == "start" else []), None, *tail,
           *([token_id] if position == "end" else [])]
    names = {i: tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None}
    template = TemplateProcessing(single=[names[i] if i is not None else "$A" for i in ids],
                                  special_tokens=[(name, i) for i, name in names.items()])
    trial = copy.deepcopy(tokenizer)
    trial.backend_tokenizer.post_processor = template
    forget_post_processor(trial)
    if not tokenizer_appends_eos(trial, max_length, end_token=end_token, summary=summary):
        return False
    tokenizer.backend_tokenizer.post_processor = template
    forget_post_processor(tokenizer)
    return True


def record_tokenizer_settings(folder: Path, tokenizer, appends_eos: bool, padding_side: str,
                              max_length: int | None = None) -> None:
    """Write into tokenizer_config.json what `save_pretrained` leaves out: the padding side,
    add_bos_token/add_eos_token so tokenizer classes that rebuild their post-processor on load keep
    appending EOS, and `model_max_length` = the model's max length (EOS included), the truncation length
    that readers of tokenizer_config.json alone use (fastembed, TEI, plain tokenizers users)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data["padding_side"] = padding_side
    if max_length is not None:
        data["model_max_length"] = int(max_length)
    if appends_eos:
        data["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
        data["add_eos_token"] = True
    _json_dump(path, data)


def load_saved_tokenizer(folder: Path):
    """The exported tokenizer, reloaded the way sentence-transformers will load it (None if it cannot be)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:  # pragma: no cover - the folder was just written by us
        logger.warning("could not reload the exported tokenizer: %s", exc)
        return None


def saved_tokenizer_appends_eos(folder: Path, max_length: int, end_token: str = "auto") -> bool:
    """Reload the tokenizer the way sentence-transformers will and check it appends EOS like llm2emb."""
    tokenizer = load_saved_tokenizer(folder)
    return tokenizer is not None and tokenizer_appends_eos(tokenizer, max_length, end_token=end_token)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("sentence_transformers", "transformers", "torch", "llm2emb"):
        try:
            out[name if name != "torch" else "pytorch"] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


#: representation -> (the sentence-transformers class that loads it, its similarity function)
ST_CLASSES = {"dense": ("SentenceTransformer", "cosine"), "sparse": ("SparseEncoder", "dot"),
              "multi_vector": ("MultiVectorEncoder", "maxsim")}


#: sentence-transformers < 6's boolean pooling keys (still read by text-embeddings-inference, older vLLM)
LEGACY_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                       "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                       "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def pooling_config(config: EmbedderConfig, hidden_size: int) -> dict:
    """1_Pooling/config.json: sentence-transformers 6's keys, plus the older boolean keys for engines that
    parse only those (text-embeddings-inference refuses a folder without them unless given --pooling).
    sentence-transformers 6 drops the old keys silently when `pooling_mode` is present
    (`Pooling.load_config`), so both readers agree (tests/test_onnx_export.py checks it). The old
    `word_embedding_dimension` is left out: sentence-transformers 6 warns about it on every load."""
    mode = st_pooling_mode(config)
    legacy = {key: name == mode for name, key in LEGACY_POOLING_KEYS.items()}
    return {"embedding_dimension": hidden_size, "pooling_mode": mode, "include_prompt": include_prompt(config),
            **legacy}


def write_st_files(folder: Path, route: str, config: EmbedderConfig, embedding_dim: int,
                   hidden_size: int) -> None:
    """Write modules.json and the module configs for `route` into an Embedder folder."""
    prompts = {"query": config.query_instruction or "", "document": ""}
    model_type, similarity = ST_CLASSES[config.representation]
    _json_dump(folder / "config_sentence_transformers.json", {
        "__version__": _versions(),
        "model_type": model_type,
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": similarity,
    })
    if config.representation != "dense":  # the module's outputs are final: sparse weights, unit token vectors
        _json_dump(folder / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}])
    elif route == NATIVE:
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
        _json_dump(folder / "1_Pooling" / "config.json", pooling_config(config, hidden_size))
        _json_dump(folder / "2_Normalize" / "config.json", NORMALIZE_CONFIG)
        if config.bidirectional and (folder / "config.json").is_file():
            _ensure_non_causal_config(folder)
    else:
        _json_dump(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE},
            {"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE_TYPE},
        ])
        _json_dump(folder / "1_Normalize" / "config.json", NORMALIZE_CONFIG)
    logger.debug("wrote %s sentence-transformers layout (dim %d) to %s", route, embedding_dim, folder)


def _ensure_non_causal_config(folder: Path) -> None:
    """A bidirectional backbone's config.json must say so for every reader: `is_causal: false` (transformers
    >= 5.2, vLLM's Qwen2/Qwen3 layers, llama.cpp's convert_hf_to_gguf.py) and `use_bidirectional_attention:
    true` (what text-embeddings-inference reads for Qwen3, Llama, Mistral and Gemma 3; Gemma 3's own switch)."""
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("is_causal") is not False or data.get("use_bidirectional_attention") is not True:
        data["is_causal"] = False
        data["use_bidirectional_attention"] = True
        _json_dump(path, data)
