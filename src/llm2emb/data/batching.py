"""Multi-task batches from a folder written by `llm2emb prepare`.

One optimizer step = one dataset (F2LLM, arXiv:2510.02294): a batch never mixes tasks, so the loss of the
step is the loss of one task type (in-batch negatives for retrieval-like data, hard-negative term only for
classification / clustering / STS, see `llm2emb.data.manifest.TASK_TYPES`).

An epoch is planned up front, identically on every process (it only depends on `seed`, the epoch number and
the data):
  1. each dataset's rows are split once into training rows and a held-out `validation_fraction` (seeded by
     `seed` and the dataset name, the same for every epoch);
  2. per epoch, a dataset's training rows are shuffled and, with `length_grouping`, cut into chunks of
     `LENGTH_GROUP_BATCHES` global batches whose rows are sorted by length, so a batch holds texts of
     similar length and padding stays small (the "megabatch" idea of HF's LengthGroupedSampler);
  3. the chunks are cut into global batches of `batch_size * num_processes` rows;
  4. a dataset's manifest `weight` w (default 1) scales its share: it contributes round(w x its batches) per
     epoch (at least one when w > 0; 0 leaves it out): for w > 1 further passes over its rows, each shuffled
     with its own seed, and the last pass cut to a random subset of its batches (all of them when w < 1);
  5. all batches of all datasets are put in one random order. Drawing the next step's dataset with
     probability proportional to its number of remaining batches is exactly that: a uniformly random
     permutation of the batches (what F2LLM does); with weights, each dataset's draw probability is
     proportional to weight x size.
Each process takes its share of a global batch (rows p, p + P, p + 2P, ...: a similar mix of lengths on every
process). Hard negatives are sampled per row from a generator seeded by (seed, epoch, step), so they too are
the same whichever process computes them, and a restored batcher reproduces them exactly.

The position is just (epoch, steps done in the epoch): `state_dict()` / `load_state_dict()` resume exactly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from llm2emb.data.manifest import DEFAULT_WEIGHT, TASK_TYPES, check_weight
from llm2emb.errors import UserError

logger = logging.getLogger(__name__)

LENGTH_GROUP_BATCHES = 16   # global batches per length-sorted chunk: more = less padding, less randomness
STATE_VERSION = 1


@dataclass
class TrainBatch:
    """One process's share of one step: token ids of a single dataset."""

    dataset: str
    task_type: str                 # from the manifest
    use_inbatch: bool              # in-batch negatives apply to this task type
    query_ids: list[list[int]]
    query_prefix_lengths: list[int]
    passage_ids: list[list[int]]
    negative_ids: list[list[int]]  # flattened, row i's negatives at [i*k:(i+1)*k]
    num_negatives: int             # k per row for this batch (0 = none)
    # teacher embeddings / scores of these rows when the data has teacher columns (distillation):
    # {"q": (b, Dt), "p": (b, Dt), "n": (b, k, Dt), "scores": (b, 1 + k)}, each key only when present
    teacher: dict[str, np.ndarray] | None = None
    # tokens before the pooled span of each passage / negative (data prepared for a span strategy such as
    # echo, whose pooled span is every text's second copy); None: the whole text is pooled
    passage_prefix_lengths: list[int] | None = None
    negative_prefix_lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.query_ids)


# Optional columns of prepared data with a teacher's view of each row (added for distillation losses):
# teacher_query / teacher_passage / teacher_negative_<j> (float32 embeddings) and teacher_scores
# (float32 [positive, negative_1 .. negative_K] scores).
TEACHER_QUERY, TEACHER_PASSAGE, TEACHER_SCORES = "teacher_query", "teacher_passage", "teacher_scores"


def teacher_negative_column(j: int) -> str:
    """The teacher column of `negative_<j>_input_ids` (j from 1)."""
    return f"teacher_negative_{j}"


def _float_rows(table, column: str, rows: np.ndarray) -> np.ndarray:
    import pyarrow as pa

    values = table.column(column).take(pa.array(rows)).combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)


def _teacher_rows(table, local: np.ndarray, local_choice: np.ndarray | None, k: int) -> dict[str, np.ndarray] | None:
    """The teacher columns of rows `local`, negatives as chosen for the student (None without teacher columns)."""
    names = set(table.column_names)
    out: dict[str, np.ndarray] = {}
    if TEACHER_QUERY in names and TEACHER_PASSAGE in names:
        out["q"] = _float_rows(table, TEACHER_QUERY, local)
        out["p"] = _float_rows(table, TEACHER_PASSAGE, local)
        if k and local_choice is not None and all(teacher_negative_column(int(c) + 1) in names
                                                  for c in np.unique(local_choice)):
            n = np.zeros((len(local), k, out["q"].shape[1]), np.float32)
            for c in np.unique(local_choice):
                where = np.argwhere(local_choice == c)
                n[where[:, 0], where[:, 1]] = _float_rows(table, teacher_negative_column(int(c) + 1), local[where[:, 0]])
            out["n"] = n
    if TEACHER_SCORES in names:
        scores = _float_rows(table, TEACHER_SCORES, local)
        picked = [scores[:, :1]]
        if k and local_choice is not None:
            picked.append(np.take_along_axis(scores[:, 1:], local_choice, axis=1))
        out["scores"] = np.concatenate(picked, axis=1)
    return out or None


@dataclass
class _Dataset:
    name: str
    task_type: str
    use_inbatch: bool
    table: object                  # pyarrow.Table: *_input_ids columns and query_prefix_length
    negative_columns: list[str]    # negative_1_input_ids .. negative_K_input_ids (all available)
    k: int                         # negatives used per row
    lengths: np.ndarray            # per row: query + passage tokens (the length-grouping key)
    train_rows: np.ndarray
    validation_rows: np.ndarray
    weight: float = DEFAULT_WEIGHT  # manifest weight: scales the dataset's batches per epoch
    spans: bool = False            # every text column has its <column>_prefix_length (a span strategy's data)


def _stable_id(name: str) -> int:
    """A per-dataset seed component that does not depend on Python's randomised str hash."""
    return zlib.crc32(name.encode("utf-8"))


def _list_lengths(column) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)


class MultiTaskBatcher:
    """Iterates one process's share of each step's single-dataset global batch; see module docstring.

    batch_size is per process (F2LLM's `train_batch_size`); a step consumes batch_size * num_processes rows of
    one dataset. `num_hard_neg` negatives are sampled per row (capped by what the dataset has; a task type
    may force its own number, e.g. classification: 1)."""

    def __init__(self, data_dir: str | Path, batch_size: int, num_hard_neg: int, seed: int = 42,
                 num_processes: int = 1, process_index: int = 0, validation_fraction: float = 0.01,
                 length_grouping: bool = True, drop_last: bool = True) -> None:
        from llm2emb.data.tokenize import read_prepared

        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        if num_hard_neg < 0:
            raise UserError(f"num_hard_neg must be 0 or more, got {num_hard_neg}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
        if not 0 <= validation_fraction < 1:
            raise UserError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
        self.data_dir = Path(data_dir)
        self.batch_size = int(batch_size)
        self.num_hard_neg = int(num_hard_neg)
        self.seed = int(seed)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        self.validation_fraction = float(validation_fraction)
        self.length_grouping = bool(length_grouping)
        self.drop_last = bool(drop_last)
        self.global_batch_size = self.batch_size * self.num_processes
        info = read_prepared(self.data_dir)
        from llm2emb.model.input_strategies import get_input_strategy

        strategy = get_input_strategy(info.get("input_strategy"), f"{self.data_dir}/prepare_info.json")
        self.datasets: list[_Dataset] = [self._load(name, info["manifest"][name], info["datasets"][name],
                                                    strategy.pool_last_copy, strategy.name)
                                         for name in sorted(info["datasets"])]
        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self.data_signature = self._signature()
        for ds in self.datasets:
            if self._epoch_batches(ds) == 0 and ds.weight > 0:
                logger.warning("dataset %s has %d training rows, fewer than one global batch of %d: it is not "
                               "used for training", ds.name, len(ds.train_rows), self.global_batch_size)

    # ------------------------------------------------------------------ loading
    def _load(self, name: str, entry: dict, path: Path, spans: bool = False, strategy: str = "plain") -> _Dataset:
        """One dataset; `spans`: its data was prepared for a strategy that pools a span of every text, so each
        text column must come with its span column (never silently pooled over the whole text)."""
        import pyarrow.parquet as pq

        from llm2emb.data.tokenize import prefix_column

        type_name = entry.get("type", "retrieval") if isinstance(entry, dict) else "retrieval"
        weight = check_weight(entry.get("weight", DEFAULT_WEIGHT) if isinstance(entry, dict) else DEFAULT_WEIGHT,
                              f"{self.data_dir}/manifest.json, dataset {name!r}: ")
        if type_name not in TASK_TYPES:
            raise UserError(f"{self.data_dir}/manifest.json gives dataset {name!r} the unknown type {type_name!r}; "
                            f"use one of: {', '.join(TASK_TYPES)}.")
        task = TASK_TYPES[type_name]
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise UserError(f"Cannot read {path} ({type(exc).__name__}: {exc}); prepare the data again.") from exc
        columns = set(table.column_names)
        for column in ("query_input_ids", "passage_input_ids"):
            if column not in columns:
                raise UserError(f"{path} has no {column!r} column; it is not prepared data, run `llm2emb prepare`.")
        negatives: list[str] = []
        while f"negative_{len(negatives) + 1}_input_ids" in columns:
            negatives.append(f"negative_{len(negatives) + 1}_input_ids")
        if spans:
            missing = [prefix_column(c) for c in ["query_input_ids", "passage_input_ids", *negatives]
                       if prefix_column(c) not in columns]
            if missing:
                raise UserError(f"{path} was prepared for input_strategy {strategy} without the {missing[0]!r} "
                                "column that says where each text's pooled span starts (an older llm2emb, format "
                                "1); prepare it again with `llm2emb prepare --overwrite`.")
        n = table.num_rows
        if n == 0:
            raise UserError(f"{path} has no rows; remove it from manifest.json or prepare it again.")
        want = task.forced_num_negatives if task.forced_num_negatives is not None else self.num_hard_neg
        k = min(want, len(negatives))
        if k < want and want > 0:
            logger.info("dataset %s has %d hard negatives per row; using %d (num_hard_neg=%d)", name,
                        len(negatives), k, want)
        lengths = _list_lengths(table.column("query_input_ids")) + _list_lengths(table.column("passage_input_ids"))
        n_val = math.ceil(n * self.validation_fraction) if self.validation_fraction > 0 else 0
        n_val = min(n_val, n - 1)
        perm = np.random.default_rng([self.seed, _stable_id(name)]).permutation(n)
        return _Dataset(name, type_name, task.use_inbatch, table, negatives, k, lengths,
                        np.sort(perm[n_val:]), np.sort(perm[:n_val]), weight, spans)

    def _signature(self) -> str:
        """Identifies the data and batch geometry a saved position refers to."""
        # a weight enters only when it is not 1, so positions saved before weights existed still resume
        parts = [f"{ds.name}:{ds.table.num_rows}:{len(ds.train_rows)}:{ds.k}"
                 + (f":w{ds.weight!r}" if ds.weight != DEFAULT_WEIGHT else "") for ds in self.datasets]
        parts += [str(self.global_batch_size), str(self.length_grouping), str(self.drop_last),
                  str(self.validation_fraction)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ planning
    def _num_batches(self, rows: int) -> int:
        full, rest = divmod(rows, self.global_batch_size)
        return full + (1 if not self.drop_last and rest >= self.num_processes else 0)

    def _epoch_batches(self, ds: _Dataset) -> int:
        """Global batches `ds` contributes to one epoch: its batches scaled by its weight."""
        full = self._num_batches(len(ds.train_rows))
        if ds.weight == DEFAULT_WEIGHT or full == 0:
            return full
        return 0 if ds.weight == 0 else max(1, round(ds.weight * full))

    def _dataset_batches(self, ds: _Dataset, epoch: int) -> list[np.ndarray]:
        g = self.global_batch_size
        wanted = self._epoch_batches(ds)
        batches: list[np.ndarray] = []
        repeat, pass_start = 0, 0
        while len(batches) < wanted:
            # pass 0 keeps the seed of unweighted data, so weight 1 plans exactly what it always did
            key = [self.seed, epoch, _stable_id(ds.name)] + ([repeat] if repeat else [])
            rows = np.random.default_rng(key).permutation(ds.train_rows)
            if self.length_grouping:
                chunk = g * LENGTH_GROUP_BATCHES
                for start in range(0, len(rows), chunk):
                    part = rows[start:start + chunk]
                    rows[start:start + chunk] = part[np.argsort(ds.lengths[part], kind="stable")]
            pass_start = len(batches)
            batches.extend(rows[i * g:(i + 1) * g] for i in range(self._num_batches(len(rows))))
            repeat += 1
        if len(batches) > wanted:
            # the last pass is cut to a random subset of its batches, not to its first ones: those hold the
            # shortest rows of a length-sorted chunk
            rng = np.random.default_rng([self.seed, epoch, _stable_id(ds.name), repeat, 1])
            keep = np.sort(rng.permutation(len(batches) - pass_start)[:wanted - pass_start])
            batches = batches[:pass_start] + [batches[pass_start + int(i)] for i in keep]
        return batches

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Every global batch of the epoch, in training order: (dataset index, row indices)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        batches = [(d, rows) for d, ds in enumerate(self.datasets) for rows in self._dataset_batches(ds, epoch)]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        plan = [batches[i] for i in order]
        self._plan_cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        """Optimizer steps in one epoch (the same on every process)."""
        return sum(self._epoch_batches(ds) for ds in self.datasets)

    def steps_per_dataset(self) -> dict[str, int]:
        return {ds.name: self._epoch_batches(ds) for ds in self.datasets}

    # ------------------------------------------------------------------ batches
    def _make_batch(self, ds: _Dataset, rows: np.ndarray, rng: np.random.Generator) -> TrainBatch:
        """This process's share of the global batch `rows`; negatives drawn for ALL rows first so the draw does
        not depend on the process."""
        import pyarrow as pa

        k, available = ds.k, len(ds.negative_columns)
        choice = None
        if k > 0:
            # a random k-subset of the available negative columns, per row
            choice = np.argsort(rng.random((len(rows), available)), axis=1)[:, :k]
        mine = slice(self.process_index, None, self.num_processes)
        local = rows[mine]
        index = pa.array(local)
        table = ds.table
        query = table.column("query_input_ids").take(index).to_pylist()
        passage = table.column("passage_input_ids").take(index).to_pylist()
        if "query_prefix_length" in table.column_names:
            prefix = table.column("query_prefix_length").take(index).to_pylist()
        else:
            prefix = [0] * len(local)
        from llm2emb.data.tokenize import prefix_column

        passage_prefix = table.column(prefix_column("passage")).take(index).to_pylist() if ds.spans else None
        negative_ids: list[list[int]] = []
        negative_prefix: list[int] | None = None
        if choice is not None:
            local_choice = choice[mine]
            flat: list[list[int] | None] = [None] * (len(local) * k)
            flat_prefix = [0] * (len(local) * k)
            for c in np.unique(local_choice):
                where = np.argwhere(local_choice == c)  # (row, slot) pairs that take column c
                rows_c = pa.array(local[where[:, 0]])
                values = table.column(ds.negative_columns[c]).take(rows_c).to_pylist()
                starts = (table.column(prefix_column(ds.negative_columns[c])).take(rows_c).to_pylist() if ds.spans
                          else [0] * len(values))
                for (r, s), ids, start in zip(where.tolist(), values, starts):
                    flat[r * k + s] = ids
                    flat_prefix[r * k + s] = start
            negative_ids = flat  # type: ignore[assignment]
            negative_prefix = flat_prefix if ds.spans else None
        teacher = _teacher_rows(table, local, choice[mine] if choice is not None else None, k)
        return TrainBatch(ds.name, ds.task_type, ds.use_inbatch, query, prefix, passage, negative_ids, k, teacher,
                          passage_prefix, negative_prefix)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a different order and different negatives for every epoch)."""
        self.epoch = int(epoch)
        self.position = 0

    def __iter__(self) -> Iterator[TrainBatch]:
        """This process's batches from the current position to the end of the epoch."""
        plan = self._plan(self.epoch)
        while self.position < len(plan):
            step = self.position
            d, rows = plan[step]
            rng = np.random.default_rng([self.seed, self.epoch, step, 1])
            batch = self._make_batch(self.datasets[d], rows, rng)
            self.position = step + 1  # counted before yielding: a state saved after this batch resumes after it
            yield batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-serialisable position: the epoch and the number of its steps already handed out."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_processes": self.num_processes,
                "data_signature": self.data_signature}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was saved; the data and batch settings must be the same."""
        for key in ("seed", "global_batch_size", "num_processes", "data_signature"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"The saved data position was made with {key}={state[key]!r} but this run has "
                                f"{getattr(self, key)!r}; the training data or batch settings changed since the "
                                "checkpoint, so it cannot resume exactly (start a new run or restore them).")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    # ------------------------------------------------------------------ validation
    def validation_batches(self) -> Iterator[TrainBatch]:
        """The held-out rows of every dataset (by name), in a fixed order with fixed negatives, as this
        process's shares of global batches; every process gets the same number of batches."""
        g = self.global_batch_size
        for ds in self.datasets:
            rows = ds.validation_rows[np.argsort(ds.lengths[ds.validation_rows], kind="stable")]
            rng = np.random.default_rng([self.seed, _stable_id(ds.name), 2])
            for start in range(0, len(rows), g):
                chunk = rows[start:start + g]
                if len(chunk) < self.num_processes:  # a process would get no row
                    continue
                yield self._make_batch(ds, chunk, rng)

    def num_validation_rows(self) -> int:
        return sum(len(ds.validation_rows) for ds in self.datasets)
