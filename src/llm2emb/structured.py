"""The one reader of the YAML / JSON files a user writes (training configs, study and pipeline files, synth
specs, data manifests): every mistake is one UserError naming the file and the line.

PyYAML and `json` keep the last of two equal keys silently (`learning_rate` written twice trains with the
second value); here a key given twice in one mapping is refused. A JSON trailing comma is named on its own
line (json's own message points at the line after it), and a file that is not UTF-8 is reported with its
line number and the fix.

    data = read_structured_file(Path("configs/config.f2llm.json"))     # -> Any (callers check the shape)

A leaf module: it imports nothing from llm2emb but `errors` (PyYAML is imported inside the functions).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError

JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")


def read_text_utf8(path: Path, what: str = "file") -> str:
    """The file's text; a file that is not UTF-8 is named with the line of its first bad byte and the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); the {what} must be "
                        f"UTF-8 text: convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name}`, "
                        "or re-save it as UTF-8 in your editor.") from None


def _duplicate_key_loader():
    """A YAML SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue                 # `<<: *anchor` keys may be overridden by the mapping's own keys
            key = loader.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:            # an unhashable key: PyYAML reports it below
                twice = False
            if twice:
                raise UserError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one mapping; "
                                "keep one (both would be read, and only the last one used).")
            if not isinstance(key, (list, dict)):
                seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def _line_of(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def parse_json(text: str, path: Path | str) -> Any:
    """JSON with duplicate keys refused and syntax errors named on their line (trailing commas by name)."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = [k for i, k in enumerate(keys) if k in keys[:i]]
        if twice:
            raise UserError(f"{path}: {twice[0]!r} is given twice in one mapping; keep one (both would be read, "
                            "and only the last one used).")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        before = exc.pos - 1
        while before >= 0 and text[before] in " \t\r\n":
            before -= 1
        if before >= 0 and text[before] == "," and exc.pos < len(text) and text[exc.pos] in "}]":
            line, col = _line_of(text, before)
            raise UserError(f"{path}: invalid JSON: trailing comma at line {line}, column {col} (before the "
                            f"closing {text[exc.pos]!r}); JSON allows no comma after the last item, remove it.") \
                from None
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None


def parse_yaml(text: str, path: Path | str) -> Any:
    """YAML (safe) with duplicate keys refused and syntax errors named on their line."""
    import yaml

    try:
        return yaml.load(text, Loader=_duplicate_key_loader())
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or exc
        raise UserError(f"{path}: invalid YAML{where}: {problem}.") from None


def parse_structured(text: str, path: Path | str) -> Any:
    """Parse by suffix: .json as JSON, .yaml / .yml as YAML, anything else as JSON if it parses, else YAML."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return parse_json(text, path)
    if suffix in YAML_SUFFIXES:
        return parse_yaml(text, path)
    try:
        return parse_json(text, path)
    except UserError as exc:
        if "is given twice" in str(exc):
            raise
    return parse_yaml(text, path)


def read_structured_file(path: str | Path, what: str = "file", example: str = "") -> Any:
    """Read and parse a user's YAML / JSON file; a missing path or a folder is one sentence naming `what`
    (e.g. "config file") and, when given, an `example` of a good one."""
    p = Path(path).expanduser()
    hint = f"; pass a YAML or JSON {what} such as {example}" if example else ""
    if p.is_dir():
        raise UserError(f"{what.capitalize()} {p} is a folder, not a file{hint}.")
    if not p.is_file():
        raise UserError(f"{what.capitalize()} {p} does not exist{hint}.")
    return parse_structured(read_text_utf8(p, what), p)
