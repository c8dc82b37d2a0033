"""Paired statistics for comparing two recipes on the same evaluation items (queries or sentence pairs).

* `mean_std`: mean and sample standard deviation (ddof=1) of a metric over seeds.
* `paired_bootstrap_indices` / `paired_bootstrap` / `bootstrap_mean_difference` /
  `bootstrap_spearman_difference` / `paired_bootstrap_seeds`: the paired bootstrap over items (Efron &
  Tibshirani 1993, ch. 13 percentile interval; used for system comparison in NLP by Koehn 2004 and in IR by
  Sakai 2006). Each resample draws n item indices with replacement, the same indices for both recipes, and
  records statistic_a(items) - statistic_b(items). The interval is the (1 - confidence)/2 and
  (1 + confidence)/2 quantiles of those differences (numpy's default linear interpolation); `diff` is the
  difference on all items; a difference is `significant` when its interval excludes 0.
* `align` / `align_seeds`: per-query dicts of two recipes (`record["per_item"][metric]`) -> aligned arrays.

Resamples come from `numpy.random.default_rng(seed).integers(0, n, size=(n_resamples, n))`, drawn in row
chunks that continue the same stream (so the draws do not depend on the chunk size), which makes a result
a pure function of the data and `seed`.

Several seeds per recipe: items are resampled, seeds are not. For each resample, a recipe's statistic is the
mean over its seeds of the statistic of that seed on the resampled items (for "mean" this equals the mean of
the per-item seed averages, which is how it is computed). So the interval measures how much the
seed-averaged difference depends on the particular test items; seed-to-seed spread is reported separately
(`mean_std`). Averaging predictions over seeds before a Spearman would instead score an ensemble, which is
not what was trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from llm2emb.errors import UserError

#: per-item statistics `paired_bootstrap_seeds` knows: mean of per-item scores (retrieval queries), Spearman
#: of predictions vs a gold reference (STS, C-MTEB pairs), average precision of predictions vs 0/1 labels
Kind = Literal["mean", "spearman", "ap"]
KINDS: tuple[str, ...] = ("mean", "spearman", "ap")

# index-matrix elements per chunk (8 bytes each): bounds memory for large item sets, e.g. 2000 x 50k items
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BootstrapResult:
    """Paired-bootstrap comparison of recipe a against recipe b (a - b)."""

    diff: float          #: statistic(a) - statistic(b) on all items
    low: float           #: lower end of the percentile interval of the resampled differences
    high: float          #: upper end
    significant: bool    #: the interval excludes 0
    n: int               #: items compared
    n_resamples: int     #: resamples with a defined statistic (fewer than asked only when some were undefined)
    confidence: float

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "significant": self.significant,
                "n": self.n, "n_resamples": self.n_resamples, "confidence": self.confidence}


def mean_std(values: Sequence[float] | ArrayLike) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1) of `values`, e.g. a metric over seeds; the standard
    deviation of a single value is reported as 0.0 rather than undefined."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise UserError("mean_std needs at least one value.")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


# ----------------------------------------------------------------------------- the engine

def resample_indices(n_items: int, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The bootstrap draws, as (rows, n_items) index matrices whose rows concatenate to
    `default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))`."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n_items, 1))
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n_items, size=(min(rows, n_resamples - start), n_items))


def _check_settings(n_items: int, n_resamples: int, confidence: float) -> None:
    if n_items < 1:
        raise UserError("A paired bootstrap needs at least one item evaluated by both recipes.")
    if n_resamples < 1:
        raise UserError(f"n_resamples must be at least 1, got {n_resamples}.")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}.")


def _bootstrap(n_items: int, batch_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
               n_resamples: int, confidence: float, seed: int) -> BootstrapResult:
    """Run the paired bootstrap with `batch_fn(index matrix) -> (statistic_a per row, statistic_b per row)`."""
    _check_settings(n_items, n_resamples, confidence)
    full_a, full_b = batch_fn(np.arange(n_items)[None, :])
    diff = float(full_a[0] - full_b[0])
    deltas = np.concatenate([np.subtract(*batch_fn(idx)) for idx in resample_indices(n_items, n_resamples, seed)])
    # a statistic can be undefined on a resample (Spearman of a constant gold draw, AP without a positive);
    # such resamples carry no information about the difference, so they are left out and counted
    defined = deltas[~np.isnan(deltas)]
    if np.isnan(diff) or defined.size == 0:
        raise UserError("The compared statistic is undefined on these items (e.g. all gold scores or labels are "
                        "equal), so no confidence interval can be computed.")
    alpha = 1.0 - confidence
    low, high = (float(q) for q in np.quantile(defined, [alpha / 2, 1 - alpha / 2]))
    return BootstrapResult(diff=diff, low=low, high=high, significant=bool(low > 0 or high < 0), n=n_items,
                           n_resamples=int(defined.size), confidence=confidence)


def paired_bootstrap_indices(n_items: int, fn_a: Callable[[np.ndarray], float],
                             fn_b: Callable[[np.ndarray], float], *, n_resamples: int = 2000,
                             confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap (Efron & Tibshirani 1993; Koehn 2004) of any statistic: `fn_x(indices)` is recipe
    x's statistic on the items at `indices` (a 1-D int array, repeats allowed); both see the same draws.
    Calls each function once per resample; the wrappers below are vectorised."""
    def batch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([fn_a(row) for row in idx], dtype=np.float64),
                np.array([fn_b(row) for row in idx], dtype=np.float64))
    return _bootstrap(n_items, batch, n_resamples=n_resamples, confidence=confidence, seed=seed)


# ----------------------------------------------------------------------------- inputs

def _per_seed(values: Sequence[ArrayLike] | ArrayLike, side: str) -> np.ndarray:
    """(seeds, items) float matrix from one array or a list of per-seed arrays."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError as exc:  # ragged lists
        raise UserError(f"The per-seed scores of recipe {side} do not all have the same number of items.") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise UserError(f"Recipe {side} needs per-item scores of at least one seed.")
    if not np.isfinite(arr).all():
        raise UserError(f"The per-item scores of recipe {side} contain NaN or infinite values.")
    return arr


def _same_items(a: np.ndarray, b: np.ndarray, reference: np.ndarray | None) -> None:
    if a.shape[1] != b.shape[1] or (reference is not None and reference.shape[0] != a.shape[1]):
        sizes = f"{a.shape[1]} and {b.shape[1]}" + ("" if reference is None else f" (reference {reference.shape[0]})")
        raise UserError(f"Paired comparison needs scores on the same items, got {sizes} items; align them first.")


# ----------------------------------------------------------------------------- statistics per resample

def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `x` with the same row of `y` (NaN for a constant row)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))


def _spearman_rows(pred: np.ndarray, reference_ranks: np.ndarray) -> np.ndarray:
    """Spearman = Pearson of average ranks (ties, including resampled duplicates, share their mean rank),
    as `scipy.stats.spearmanr` computes it."""
    from scipy.stats import rankdata

    return _pearson_rows(rankdata(pred, axis=1), reference_ranks)


def _ap_rows(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision per row, as sklearn's `average_precision_score` (MTEB's pair classification)
    computes it: sum over distinct score thresholds of (recall gain) x precision, tied scores forming one
    threshold. Each positive contributes the precision at the end of its tie group / number of positives.
    NaN for a row without both classes."""
    order = np.argsort(-pred, axis=1, kind="stable")
    scores = np.take_along_axis(pred, order, axis=1)
    hits = np.take_along_axis(labels, order, axis=1)
    n = pred.shape[1]
    precision = np.cumsum(hits, axis=1) / np.arange(1, n + 1)
    group_end = np.ones_like(hits, dtype=bool)
    group_end[:, :-1] = scores[:, :-1] != scores[:, 1:]
    # for each position, the index of the last element of its tie group (next group end at or after it)
    end_index = np.minimum.accumulate(np.where(group_end, np.arange(n), n)[:, ::-1], axis=1)[:, ::-1]
    positives = hits.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (hits * np.take_along_axis(precision, end_index, axis=1)).sum(axis=1) / positives
    return np.where((positives > 0) & (positives < n), ap, np.nan)


def _batch_fn(kind: str, a: np.ndarray, b: np.ndarray, reference: np.ndarray | None
              ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """idx (rows, n) -> (seed-averaged statistic of a, of b) per row."""
    if kind == "mean":
        # the mean over seeds of per-seed means is the mean of the per-item seed averages (linearity)
        mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
        return lambda idx: (mean_a[idx].mean(axis=1), mean_b[idx].mean(axis=1))
    assert reference is not None
    if kind == "spearman":
        from scipy.stats import rankdata

        def spearman(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ranks = rankdata(reference[idx], axis=1)  # shared by every seed of both recipes
            return (np.mean([_spearman_rows(seed[idx], ranks) for seed in a], axis=0),
                    np.mean([_spearman_rows(seed[idx], ranks) for seed in b], axis=0))
        return spearman

    def ap(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = reference[idx]
        return (np.mean([_ap_rows(seed[idx], labels) for seed in a], axis=0),
                np.mean([_ap_rows(seed[idx], labels) for seed in b], axis=0))
    return ap


# ----------------------------------------------------------------------------- public wrappers

def paired_bootstrap_seeds(seeds_a: Sequence[ArrayLike] | ArrayLike, seeds_b: Sequence[ArrayLike] | ArrayLike,
                           kind: Kind = "mean", reference: ArrayLike | None = None, *, n_resamples: int = 2000,
                           confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap over items (Efron & Tibshirani 1993; Koehn 2004; Sakai 2006) of recipe a vs recipe b,
    each given as per-seed arrays aligned on the same items (the seed counts may differ).

    kind "mean": per-item scores (per-query nDCG@10 ...), statistic = their mean. kind "spearman": per-pair
    predictions (cosines), statistic = Spearman vs `reference` (gold scores, or 0/1 labels for C-MTEB's pair
    Spearman). kind "ap": per-pair predictions, statistic = average precision vs 0/1 labels `reference`
    (MTEB's cosine_ap; max_ap also looks at distances that per-item files do not keep). With several seeds
    the statistic is averaged over seeds on each resample (see the module docstring)."""
    if kind not in KINDS:
        raise UserError(f"Unknown statistic {kind!r}; use one of {', '.join(KINDS)}.")
    a, b = _per_seed(seeds_a, "a"), _per_seed(seeds_b, "b")
    ref: np.ndarray | None = None
    if kind != "mean":
        if reference is None:
            raise UserError(f"The {kind} statistic needs the gold scores or labels of the items as reference.")
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        if kind == "ap" and not np.isin(ref, (0.0, 1.0)).all():
            raise UserError("Average precision needs 0/1 labels as reference.")
    _same_items(a, b, ref)
    return _bootstrap(a.shape[1], _batch_fn(kind, a, b, ref), n_resamples=n_resamples, confidence=confidence,
                      seed=seed)


def paired_bootstrap(a: ArrayLike, b: ArrayLike, statistic: Literal["mean"] | Callable[[np.ndarray], float] = "mean",
                     *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap (Efron & Tibshirani 1993; Koehn 2004; Sakai 2006) of statistic(a) - statistic(b) for
    per-item scores `a`, `b` aligned on the same items (e.g. per-query nDCG@10 of a recipe and the baseline).
    "mean" is vectorised; a callable gets the resampled 1-D values and is called once per resample."""
    if not (isinstance(statistic, str) and statistic == "mean") and not callable(statistic):
        raise UserError(f"statistic must be 'mean' or a function of the resampled values, got {statistic!r}.")
    if np.ndim(a) != 1 or np.ndim(b) != 1:
        raise UserError("paired_bootstrap takes one 1-D array per recipe; use paired_bootstrap_seeds for seeds.")
    if isinstance(statistic, str):
        return paired_bootstrap_seeds(a, b, "mean", n_resamples=n_resamples, confidence=confidence, seed=seed)
    arr_a, arr_b = _per_seed(a, "a"), _per_seed(b, "b")
    _same_items(arr_a, arr_b, None)
    va, vb = arr_a[0], arr_b[0]
    return paired_bootstrap_indices(len(va), lambda idx: statistic(va[idx]), lambda idx: statistic(vb[idx]),
                                    n_resamples=n_resamples, confidence=confidence, seed=seed)


def bootstrap_mean_difference(a: ArrayLike, b: ArrayLike, *, n_resamples: int = 2000, confidence: float = 0.95,
                              seed: int = 0) -> BootstrapResult:
    """Paired bootstrap of mean(a) - mean(b) over aligned per-item scores (see `paired_bootstrap`)."""
    return paired_bootstrap(a, b, "mean", n_resamples=n_resamples, confidence=confidence, seed=seed)


def bootstrap_spearman_difference(pred_a: ArrayLike, pred_b: ArrayLike, gold: ArrayLike, *, n_resamples: int = 2000,
                                  confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap over pairs of Spearman(pred_a, gold) - Spearman(pred_b, gold) (STS main score)."""
    return paired_bootstrap_seeds([pred_a], [pred_b], "spearman", gold, n_resamples=n_resamples,
                                  confidence=confidence, seed=seed)


# ----------------------------------------------------------------------------- alignment of per-query dicts

def align_seeds(seeds_a: Sequence[Mapping[str, float]], seeds_b: Sequence[Mapping[str, float]]
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, a (seeds_a, n), b (seeds_b, n)) on the query ids every per-query dict has, sorted so the
    bootstrap draws do not depend on file order."""
    dicts = [*seeds_a, *seeds_b]
    if not seeds_a or not seeds_b:
        raise UserError("Aligning per-query scores needs at least one result of each recipe.")
    common = set(dicts[0]).intersection(*dicts[1:])
    if not common:
        raise UserError("The compared results share no query ids; evaluate every recipe with the same task, "
                        "--limits and --seed.")
    ids = sorted(common)
    return (ids, np.array([[d[q] for q in ids] for d in seeds_a], dtype=np.float64),
            np.array([[d[q] for q in ids] for d in seeds_b], dtype=np.float64))


def align(per_query_a: Mapping[str, float], per_query_b: Mapping[str, float]
          ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, a, b): the two recipes' per-query values on their common query ids (sorted)."""
    ids, a, b = align_seeds([per_query_a], [per_query_b])
    return ids, a[0], b[0]
