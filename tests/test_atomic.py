"""llm2emb/atomic.py: results appear whole or not at all, with the permissions the user's umask gives a new
file or folder (not the 0600 / 0700 of the temporary they were written as)."""
from __future__ import annotations

import os
import stat

import pytest

from llm2emb import atomic


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_results_get_the_umask_permissions(tmp_path, monkeypatch, umask, file_mode, dir_mode):
    monkeypatch.setattr(atomic, "_UMASK", None)
    old = os.umask(umask)
    try:
        path = atomic.write_json_atomic(tmp_path / "a" / "record.json", {"x": 1})
        with atomic.atomic_dir(tmp_path / "model") as folder:
            (folder / "weights.bin").write_bytes(b"0")
    finally:
        os.umask(old)
        monkeypatch.setattr(atomic, "_UMASK", None)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode
    assert not [p for p in tmp_path.rglob(".*")]          # no temporaries left


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(tmp_path / "table.parquet") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
