"""The summary token of `pooling_mode: cls`: a dedicated, new token whose final hidden state is the embedding.

The seed's `[CLS]` row: a token added to the tokenizer (`summary_token`, default `<|embed|>`, a special token
so that no text can spell it and decoding drops it), given a NEW row of the input embedding matrix, and
inserted into every text by the one tokenisation rule (`llm2emb.model.tokenization.encode_texts`):

* `summary_token_position: start`: right after what the tokenizer's post-processor puts first (BOS, when it
  adds one), as BERT's `[CLS]`. Only a bidirectional model (`bi_attn_enabled`) can use it: under causal
  attention the first token sees nothing of the text, so that is refused.
* `summary_token_position: end`: last, after the end token(s): under causal attention it sees the whole text.
* `auto` (default): start with bidirectional attention, end without.

Its row is initialised by `summary_token_init`: `mean` (default: the mean of the input embedding rows of the
tokenizer's tokens, a neutral start that is no particular word) or a token string of the vocabulary (a copy
of that token's row, e.g. `<|endoftext|>`). The row trains with the model: under full fine-tuning with the
whole embedding matrix; under LoRA as peft's trainable token rows (`LoraConfig(trainable_token_indices=...)`,
saved in the adapter, folded in by merge-LoRA).

An Embedder folder records the token string, its id and its resolved position in `llm2emb_config.json`;
loading adds the token to the tokenizer again where it lacks it (a LoRA folder's base model), checks that it
gets the recorded id, and initialises the row by the same rule, so the adapter's trained row lands on it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from llm2emb.errors import UserError

DEFAULT_SUMMARY_TOKEN = "<|embed|>"
SUMMARY_POSITIONS = ("auto", "start", "end")
DEFAULT_INIT = "mean"


def uses_summary_token(pooling: str) -> bool:
    """True for poolings that read the summary token (`cls`)."""
    from llm2emb.model.pooling import POOLING_REGISTRY

    return bool(getattr(POOLING_REGISTRY.get(pooling), "uses_summary_token", False))


def resolve_position(position: str | None, bidirectional: bool, source: str) -> str:
    """`start` or `end` for the setting `position` (auto: start when bidirectional, else end)."""
    position = position or "auto"
    if position not in SUMMARY_POSITIONS:
        raise UserError(f"{source}: summary_token_position must be one of {', '.join(SUMMARY_POSITIONS)}, got "
                        f"{position!r}.")
    if position == "auto":
        return "start" if bidirectional else "end"
    if position == "start" and not bidirectional:
        raise UserError(f"{source}: pooling cls with summary_token_position start needs bi_attn_enabled: under "
                        "causal attention the first token sees none of the text after it; turn bi_attn_enabled "
                        "on or use summary_token_position end (or auto).")
    return position


def check_settings(*, pooling: str, bidirectional: bool, representation: str, input_strategy: str,
                   token: str, position: str | None, init: str, source: str) -> str | None:
    """One sentence for a summary-token setting that cannot work; returns the resolved position (None when the
    pooling reads no summary token)."""
    if not uses_summary_token(pooling):
        return None
    if representation != "dense":
        raise UserError(f"{source}: pooling cls reads one summary token per text, but representation "
                        f"{representation} scores the text's token states; use representation dense or another "
                        "pooling.")
    if (input_strategy or "plain") != "plain":
        raise UserError(f"{source}: pooling cls inserts its summary token into the plain text, but input_strategy "
                        f"{input_strategy} wraps the text in a template that pools other positions; use "
                        "input_strategy plain.")
    if not isinstance(token, str) or not token.strip():
        raise UserError(f"{source}: summary_token must be a non-empty string such as {DEFAULT_SUMMARY_TOKEN!r}, "
                        f"got {token!r}.")
    if not isinstance(init, str) or not init:
        raise UserError(f"{source}: summary_token_init must be 'mean' or a token string of the vocabulary, got "
                        f"{init!r}.")
    return resolve_position(position, bidirectional, source)


def add_to_tokenizer(tokenizer, token: str, recorded_id: int | None = None, source: str = "summary_token"
                     ) -> tuple[int, bool]:
    """Make `token` a special token of `tokenizer`; returns (its id, whether it was added now).

    A token already in the vocabulary is accepted only as this model's own summary token (`recorded_id`, from
    a saved Embedder folder); any other token of the vocabulary would share its row with ordinary text."""
    from transformers import AddedToken

    from llm2emb.model.tokenization import mark_summary_token

    vocab = tokenizer.get_vocab()
    if token in vocab:
        token_id = int(vocab[token])
        if recorded_id is not None and token_id == int(recorded_id):
            mark_summary_token(tokenizer, token_id)
            return token_id, False
        special = {a.content for a in getattr(tokenizer, "added_tokens_decoder", {}).values() if a.special}
        kind = "a special token" if token in special or token in tokenizer.all_special_tokens else "a token"
        raise UserError(f"{source}: {token!r} is already {kind} of this tokenizer (id {token_id}), so it cannot "
                        f"be the new summary token; choose a string the tokenizer lacks, such as "
                        f"{DEFAULT_SUMMARY_TOKEN!r}.")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    mark_summary_token(tokenizer, token_id)
    if recorded_id is not None and token_id != int(recorded_id):
        raise UserError(f"{source}: this model was saved with summary token {token!r} as id {recorded_id}, but "
                        f"its base tokenizer now gives id {token_id}; the base model's tokenizer changed since "
                        "training.")
    return token_id, True


def init_embedding_row(backbone: torch.nn.Module, token_id: int, init: str, tokenizer, source: str) -> None:
    """Give the backbone an input-embedding row for `token_id` (resizing when it has none) set by `init`."""
    embeddings = backbone.get_input_embeddings()
    if token_id >= embeddings.num_embeddings:
        backbone.resize_token_embeddings(token_id + 1, mean_resizing=False)
        embeddings = backbone.get_input_embeddings()
    weight = embeddings.weight
    with torch.no_grad():
        if init == "mean":
            # the rows of the tokenizer's other tokens (a padded matrix's unused rows after them are left out)
            value = weight[:min(token_id, len(tokenizer) - 1)].float().mean(dim=0)
        else:
            ids = tokenizer(init, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == token_id:
                raise UserError(f"{source}: summary_token_init {init!r} is not one existing token of this tokenizer "
                                f"(it encodes to {len(ids)} tokens); use 'mean' or one token such as "
                                f"{tokenizer.eos_token!r}.")
            value = weight[int(ids[0])].float()
        weight[token_id] = value.to(weight.dtype)


def summary_index(tokenizer, position: str) -> int:
    """Where the summary token sits among a text's real tokens: its index from the start (after the
    post-processor's leading special tokens) for `start`, -1 (the last token) for `end`."""
    from llm2emb.model.tokenization import post_processor_prefix

    return len(post_processor_prefix(tokenizer)) if position == "start" else -1


def data_setting(config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(summary token, start | end) that data prepared for the training config `config` (field names of
    `TrainConfig`, defaults where missing) must carry: `prepare(summary_token=..., summary_token_position=...)`;
    None when its pooling reads no summary token."""
    if not uses_summary_token(str(config.get("pooling_mode", "eos"))):
        return None
    position = resolve_position(config.get("summary_token_position"), bool(config.get("bi_attn_enabled", False)),
                                "config")
    return str(config.get("summary_token") or DEFAULT_SUMMARY_TOKEN), position


def saved_setting(config, tokenizer) -> tuple[str, str] | None:
    """(summary token, start | end) of a saved Embedder config (`EmbedderConfig`) whose pooling reads one,
    else None; marks the token on `tokenizer` (whose exported post-processor may insert it)."""
    from llm2emb.model.tokenization import mark_summary_token, summary_token_id

    if not uses_summary_token(config.pooling):
        return None
    position = config.summary_token_position
    if position not in ("start", "end"):  # a config not resolved by an Embedder yet
        position = resolve_position(position, config.bidirectional, "llm2emb_config.json")
    mark_summary_token(tokenizer, summary_token_id(tokenizer, config.summary_token))
    return config.summary_token, position
