"""The loss registry: every training objective is a registered `LossTerm` with typed, validated options.

A training config composes objectives with `losses`, a list of mappings:

    losses:
      - {name: contrastive, temperature: 0.05, mrl_dims: [128, 256]}
      - {name: spread_out, weight: 0.1, t: 2.0}

`name` picks the registered class, `weight` (default 1) scales its loss, every other key is one of the
class's `Options` fields (unknown keys get a did-you-mean error, types and ranges are checked). Adding an
objective is one file with a `@register_loss("name")` class plus its import in `losses/__init__.py`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor, nn

from llm2emb.errors import UserError, did_you_mean


@dataclass
class TeacherBatch:
    """A teacher's view of the same rows, for distillation losses (constants: no gradient).

    q, p: (B, Dt) teacher embeddings of the queries / positives; n: (B, k, Dt) of the hard negatives, or None;
    scores: (B, 1 + k) teacher scores of [positive, negatives] per row (e.g. a reranker's), or None. Either
    the embeddings or the scores may be missing."""

    q: Tensor | None = None
    p: Tensor | None = None
    n: Tensor | None = None
    scores: Tensor | None = None

    def to(self, device) -> "TeacherBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)
        return TeacherBatch(move(self.q), move(self.p), move(self.n), move(self.scores))


@dataclass
class EmbeddingBatch:
    """What a loss term sees of one step: embeddings plus what identifies the texts behind them.

    q, p: (B, D) un-normalised query / positive embeddings; n: (B, k, D) hard negatives or None;
    use_inbatch: whether the dataset's task type allows in-batch negatives; passage_keys (B,) and
    negative_keys (B, k): int64 content keys (equal keys = identical token ids) used to mask duplicates;
    teacher: the teacher's embeddings / scores of the same rows when the data has them (distillation)."""

    q: Tensor
    p: Tensor
    n: Tensor | None
    use_inbatch: bool
    passage_keys: Tensor | None = None
    negative_keys: Tensor | None = None
    teacher: TeacherBatch | None = None


class LossTerm(nn.Module):
    """A registered objective. Subclasses set `Options` (a dataclass) and implement `forward`.

    `forward(batch)` returns (loss, parts): the scalar to optimise (before the term's weight) and detached
    float values worth logging, keyed by name (e.g. {"contrastive@128": 0.4})."""

    name: ClassVar[str] = ""
    #: reads `EmbeddingBatch.teacher` (distillation): the data needs teacher columns or a teacher_model
    uses_teacher: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, gather: bool = True) -> None:
        super().__init__()
        self.options = options
        self.gather = gather

    def forward(self, batch: EmbeddingBatch) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError


LOSS_REGISTRY: dict[str, type[LossTerm]] = {}


def register_loss(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    def wrap(cls: type[LossTerm]) -> type[LossTerm]:
        LOSS_REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def _type_ok(tp: Any, value: Any) -> Any:
    """`value` converted to the option's type, or raises TypeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _type_ok(inner[0], value)
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_type_ok(elem, v) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            raise TypeError
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError  # pragma: no cover


@dataclass(frozen=True)
class LossSpec:
    """One validated entry of `losses`."""

    name: str
    weight: float
    options: Any

    def build(self, gather: bool = True) -> LossTerm:
        return LOSS_REGISTRY[self.name](self.options, gather=gather)


def parse_loss_spec(entry: Any, source: str) -> LossSpec:
    """Validate one `losses` entry (see module docstring); raises UserError naming `source` and the key."""
    if not isinstance(entry, Mapping):
        raise UserError(f"{source} must be a mapping like {{name: contrastive, weight: 1.0}}, got {entry!r}.")
    name = entry.get("name")
    if name not in LOSS_REGISTRY:
        raise UserError(f"{source}: unknown loss {name!r}; choose one of: {', '.join(LOSS_REGISTRY)}."
                        + did_you_mean(str(name), LOSS_REGISTRY))
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise UserError(f"{source}: weight must be a finite number >= 0, got {weight!r}.")
    cls = LOSS_REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("name", "weight"):
            continue
        if key not in fields:
            raise UserError(f"{source}: loss {name!r} has no option {key!r}." + did_you_mean(str(key), fields)
                            + f" Its options: {', '.join(fields) or 'none'}.")
        try:
            values[key] = _type_ok(hints[key], value)
        except TypeError:
            raise UserError(f"{source}: option {key!r} of loss {name!r} must be of type "
                            f"{getattr(hints[key], '__name__', hints[key])}, got {value!r}.") from None
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UserError(f"{source}: loss {name!r}: {exc}.") from None
    return LossSpec(name=name, weight=float(weight), options=options)


def parse_loss_specs(entries: Sequence[Any], source: str = "config") -> list[LossSpec]:
    specs = [parse_loss_spec(entry, f"{source}: losses[{i}]") for i, entry in enumerate(entries)]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{source}: losses lists {', '.join(twice)} more than once; give each loss once.")
    return specs


def loss_docs() -> list[dict[str, str]]:
    """[{name, options, doc}] for README tables and `llm2emb train --list-losses`."""
    rows = []
    for name, cls in LOSS_REGISTRY.items():
        defaults = cls.Options()
        opts = ", ".join(f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(cls.Options))
        rows.append({"name": name, "options": opts, "doc": (cls.__doc__ or "").strip().splitlines()[0]})
    return rows
