"""The merge-method registry: every way of merging weights is a registered `MergeMethod` with typed options.

A method merges one tensor at a time: `merge(tensors, base)` gets the same tensor of every input (float32 or
wider, same shape) and, for task-vector methods, the base model's tensor, and returns the merged tensor.
Everything around it (loading inputs, folding LoRA adapters, checking shapes, writing the Embedder folder)
is `llm2emb.merge.api`. Adding a method is one file with a `@register_merge("name")` class plus its import in
`llm2emb/merge/__init__.py`; the CLI, `--list-methods` and the error messages pick it up.

Options are a dataclass per method (`Options`); `parse_options` turns `--param key=value` strings (or a
mapping, as in a pipeline file) into it, with did-you-mean errors for unknown keys and type / range checks.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor

from llm2emb.errors import UserError, did_you_mean


class MergeMethod:
    """A registered merge method. Subclasses set the class attributes and implement `merge`.

    uses_base: the method merges task vectors (input - base) and needs the base model's weights;
    uses_weights: per-input weights (`--weights`) mean something to it; min_inputs / max_inputs: how many
    inputs it takes (None: any number)."""

    name: ClassVar[str] = ""
    uses_base: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 2
    max_inputs: ClassVar[int | None] = None

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, weights: Sequence[float]) -> None:
        self.options = options
        self.weights = [float(w) for w in weights]

    def merge(self, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


MERGE_METHODS: dict[str, type[MergeMethod]] = {}


def register_merge(name: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    def wrap(cls: type[MergeMethod]) -> type[MergeMethod]:
        MERGE_METHODS[name] = cls
        cls.name = name
        return cls
    return wrap


def get_method(name: str) -> type[MergeMethod]:
    if name not in MERGE_METHODS:
        raise UserError(f"Unknown merge method {name!r}; choose one of: {', '.join(MERGE_METHODS)}."
                        + did_you_mean(str(name), MERGE_METHODS))
    return MERGE_METHODS[name]


def _convert(tp: Any, value: Any) -> Any:
    """`value` (a Python value or a command-line string) as type `tp`, or raises TypeError / ValueError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
        if not number.is_integer():
            raise TypeError
        return int(number)
    if tp is str:
        return str(value)
    raise TypeError  # pragma: no cover


def parse_options(method: type[MergeMethod], values: Mapping[str, Any] | Sequence[str] | None) -> Any:
    """`method.Options` from {key: value} or ["key=value", ...]; UserError for unknown keys and bad values."""
    pairs: dict[str, Any] = {}
    if values is None:
        values = {}
    if isinstance(values, Mapping):
        pairs = dict(values)
    else:
        for item in values:
            if "=" not in item:
                raise UserError(f"--param {item!r}: expected key=value, e.g. --param density=0.5.")
            key, text = item.split("=", 1)
            pairs[key.strip()] = text.strip()
    fields = {f.name: f for f in dataclasses.fields(method.Options)}
    hints = typing.get_type_hints(method.Options)
    converted: dict[str, Any] = {}
    for key, value in pairs.items():
        if key not in fields:
            raise UserError(f"Merge method {method.name!r} has no option {key!r}; its options: "
                            f"{', '.join(fields) or 'none'}." + did_you_mean(str(key), fields))
        try:
            converted[key] = _convert(hints[key], value)
        except (TypeError, ValueError):
            raise UserError(f"Option {key!r} of merge method {method.name!r} must be a finite "
                            f"{hints[key].__name__}, got {value!r}.") from None
    options = method.Options(**converted)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UserError(f"Merge method {method.name!r}: {exc}.") from None
    return options


def method_docs() -> list[dict[str, str]]:
    """[{name, options, doc}] for `llm2emb merge --list-methods` and the README."""
    rows = []
    for name, cls in MERGE_METHODS.items():
        defaults = cls.Options()
        options = ", ".join(f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(cls.Options))
        inputs = f"{cls.min_inputs}" + ("+" if cls.max_inputs is None else
                                       ("" if cls.max_inputs == cls.min_inputs else f"-{cls.max_inputs}"))
        rows.append({"name": name, "options": options or "-", "inputs": inputs,
                     "base": "yes" if cls.uses_base else "no", "weights": "yes" if cls.uses_weights else "no",
                     "doc": (cls.__doc__ or "").strip().splitlines()[0]})
    return rows
