"""Atomic writes: every file and folder llm2emb produces appears complete or not at all.

A writer fills a temporary sibling (same folder, so the final rename never crosses file systems) and
renames it over the target with `os.replace`; on any error, including KeyboardInterrupt, the temporary is
removed. This is the only place that implements the pattern.

    write_text_atomic(path, text)
    write_json_atomic(path, data)
    with atomic_path(path) as tmp: pq.write_table(table, tmp)      # any writer that takes a path
    with atomic_dir(folder) as tmp: model.save_pretrained(tmp)      # whole folders
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    # no os.getumask before Python 3.13; set-and-restore is the portable read (once per process)
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary keeps `path`'s suffix, since some writers (parquet, savefig) choose the format by it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; the result gets a normal file's permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` (a folder) when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())     # mkdtemp makes 0700; the result gets a normal folder's permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def check_output_folder(output: Path, overwrite: bool, marker: str, kind: str) -> None:
    """Refuse an `--output` folder that would lose something: an existing file (a command that writes a folder
    never replaces a file), or a non-empty folder without --overwrite; with --overwrite only an earlier output
    of the same kind (a folder holding `marker`) is replaced, never a folder of other files."""
    from llm2emb.errors import UserError

    if not output.exists():
        return
    if not output.is_dir():
        raise UserError(f"--output {output} is an existing file, and {kind} writes a folder; choose a new folder "
                        f"path (--overwrite replaces only an earlier {kind} output, never a file).")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--output {output} already exists; choose a new folder or pass --overwrite.")
    if not (output / marker).exists():
        raise UserError(f"--output {output} is a folder of other files, not an earlier {kind} output (it has no "
                        f"{marker}); --overwrite replaces only those, so choose a new folder.")
