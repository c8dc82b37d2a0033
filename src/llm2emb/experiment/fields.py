"""Field checks shared by the study and pipeline files: unknown keys (did-you-mean), paths relative to the
file, integers, seeds. Each raises `UserError` with one sentence naming the file and field."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError, did_you_mean


def read_experiment_file(path: Path, kind: str = "study", fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """A study or pipeline file (YAML or JSON) as a mapping, read by the one loader of user files
    (`llm2emb.structured`: duplicate keys refused, syntax errors named on their line)."""
    from llm2emb.structured import read_structured_file

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        example = "studies/seed_configs.yaml" if kind == "study" else "pipelines/demo_staged.yaml"
        raise UserError(f"{kind.capitalize()} file {path} {what}; pass a YAML or JSON file such as {example}.")
    data = read_structured_file(path, f"{kind} file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {kind} file is a mapping with {', '.join(fields) or 'its fields'}.")
    return data


def check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse a key outside `allowed` (with a did-you-mean hint and the known fields)."""
    for key in data:
        if key not in allowed:
            raise UserError(f"{where}: unknown field {key!r}.{did_you_mean(str(key), allowed)} "
                            f"Known fields: {', '.join(allowed)}.")


def resolve_path(value: str, root: Path) -> str:
    """A path relative to the experiment file (its folder is `root`)."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def int_field(value: Any, where: str, minimum: int = 1, optional: bool = True) -> int | None:
    """`value` as an integer >= `minimum` (None allowed when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{where} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_seeds(seeds: Any, where: str) -> list[int]:
    """A study's or pipeline's `seeds`: a non-empty list of distinct non-negative integers."""
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{where}: seeds must be a non-empty list of integers, e.g. [1, 2, 3].")
    for s in seeds:
        int_field(s, f"{where}: seeds entry", minimum=0, optional=False)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds {seeds} lists a seed twice.")
    return [int(s) for s in seeds]




def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config (what decides a cell's or stage's result)."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
