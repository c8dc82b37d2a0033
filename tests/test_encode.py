"""`llm2emb encode`: txt/jsonl in, .npy/.parquet out, chunked streaming, and clear errors naming the line."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm2emb import Embedder
from llm2emb.cli import main

TEXTS = ["first line", "", "第三行：中文文本", "a somewhat longer fourth line about embeddings", "five"]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("enc") / "model"
    Embedder.from_pretrained(str(tiny_model), pooling="mean", query_instruction="Q: ").save(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir) -> Embedder:
    return Embedder.from_pretrained(str(model_dir))


def encode(*args: str) -> int:
    """`llm2emb encode ARGS` in fp32 (its default is auto, bf16 on some CPUs): these tests compare the streamed
    output with `Embedder.encode` in fp32 to 1e-5; tests/test_precision.py covers the default."""
    args = tuple(map(str, args))
    return main(["encode", *args, *(() if "--precision" in args else ("--precision", "fp32"))])


def test_txt_to_npy_in_chunks_matches_embedder(model_dir, reference, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\r\n".join(TEXTS) + "\n", encoding="utf-8")   # CRLF line ends, empty line kept
    out = tmp_path / "out.npy"
    assert encode("--model", model_dir, "--input", src, "--output", out, "--chunk-size", 2, "--batch-size", 2) == 0
    got = np.load(out)
    assert got.shape == (5, 64) and got.dtype == np.float32
    assert np.abs(got - reference.encode(TEXTS)).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]   # no temp files left


def test_jsonl_to_parquet_with_ids_dim_and_instruction(model_dir, reference, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"doc": t, "pid": f"d{i}"} for i, t in enumerate(TEXTS)]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:3]) + "\n\n"
                   + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[3:]), encoding="utf-8")
    out = tmp_path / "out.parquet"
    assert encode("--model", model_dir, "--input", src, "--output", out, "--field", "doc", "--id-field", "pid",
                  "--dim", 16, "--query", "--chunk-size", 3) == 0
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(5)]
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert np.abs(vectors - reference.encode(TEXTS, instruction="Q: ", dim=16)).max() < 1e-5

    out2 = tmp_path / "plain.parquet"
    assert encode("--model", model_dir, "--input", src, "--output", out2, "--field", "doc",
                  "--instruction", "Find:\\nQ: ", "--no-normalize") == 0   # \n as a shell passes it
    table = pq.read_table(out2)
    assert table.column("id").to_pylist() == list(range(5))   # record numbers without --id-field
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert np.abs(vectors - reference.encode(TEXTS, instruction="Find:\nQ: ", normalize=False)).max() < 1e-4


@pytest.mark.parametrize("content,fmt,extra,message", [
    (b"ok\nfine\n\xff\xfe broken\n", "txt", [], "line 3 is not valid UTF-8"),
    (b'{"text": "a"}\n{"text": "b",}\n', "jsonl", [], "line 2 is not valid JSON"),
    (b'{"text": "a"}\n{"body": "b"}\n', "jsonl", [], "line 2 has no 'text' field \\(it has 'body'\\)"),
    (b'{"text": "a"}\n[1, 2]\n', "jsonl", [], "line 2 is a JSON list"),
    (b'{"text": "a"}\n{"text": 5}\n', "jsonl", [], "line 2: field 'text' is a int"),
    (b'{"text": "a", "id": 1}\n{"text": "b"}\n', "jsonl", ["--id-field", "id"], "line 2 has no id field 'id'"),
    (b"", "txt", [], "has no texts to encode"),
])
def test_bad_input_names_the_line_and_writes_nothing(model_dir, tmp_path, capsys, content, fmt, extra, message):
    src = tmp_path / f"in.{fmt}"
    src.write_bytes(content)
    out = tmp_path / "out.parquet"
    assert encode("--model", model_dir, "--input", src, "--output", out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_argument_errors(model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    existing = tmp_path / "out.npy"
    existing.write_bytes(b"old")
    cases = [
        (["--output", existing], "already exists; pass --overwrite"),
        (["--output", tmp_path / "out.csv"], "must end in .npy"),
        (["--output", tmp_path / "o.npy", "--format", "jsonl", "--id-field", "id"], "needs a .parquet output"),
        (["--output", tmp_path / "o.parquet", "--id-field", "id"], "needs a .jsonl input"),
        (["--output", tmp_path / "o.npy", "--dim", 65], "--dim 65 is out of range"),
        (["--output", tmp_path / "o.npy", "--batch-size", 0], "--batch-size must be at least 1"),
    ]
    for extra, message in cases:
        assert encode("--model", model_dir, "--input", src, *extra) == 2
        assert message in capsys.readouterr().err
    assert existing.read_bytes() == b"old"
    assert encode("--model", model_dir, "--input", src, "--output", existing, "--overwrite") == 0
    assert np.load(existing).shape == (2, 64)


def test_run_dir_as_model(model_dir, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    (run / "config.json").write_text(json.dumps({"model_path": "x", "experiment_id": "run"}))
    src = tmp_path / "in.txt"
    src.write_text("hello\n你好\n", encoding="utf-8")
    assert encode("--model", run, "--input", src, "--output", tmp_path / "o.npy") == 0
    assert np.abs(np.load(tmp_path / "o.npy") - reference.encode(["hello", "你好"])).max() < 1e-5


def test_killed_encode_leaves_nothing(model_dir, tmp_path):
    """SIGTERM in the middle of writing removes the temp file (no half-written output)."""
    src = tmp_path / "big.txt"
    src.write_text("".join(f"line number {i} with some words\n" for i in range(200_000)), encoding="utf-8")
    out = tmp_path / "out.npy"
    proc = subprocess.Popen([sys.executable, "-m", "llm2emb.cli", "encode", "--model", str(model_dir), "--input",
                             str(src), "--output", str(out), "--chunk-size", "64", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not list(tmp_path.glob(".out.npy.*.tmp")):   # writing has started
            assert proc.poll() is None, "encode ended before writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_tabs_and_form_feeds_are_text(model_dir, tmp_path):
    """Only control characters that never occur in text are refused (see tests/test_bad_input.py)."""
    src = tmp_path / "in.txt"
    src.write_text("a\tb\n\x0cpage two\x0b\n")
    assert encode("--model", model_dir, "--input", src, "--output", tmp_path / "o.npy") == 0
    assert np.load(tmp_path / "o.npy").shape == (2, 64)


def test_dry_run_checks_and_writes_nothing(model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert encode("--model", model_dir, "--input", src, "--output", tmp_path / "out.npy", "--dry-run") == 0
    assert f"dry run: would embed 5 texts of {src}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    # the checks still run: a bad input line is reported as without --dry-run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    assert encode("--model", model_dir, "--input", bad, "--output", tmp_path / "o.npy", "--dry-run") == 2
    assert "line 2" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_no_progress_prints_no_bar(model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # as on a terminal, where the bar shows
    assert encode("--model", model_dir, "--input", src, "--output", tmp_path / "a.npy") == 0
    assert "5/5" in capsys.readouterr().err                    # the bar this test would catch
    assert encode("--model", model_dir, "--input", src, "--output", tmp_path / "b.npy", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "5/5" not in err and "text/s" not in err and "it/s" not in err


def test_overwrite_replaces_the_output_atomically(model_dir, tmp_path, monkeypatch):
    """--overwrite keeps the old file until the new one is complete: a failure on the way leaves it as it was."""
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    out.write_bytes(b"old")
    calls = []
    original = Embedder.encode

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("failed in the middle")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", failing)
    with pytest.raises(RuntimeError, match="failed in the middle"):
        encode("--model", model_dir, "--input", src, "--output", out, "--overwrite", "--chunk-size", 2)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]
    monkeypatch.setattr(Embedder, "encode", original)
    assert encode("--model", model_dir, "--input", src, "--output", out, "--overwrite") == 0
    assert np.load(out).shape == (5, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]
