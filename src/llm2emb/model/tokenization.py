"""The one tokenisation rule shared by training data preparation and `Embedder.encode`, so a model sees
the same tokens in both: the tokenizer's own special tokens (e.g. Gemma's BOS), truncation to
`max_length - 1`, then EOS appended (so EOS is always last and always present, also after truncation).

For skip-instruction pooling it also returns, per text, how many leading tokens belong to the
instruction prefix: every token that starts before the end of the first `separator` occurrence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class EncodedTexts:
    input_ids: list[list[int]]
    prefix_lengths: list[int]
    truncated: int = 0  # how many texts were cut to max_length
    truncated_mask: list[bool] = field(default_factory=list)  # per text: was it cut (for data statistics)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, separator: str | None = None,
                 ) -> EncodedTexts:
    """Tokenise `texts` (already carrying any instruction) with EOS appended; see module docstring."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one token plus EOS)")
    texts = list(texts)
    if not texts:
        return EncodedTexts([], [], 0, [])
    want_offsets = bool(separator)
    enc = tokenizer(texts, add_special_tokens=True, truncation=False,
                    return_offsets_mapping=want_offsets, return_attention_mask=False)
    eos = tokenizer.eos_token_id
    input_ids: list[list[int]] = []
    prefix_lengths: list[int] = []
    truncated_mask: list[bool] = []
    for i, ids in enumerate(enc["input_ids"]):
        if ids and ids[-1] == eos:  # tokenizers that already append EOS: keep exactly one
            ids = ids[:-1]
        cut_here = len(ids) > max_length - 1
        truncated_mask.append(cut_here)
        if cut_here:
            ids = ids[: max_length - 1]
        input_ids.append(list(ids) + [eos])
        prefix = 0
        if want_offsets:
            cut = texts[i].find(separator)
            if cut >= 0:
                end = cut + len(separator)
                offsets = enc["offset_mapping"][i][: len(ids)]
                prefix = sum(1 for start, _ in offsets if start < end)
                prefix = min(prefix, len(ids))
        prefix_lengths.append(prefix)
    return EncodedTexts(input_ids, prefix_lengths, sum(truncated_mask), truncated_mask)
