"""`llm2emb.structured`, the one reader of user YAML / JSON files: duplicate keys refused (merge keys may be
overridden), trailing commas named on their line, files that are not UTF-8 named by line with the fix."""
from __future__ import annotations

import pytest

from llm2emb.errors import UserError
from llm2emb.structured import parse_json, parse_structured, parse_yaml, read_structured_file


def test_yaml_duplicate_keys_in_one_mapping_are_refused_with_their_line():
    with pytest.raises(UserError, match=r"^x\.yaml: line 4: 'c' is given twice in one mapping"):
        parse_yaml("a: 1\nb:\n  c: 1\n  c: 2\n", "x.yaml")
    # equal keys in different mappings, and a merge key's values overridden, are fine
    assert parse_yaml("a: {x: 1}\nb: {x: 2}\n", "x.yaml") == {"a": {"x": 1}, "b": {"x": 2}}
    assert parse_yaml("base: &b {a: 1, b: 2}\nr:\n  <<: *b\n  a: 3\n", "x.yaml")["r"] == {"a": 3, "b": 2}


def test_json_duplicate_keys_and_trailing_commas():
    with pytest.raises(UserError, match=r"^x\.json: 'a' is given twice in one mapping"):
        parse_json('{"a": 1, "b": 2, "a": 3}', "x.json")
    assert parse_json('{"a": {"x": 1}, "b": {"x": 2}}', "x.json") == {"a": {"x": 1}, "b": {"x": 2}}
    with pytest.raises(UserError, match=r"trailing comma at line 2, column 8 \(before the closing '\}'\)"):
        parse_json('{"a": 1,\n "b": 2,\n}', "x.json")
    with pytest.raises(UserError, match=r"x\.json: invalid JSON at line 2, column 2: Expecting ',' delimiter"):
        parse_json('{"a": 1\n "b": 2}', "x.json")
    # an unknown suffix: JSON when it parses as JSON (duplicates still refused), else YAML
    with pytest.raises(UserError, match="given twice"):
        parse_structured('{"a": 1, "a": 2}', "x.cfg")
    assert parse_structured("a: 1\n", "x.cfg") == {"a": 1}


def test_files_that_are_not_utf8_missing_or_folders(tmp_path):
    latin = tmp_path / "c.yaml"
    latin.write_bytes("a: 1\nb: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"c\.yaml: line 2 is not UTF-8 \(byte 0xe9\).*iconv -f latin1 -t utf-8"):
        read_structured_file(latin)
    with pytest.raises(UserError, match=r"^Config file .*nope\.yaml does not exist; pass a YAML or JSON config "
                                        r"file such as configs/x\.json\.$"):
        read_structured_file(tmp_path / "nope.yaml", "config file", "configs/x.json")
    with pytest.raises(UserError, match=r"is a folder, not a file"):
        read_structured_file(tmp_path)
