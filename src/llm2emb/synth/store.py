"""The state of a synth run in its output folder: the run manifest and the append-only log of finished work.

    DIR/_synth/run.json          what the run is (spec, model, corpus, seed, batch size): written once, atomically
    DIR/_synth/generated.jsonl   one line per finished chunk of passages, appended and fsynced
    DIR/_synth/timing.jsonl      seconds per chunk (kept apart: the generated log is identical across runs)

A killed run leaves at most a torn last line, which is cut off when the run continues; the chunk it held is
generated again. A folder whose run.json describes another run is refused, naming what differs. The
leading underscore keeps `llm2emb prepare` from taking these files for datasets.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from llm2emb.atomic import write_json_atomic
from llm2emb.errors import UserError

STATE_DIR = "_synth"
RUN_FILE = "run.json"
LOG_FILE = "generated.jsonl"
TIMING_FILE = "timing.jsonl"
REPORT_FILE = "report.json"
DROPPED_FILE = "dropped.jsonl"
STATE_VERSION = 1


class RunStore:
    def __init__(self, output: str | Path) -> None:
        self.output = Path(output).expanduser()
        self.dir = self.output / STATE_DIR

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    def open(self, key: dict[str, Any], dataset: str) -> bool:
        """Claim the folder for the run `key`; True when it continues an earlier run of the same key."""
        if self.check(key, dataset):
            return True
        write_json_atomic(self.dir / RUN_FILE, {"key": key})
        return False

    def check(self, key: dict[str, Any] | None, dataset: str) -> bool:
        """`open`'s refusals without writing: True when the folder holds a run of `key` (continued), False when
        it holds none yet. `key=None` (not known: a dry run that fetched no model) compares nothing and says
        whether a run is there."""
        run_path = self.dir / RUN_FILE
        if run_path.exists():
            try:
                previous = json.loads(run_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"Cannot read {run_path} ({exc}); choose another --output folder.") from exc
            old_key = previous.get("key", {})
            if key is not None and old_key != key:
                differs = [part for part in ("version", "spec", "model", "corpus", "seed", "batch_size", "generator")
                           if old_key.get(part) != key.get(part)] or ["settings"]
                raise UserError(f"{self.output} holds a different synth run (its {', '.join(differs)} differ"
                                f"{'s' if len(differs) == 1 else ''}); choose another --output folder, or delete "
                                f"{self.dir} to start over there.")
            return True
        if self.log_path.exists():
            raise UserError(f"{self.log_path} exists without {RUN_FILE}; choose another --output folder.")
        if (self.output / f"{dataset}.parquet").exists():
            raise UserError(f"{self.output / (dataset + '.parquet')} exists and was not written by a synth run; "
                            "choose another dataset name in the spec or another --output folder.")
        return False

    def chunks(self, repair: bool = True) -> dict[int, dict[str, Any]]:
        """Finished chunks by index (a later line for the same chunk wins); a torn last line is ignored, and cut
        off the file when `repair` (a dry run reads without repairing)."""
        path = self.log_path
        if not path.exists():
            return {}
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and not repair:
            data = data[:end]
        elif end < len(data):  # a write cut short by a kill: drop it, the chunk is redone
            with open(path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        done: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done[int(record["chunk"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path}, line {number} is damaged ({exc}); delete that line (its chunk is "
                                "generated again) or start over in another --output folder.") from exc
        return done

    def append(self, record: dict[str, Any]) -> None:
        self._append(self.log_path, record)

    def append_timing(self, record: dict[str, Any]) -> None:
        self._append(self.dir / TIMING_FILE, record)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with open(path, "ab") as fh:  # one write of a whole line, then fsync: a kill tears at most this line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def timings(self) -> Iterator[dict[str, Any]]:
        path = self.dir / TIMING_FILE
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a torn timing line only loses a measurement
