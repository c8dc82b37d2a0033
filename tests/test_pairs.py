"""`llm2emb pairs`: weakly supervised pairs from .txt / .md / .py files, checked pair by pair, the output
folder prepare reads, the manifest, and bad input."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from llm2emb.cli import main
from llm2emb.data.pairs import (INFO_NAME, PairSettings, collect_pairs, cut, first_sentence, markdown_pairs,
                                python_pairs, text_document_pairs, write_pairs)
from llm2emb.errors import UserError

SETTINGS = PairSettings(min_query_chars=5, min_passage_chars=10)

MARKDOWN = textwrap.dedent("""\
    Intro paragraph before any heading. It has two sentences.

    # Installing the tool

    Run pip install tool, then check the version.

    ```
    # not a heading: inside a code fence
    pip install tool
    ```

    ## Configuring **it**

    Set the environment variable TOOL_HOME to a folder.

    ## Empty

    """)

PYTHON = textwrap.dedent('''\
    """Helpers for parsing dates.

    More text about the module."""
    import re


    @decorator
    def parse_date(text):
        """Parse an ISO date string into a tuple.

        Details that are not part of the query.
        """
        year, month, day = text.split("-")
        return int(year), int(month), int(day)


    class Calendar:
        """A calendar of named events."""

        def add(self, name, day):
            """Add an event on a given day."""
            self.events[name] = day

        def stub(self):
            """Only a docstring here."""


    def one_liner(): """Docstring on the def line."""; return 1
    ''')


def test_first_sentence_and_cut():
    assert first_sentence("One sentence here. And the rest! More.") == ("One sentence here.", "And the rest! More.")
    assert first_sentence("今天天气很好。我们去公园散步吧。") == ("今天天气很好。", "我们去公园散步吧。")
    assert first_sentence("no end at all") == ("no end at all", "")
    assert cut("alpha beta gamma delta", 13) == "alpha beta"
    assert cut("short", 100) == "short"


def test_text_title_or_first_sentence():
    (pair,) = text_document_pairs("\n\nA Short Title\nThe body of the text follows here.\n", "a.txt", SETTINGS)
    assert (pair.query, pair.passage, pair.kind, pair.line) == (
        "A Short Title", "The body of the text follows here.", "title", 3)
    # a first line ending like a sentence is not a title: first sentence <-> rest
    (pair,) = text_document_pairs("Cats sleep a lot. They also\nhunt at night and play.", "b.txt", SETTINGS)
    assert (pair.query, pair.passage, pair.kind) == ("Cats sleep a lot.", "They also\nhunt at night and play.",
                                                     "first_sentence")
    # too short a passage: nothing
    assert text_document_pairs("Title\nshort", "c.txt", SETTINGS) == []
    assert text_document_pairs("   \n", "d.txt", SETTINGS) == []


def test_markdown_sections():
    pairs = markdown_pairs(MARKDOWN, "doc.md", SETTINGS)
    got = [(p.query, p.kind, p.line) for p in pairs]
    assert got == [("Intro paragraph before any heading.", "first_sentence", 1),
                   ("Installing the tool", "heading", 3),
                   ("Configuring it", "heading", 12)]
    install = pairs[1].passage
    assert install.startswith("Run pip install tool") and "# not a heading: inside a code fence" in install
    assert pairs[2].passage == "Set the environment variable TOOL_HOME to a folder."


def test_python_docstrings():
    pairs = {p.query: p for p in python_pairs(PYTHON, "dates.py", SETTINGS)}
    assert set(pairs) == {"Helpers for parsing dates.", "Parse an ISO date string into a tuple.",
                          "A calendar of named events.", "Add an event on a given day."}
    parse = pairs["Parse an ISO date string into a tuple."]
    assert parse.kind == "docstring" and parse.line == 9
    assert parse.passage == ('@decorator\ndef parse_date(text):\n    year, month, day = text.split("-")\n'
                             '    return int(year), int(month), int(day)')
    assert pairs["Add an event on a given day."].passage == "def add(self, name, day):\n    self.events[name] = day"
    calendar = pairs["A calendar of named events."].passage
    assert calendar.startswith("class Calendar:\n\n    def add") and "A calendar of" not in calendar
    module = pairs["Helpers for parsing dates."]
    assert module.kind == "module_docstring" and module.passage.startswith("import re")
    assert "More text about the module" not in module.passage
    with pytest.raises(SyntaxError):
        python_pairs("def broken(:\n", "x.py", SETTINGS)


def write_tree(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text(MARKDOWN)
    (root / "notes.txt").write_text("Release Notes\nVersion two fixes the parser and adds a calendar.\n")
    (root / "dup.txt").write_text("Release Notes\nVersion two fixes the parser and adds a calendar.\n")
    (root / "other.txt").write_text("Release Notes\nA different body for the same title, long enough.\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "dates.py").write_text(PYTHON)
    (root / "pkg" / "broken.py").write_text("def broken(:\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "junk.py").write_text('def f():\n    """Never read at all."""\n    return 1\n')
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.md").write_text("# Secret heading\nnever read, it is hidden away\n")
    (root / "latin1.txt").write_bytes("Caf\xe9 title\nbody".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


def test_folder_to_training_data(tmp_path):
    root = write_tree(tmp_path / "in")
    result = write_pairs(root, tmp_path / "out", SETTINGS)
    out = tmp_path / "out"
    assert result.rows == {"text_pairs": 4, "code_pairs": 4}
    text = pd.read_parquet(out / "text_pairs.parquet")
    assert list(text.columns) == ["query", "passage"]
    # dup.txt repeats notes.txt exactly (dropped); other.txt has the same title with another body (dropped)
    assert sorted(text["query"]) == ["Configuring it", "Installing the tool", "Intro paragraph before any heading.",
                                     "Release Notes"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == {"text_pairs", "code_pairs"}
    assert all(v["type"] == "retrieval" and v["instruction"].endswith("Query: ") for v in manifest.values())
    info = json.loads((out / INFO_NAME).read_text())
    assert info["dropped"] == {"duplicate_pair": 1, "ambiguous_query": 1}
    assert {f["path"]: f["pairs"] for f in info["files"]}["pkg/dates.py"] == 4
    reasons = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {"pkg/broken.py", "latin1.txt"}
    assert "not valid Python" in reasons["pkg/broken.py"] and "UTF-8" in reasons["latin1.txt"]
    assert info["datasets"]["code_pairs"]["by_kind"] == {"module_docstring": 1, "docstring": 3}


def test_output_prepares_with_a_tokenizer(tiny_model, tmp_path):
    from llm2emb.data.tokenize import prepare, read_prepared

    root = write_tree(tmp_path / "in")
    write_pairs(root, tmp_path / "out", SETTINGS)
    prepare(str(tiny_model), tmp_path / "out", tmp_path / "tok", max_seq_length=64, workers=1, progress=False)
    info = read_prepared(tmp_path / "tok")
    assert set(info["datasets"]) == {"text_pairs", "code_pairs"}       # _pairs_info.json is not a dataset
    assert info["stats"]["code_pairs"]["rows"] == 4


def test_bad_input_and_cli(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        collect_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .txt / .md"):
        collect_pairs(tmp_path / "empty")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("Hi\nyo")
    with pytest.raises(UserError, match="No pairs found .*a.txt: no pair long enough"):
        write_pairs(tmp_path / "tiny", tmp_path / "out-tiny")
    assert not (tmp_path / "out-tiny").exists()
    with pytest.raises(UserError, match="must be at least --min-passage-chars"):
        collect_pairs(tmp_path / "tiny", PairSettings(min_passage_chars=50, max_passage_chars=10))
    root = write_tree(tmp_path / "in")
    with pytest.raises(UserError, match="inside the input folder"):
        write_pairs(root, root / "out")
    assert main(["pairs", str(root), "--output", str(tmp_path / "cli"), "--min-query-chars", "5",
                 "--min-passage-chars", "10"]) == 0
    assert "text_pairs: 4, code_pairs: 4 pairs" in capsys.readouterr().out
    assert main(["pairs", str(root), "--output", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err
