"""The one tokenisation rule shared by training data preparation, `Embedder.encode` and exports, so a model
sees the same tokens everywhere: the tokenizer's own special tokens, truncation, then the end token last.

The end token (`end_token` setting, resolved by `resolve_end_tokens`):
  * `auto` (default): when the tokenizer's own post-processor appends special tokens (Qwen3-Embedding's
    appends `<|endoftext|>`, whose id differs from its `eos_token_id` `<|im_end|>`), those are the end
    tokens, kept once and kept last under truncation; otherwise EOS is appended. So EOS pooling reads the
    token the model was trained to pool (QwenLM/Qwen3-Embedding issue 122).
  * `eos` / `pad`: that token, appended (replacing whatever the post-processor appends).
  * `none`: nothing appended; the tokenizer's own output, truncated.
  * any other string: that token of the vocabulary (it must be exactly one token).

An input strategy (`llm2emb.model.input_strategies`: echo, PromptEOL) wraps each text in its template here,
ends it with the end token only where the strategy says so, shortens the text inside the template when it
does not fit, and returns as prefix length the tokens before the pooled span (echo: before the second copy).

The summary token of `pooling_mode: cls` (`llm2emb.model.summary_token`) is inserted here too, once per text:
after the post-processor's leading special tokens (`start`) or after the end tokens (`end`, last); truncation
keeps it. A tokenizer whose exported post-processor inserts it already (`mark_summary_token`) has it removed
and put back by this rule, so an exported folder tokenises as the model it came from.

For skip-instruction pooling it also returns, per text, how many leading tokens belong to the instruction
prefix: every token that starts before the prefix's end (`instruction_prefix_end`). The prefix is derived
from the instruction actually prepended, never searched for in the text, so a document that happens to
contain "Query:" embeds exactly as it would without skip-instruction.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

from llm2emb.errors import UserError

END_TOKEN_CHOICES = ("auto", "eos", "pad", "none")
_PROBE = "hello world"
#: tokenizer attribute: ids of summary tokens its post-processor may insert (`mark_summary_token`)
SUMMARY_ATTRIBUTE = "_llm2emb_summary_ids"
_SUFFIX_CACHE: "weakref.WeakKeyDictionary[object, tuple[tuple[int, ...], tuple[int, ...]]]" = weakref.WeakKeyDictionary()


@dataclass
class EncodedTexts:
    input_ids: list[list[int]]
    prefix_lengths: list[int]
    truncated: int = 0  # how many texts were cut to max_length
    truncated_mask: list[bool] = field(default_factory=list)  # per text: was it cut (for data statistics)


def _post_processor_tokens(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) a text that the tokenizer's own post-processing adds (often none)."""
    try:
        return _SUFFIX_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    found: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            found = (tuple(full[:start]), tuple(full[start + len(plain):]))
            break
    try:
        _SUFFIX_CACHE[tokenizer] = found
    except TypeError:  # not weak-referenceable: recompute next time (cheap)
        pass
    return found


def forget_post_processor(tokenizer) -> None:
    """Drop what is known about `tokenizer`'s post-processor (call after changing it)."""
    try:
        _SUFFIX_CACHE.pop(tokenizer, None)
    except TypeError:
        pass


def mark_summary_token(tokenizer, token_id: int) -> None:
    """Remember that `token_id` is this tokenizer's summary token (pooling cls): an exported tokenizer.json's
    post-processor inserts it, and it is then no end token (`post_processor_suffix`) nor BOS-like prefix."""
    setattr(tokenizer, SUMMARY_ATTRIBUTE, frozenset({*getattr(tokenizer, SUMMARY_ATTRIBUTE, ()), int(token_id)}))


def post_processor_suffix(tokenizer) -> tuple[int, ...]:
    """Special token ids the tokenizer's own post-processing appends after a text (often none), less a
    summary token it inserts (see `mark_summary_token`)."""
    marked = getattr(tokenizer, SUMMARY_ATTRIBUTE, ())
    return tuple(t for t in _post_processor_tokens(tokenizer)[1] if t not in marked)


def post_processor_prefix(tokenizer) -> tuple[int, ...]:
    """Special token ids the tokenizer's own post-processing puts before a text (BOS for some; often none),
    less a summary token it inserts."""
    marked = getattr(tokenizer, SUMMARY_ATTRIBUTE, ())
    return tuple(t for t in _post_processor_tokens(tokenizer)[0] if t not in marked)


def summary_token_id(tokenizer, token: str) -> int:
    """The id of summary token `token` (`llm2emb.model.summary_token`), which the tokenizer must already hold."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise UserError(f"summary token {token!r} is not in this tokenizer; load the model through "
                        "Embedder.from_pretrained (or prepare with --summary-token), which adds it.")
    return int(token_id)


def resolve_end_tokens(tokenizer, setting: str = "auto") -> tuple[int, ...]:
    """The token ids that end every text under `setting` (see module docstring); () for `none`."""
    setting = "auto" if setting is None else str(setting)
    suffix = post_processor_suffix(tokenizer)
    if setting == "auto":
        if suffix:
            return suffix
        setting = "eos"
    if setting == "none":
        return suffix
    if setting in ("eos", "pad"):
        token_id = getattr(tokenizer, f"{setting}_token_id", None)
        if token_id is None:
            raise UserError(f"end_token {setting!r}: this tokenizer has no {setting} token; use end_token auto, "
                            "none, or a token string of its vocabulary.")
        return (int(token_id),)
    ids = tokenizer(setting, add_special_tokens=False)["input_ids"]
    token_id = tokenizer.convert_tokens_to_ids(setting)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or token_id is None or (token_id == unk and setting != getattr(tokenizer, "unk_token", None)):
        raise UserError(f"end_token {setting!r} is not a single token of this tokenizer (it encodes to "
                        f"{len(ids)} tokens); use auto, eos, pad, none, or one token such as "
                        f"{getattr(tokenizer, 'eos_token', None)!r}.")
    return (int(token_id),)


def end_token_id(tokenizer, setting: str = "auto") -> int | None:
    """The id EOS pooling reads (the last end token), or None for `none` without a post-processor suffix."""
    tail = resolve_end_tokens(tokenizer, setting)
    return tail[-1] if tail else None


def check_end_token_setting(value: str, source: str) -> None:
    """Reject an empty setting early (a token string is checked against the tokenizer when it is loaded)."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{source}: end_token must be one of {', '.join(END_TOKEN_CHOICES)} or a token string, "
                        f"got {value!r}.")


def instruction_prefix_end(instruction: str | None, separator: str | None) -> int:
    """Characters of `instruction` that skip-instruction pooling excludes: up to and including the first
    `separator` in it, or the whole instruction when it has no separator (0 without an instruction)."""
    if not instruction:
        return 0
    cut = instruction.find(separator) if separator else -1
    return cut + len(separator) if cut >= 0 else len(instruction)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, prefix_end: int | Sequence[int] = 0,
                 end_token: str = "auto", input_strategy: str = "plain",
                 instruction_length: int | Sequence[int] = 0, summary_token: str | None = None,
                 summary_position: str = "end") -> EncodedTexts:
    """Tokenise `texts` (already carrying any instruction) and end each with the end tokens; see module doc.

    `prefix_end`: per text (or one for all) the character where its instruction prefix ends, 0 for none.
    `summary_token` (pooling cls, `llm2emb.model.summary_token`): that token of the tokenizer is inserted
    once into every text, at `summary_position` `start` (after the post-processor's leading special tokens)
    or `end` (after the end tokens, last); truncation never cuts it.
    `input_strategy` (not plain): `instruction_length` (per text or one for all) is the length of the
    instruction at the start of each text, which goes before the strategy's template."""
    from llm2emb.model.input_strategies import get_input_strategy

    strategy = get_input_strategy(input_strategy)
    if summary_token is not None and not strategy.is_plain:
        raise UserError(f"pooling cls inserts its summary token into the plain text; input_strategy "
                        f"{strategy.name} cannot carry it.")
    if not strategy.is_plain:
        return _encode_with_strategy(tokenizer, list(texts), max_length, strategy, instruction_length, end_token)
    end_tokens = list(resolve_end_tokens(tokenizer, end_token))
    # what the post-processor adds, summary token included (an exported tokenizer.json inserts it): removed
    # here, and the rule below puts back prefix, summary token and tail
    raw_prefix, suffix = (list(part) for part in _post_processor_tokens(tokenizer))
    marked = getattr(tokenizer, SUMMARY_ATTRIBUTE, ())
    inserted = [k for k, t in enumerate(raw_prefix) if t in marked]  # a summary token the prefix holds
    summary = [summary_token_id(tokenizer, summary_token)] if summary_token is not None else []
    if summary and summary_position not in ("start", "end"):
        raise ValueError(f"summary_position must be start or end, got {summary_position!r}")
    at_start = summary if summary_position == "start" else []
    tail = end_tokens + (summary if summary_position == "end" else [])  # what every text ends with
    lead = len(post_processor_prefix(tokenizer))  # where a start summary token goes
    reserved = len(tail) + len(at_start)
    if max_length < reserved + 1 and summary:
        raise UserError(f"max_length {max_length} is too short for pooling cls: a text needs at least "
                        f"{reserved + 1} tokens (one token of text, the end token and the summary token); raise "
                        "max_length / max_seq_length.")
    if max_length < reserved + 1:
        raise ValueError(f"max_length must be at least {reserved + 1} (one token plus the end token)")
    texts = list(texts)
    if not texts:
        return EncodedTexts([], [], 0, [])
    ends = [int(prefix_end)] * len(texts) if isinstance(prefix_end, int) else [int(e) for e in prefix_end]
    if len(ends) != len(texts):
        raise ValueError(f"prefix_end has {len(ends)} entries for {len(texts)} texts")
    want_offsets = any(ends)
    # texts are cut below, after tokenising in full: transformers' "longer than model_max_length ... indexing
    # errors" warning (exported tokenizers carry model_max_length = max_length) does not apply here
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    enc = tokenizer(texts, add_special_tokens=True, truncation=False,
                    return_offsets_mapping=want_offsets, return_attention_mask=False)
    body_max = max_length - reserved
    input_ids: list[list[int]] = []
    prefix_lengths: list[int] = []
    truncated_mask: list[bool] = []
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        offsets = list(enc["offset_mapping"][i]) if want_offsets else []
        if suffix and ids[-len(suffix):] == suffix:  # the post-processor's tokens: re-added as the tail
            ids = ids[:-len(suffix)]
        if inserted and all(k < len(ids) and ids[k] == raw_prefix[k] for k in inserted):
            ids = [t for k, t in enumerate(ids) if k not in inserted]
            offsets = [o for k, o in enumerate(offsets) if k not in inserted]
        if end_tokens and ids and ids[-1] == end_tokens[-1]:  # a text already ending with the end token keeps one
            ids = ids[:-1]
        cut_here = len(ids) > body_max
        truncated_mask.append(cut_here)
        if cut_here:
            ids = ids[:body_max]
        prefix = 0
        if ends[i] > 0:
            prefix = min(sum(1 for start, _ in offsets[: len(ids)] if start < ends[i]), len(ids))
        if at_start:
            ids = ids[:lead] + at_start + ids[lead:]
            prefix += 1 if prefix else 0  # the summary token sits inside the instruction prefix
        input_ids.append(ids + tail)
        prefix_lengths.append(prefix)
    return EncodedTexts(input_ids, prefix_lengths, sum(truncated_mask), truncated_mask)


def _per_text(value: int | Sequence[int], n: int, what: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} texts")
    return values


def _strategy_ids(tokenizer, strategy, instruction: str, text: str, suffix: list[int],
                  tail: list[int]) -> tuple[list[int], int]:
    """(token ids of the rendered text with `tail`, tokens before the pooled span)."""
    rendered, pool_char = strategy.render(instruction, text)
    enc = tokenizer(rendered, add_special_tokens=True, truncation=False, return_attention_mask=False,
                    return_offsets_mapping=strategy.pool_last_copy)
    ids = list(enc["input_ids"])
    if suffix and ids[-len(suffix):] == suffix:  # the post-processor's tokens: only `tail` ends the text
        ids = ids[:-len(suffix)]
    prefix = 0
    if strategy.pool_last_copy:
        # every token that ends before the last copy starts (a token carrying the space before the copy is the
        # copy's first word, so it is pooled)
        prefix = sum(1 for _, end in enc["offset_mapping"][:len(ids)] if end <= pool_char)
    return ids + tail, prefix


def _encode_with_strategy(tokenizer, texts: list[str], max_length: int, strategy,
                          instruction_length: int | Sequence[int], end_token: str) -> EncodedTexts:
    tail = list(resolve_end_tokens(tokenizer, end_token)) if strategy.append_end else []
    suffix = list(post_processor_suffix(tokenizer))
    lengths = _per_text(instruction_length, len(texts), "instruction_length")
    input_ids: list[list[int]] = []
    prefix_lengths: list[int] = []
    truncated_mask: list[bool] = []
    for text, cut_at in zip(texts, lengths):
        instruction, body = text[:cut_at], text[cut_at:]
        ids, prefix = _strategy_ids(tokenizer, strategy, instruction, body, suffix, tail)
        shortened = len(ids) > max_length
        if shortened:
            # shorten the text inside the template (every copy alike): the template's end is what is pooled
            body_ids = list(tokenizer(body, add_special_tokens=False)["input_ids"])
            keep = len(body_ids)
            while len(ids) > max_length:
                if keep == 0:
                    raise UserError(f"max_length {max_length} is too short for input_strategy {strategy.name}: its "
                                    f"template (with the instruction) alone takes {len(ids)} tokens; raise max_length.")
                keep = max(0, keep - max(1, -(-(len(ids) - max_length) // max(strategy.copies, 1))))
                body = tokenizer.decode(body_ids[:keep], skip_special_tokens=True) if keep else ""
                ids, prefix = _strategy_ids(tokenizer, strategy, instruction, body, suffix, tail)
        input_ids.append(ids)
        prefix_lengths.append(min(prefix, max(len(ids) - 1, 0)))
        truncated_mask.append(shortened)
    return EncodedTexts(input_ids, prefix_lengths, sum(truncated_mask), truncated_mask)
