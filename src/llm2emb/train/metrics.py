"""Where training numbers go: `metrics.jsonl` in the run folder (one JSON object per event), TensorBoard
and the configured experiment trackers (`report_to`, TensorBoard by default), and a progress bar with loss, lr and samples/s. Only the main process writes.

Loss values are accumulated as device tensors and turned into Python floats only every `log_interval`
steps, so the step loop does not synchronise with the GPU for logging.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from llm2emb.layout import METRICS_FILE

logger = logging.getLogger(__name__)



class RunningMean:
    """Sums of named scalars (tensors or floats) over steps; `pop()` returns the means and resets."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


class MetricsWriter:
    """JSONL + experiment trackers + tqdm for the main process; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, trackers: Callable[[], list[Any]] | None, total_steps: int,
                 initial_step: int, enabled: bool, show_progress: bool = True) -> None:
        """`trackers` starts the experiment trackers (`llm2emb.train.trackers.start_trackers`); it is called on
        the main process only."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.trackers: list[Any] = []
        self.bar = None
        if not enabled:
            return
        if trackers is not None:
            self.trackers = trackers()
        if show_progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                            dynamic_ncols=True)
        if initial_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh start of this run: drop metrics of an attempt without checkpoint
        elif initial_step > 0 and self.path.exists():
            self._truncate_after(initial_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by the crash
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, kind: str, step: int, values: dict[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        record = {"type": kind, "step": step, **extra,
                  **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        finite = {f"{kind}/{name}": value for name, value in values.items() if math.isfinite(value)}
        for tracker in self.trackers:
            tracker.log(finite, step=step)

    def progress(self, steps: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


class Throughput:
    """Samples per second between two calls of `rate()` (wall clock)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def reset(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.samples / max(now - self.start, 1e-9)
        self.start, self.samples = now, 0
        return value
