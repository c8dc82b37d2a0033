"""Field checks shared by the study and pipeline files: unknown keys (did-you-mean), paths relative to the
file, integers, seeds. Each raises `UserError` with one sentence naming the file and field."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError, did_you_mean


def _duplicate_key_loader():
    """A YAML SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently: two recipes with
    one name would vanish into one)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice; names must be unique.")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def read_experiment_file(path: Path, kind: str = "study", fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """A study or pipeline file (YAML or JSON) as a mapping; duplicate keys and syntax errors are one sentence."""
    import yaml

    if not path.is_file():
        example = "studies/seed_configs.yaml" if kind == "study" else "pipelines/demo_staged.yaml"
        raise UserError(f"{kind.capitalize()} file {path} does not exist; pass a YAML or JSON file such as "
                        f"{example}.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            def no_duplicates(pairs):
                keys = [k for k, _ in pairs]
                twice = sorted({k for k in keys if keys.count(k) > 1})
                if twice:
                    raise UserError(f"{twice[0]!r} is given twice; names must be unique.")
                return dict(pairs)
            data = json.loads(text, object_pairs_hook=no_duplicates)
        else:
            data = yaml.load(text, Loader=_duplicate_key_loader())
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
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
