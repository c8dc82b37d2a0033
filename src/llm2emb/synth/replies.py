"""Reading a generator's reply: the first JSON object in it, with the fields the task expects.

Small models wrap JSON in prose or code fences, add fields nobody asked for, or stop early; the parser
takes the first `{...}` that decodes as a JSON object (prose around it is ignored), or, when the object is
never closed, its complete leading key/value pairs, and checks the expected fields. Anything else is a
ReplyError whose reason is counted in the report; the caller retries a bounded number of times.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

_DECODER = json.JSONDecoder(strict=False)  # models put raw newlines inside strings


class ReplyError(ValueError):
    """A reply that cannot be used; `reason` is a short stable key for the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def first_json_object(text: str) -> dict[str, Any]:
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ReplyError("no_json", text[:80])


def leading_pairs(text: str) -> dict[str, Any]:
    """The complete key/value pairs at the start of the first `{` in `text`, even when the object itself is
    never closed (a small model often adds fields until it runs out of tokens): `{"query": "x", "note": "y`
    gives {"query": "x"}."""
    start = text.find("{")
    if start < 0:
        return {}
    pairs: dict[str, Any] = {}
    pos = start + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        try:
            key, pos = _DECODER.raw_decode(text, pos)
            while pos < n and text[pos] in " \t\r\n":
                pos += 1
            if not isinstance(key, str) or pos >= n or text[pos] != ":":
                return pairs
            pos += 1
            while pos < n and text[pos] in " \t\r\n":
                pos += 1
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return pairs
        pairs[key] = value
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n or text[pos] != ",":
            return pairs
        pos += 1


def _clean(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())  # models break lines and double spaces at random
    return text or None


def parse_fields(text: str, fields: Sequence[str], labels: Sequence[str] = ()) -> dict[str, str]:
    """The text `fields` of the first JSON object in `text`; with `labels`, a `label` field must name one of
    them (case and surrounding spaces ignored; the label's own spelling is returned)."""
    try:
        obj = first_json_object(text)
    except ReplyError:
        obj = leading_pairs(text)  # the object was never closed; its complete leading fields still count
        if not obj:
            raise
    out: dict[str, str] = {}
    for name in fields:
        if name not in obj:
            raise ReplyError("missing_field", name)
        value = _clean(obj[name])
        if value is None:
            raise ReplyError("empty_field", name)
        out[name] = value
    if labels and "label" in out:
        by_key = {label.strip().lower(): label for label in labels}
        match = by_key.get(out["label"].strip().lower())
        if match is None:
            raise ReplyError("unknown_label", out["label"][:40])
        out["label"] = match
    return out


def parse_judgement(text: str, num_candidates: int) -> tuple[int, list[int]]:
    """(best, relevant) 1-based candidate numbers of a relabelling reply {"best": n, "relevant": [..]}."""
    obj = first_json_object(text)

    def number(value: Any) -> int:
        if isinstance(value, bool):
            raise ReplyError("bad_number", repr(value))
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or not 1 <= value <= num_candidates:
            raise ReplyError("bad_number", repr(value)[:20])
        return value

    if "best" not in obj:
        raise ReplyError("missing_field", "best")
    best = number(obj["best"])
    relevant_raw = obj.get("relevant", [])
    if isinstance(relevant_raw, (int, str)) and not isinstance(relevant_raw, bool):
        relevant_raw = [relevant_raw]
    if not isinstance(relevant_raw, list):
        raise ReplyError("bad_number", "relevant")
    relevant = sorted({number(v) for v in relevant_raw})
    return best, relevant
