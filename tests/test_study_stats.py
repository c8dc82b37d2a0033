"""Paired bootstrap and seed statistics of `llm2emb study`: the vectorised results against explicit loops over
the same random draws, degenerate and clear-cut cases, determinism and input errors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from llm2emb.errors import UserError
from llm2emb.study import stats
from llm2emb.study.stats import (align, align_seeds, bootstrap_mean_difference, bootstrap_spearman_difference,
                                 mean_std, paired_bootstrap, paired_bootstrap_indices, paired_bootstrap_seeds)


def _loop_interval(deltas: list[float], confidence: float = 0.95) -> tuple[float, float]:
    alpha = 1 - confidence
    return tuple(float(x) for x in np.quantile(np.asarray(deltas), [alpha / 2, 1 - alpha / 2]))


def _draws(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


# ----------------------------------------------------------------------------- mean_std

def test_mean_std_is_sample_std():
    mean, std = mean_std([0.30, 0.32, 0.34])
    assert mean == pytest.approx(0.32)
    assert std == pytest.approx(0.02)  # ddof=1: sqrt((0.02^2 + 0 + 0.02^2) / 2); ddof=0 would be 0.0163
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(UserError, match="at least one value"):
        mean_std([])


# ----------------------------------------------------------------------------- against explicit loops

A = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.0, 0.6, 0.4, 1.0])
B = np.array([0.8, 0.2, 0.5, 0.4, 0.3, 0.6, 0.1, 0.6, 0.2, 0.9])


def test_mean_difference_equals_explicit_loop_exactly():
    n_resamples, seed = 500, 7
    deltas = [float(np.mean(A[row]) - np.mean(B[row])) for row in _draws(len(A), n_resamples, seed)]
    low, high = _loop_interval(deltas)
    res = bootstrap_mean_difference(A, B, n_resamples=n_resamples, seed=seed)
    assert res.diff == float(np.mean(A) - np.mean(B))
    assert (res.low, res.high) == (low, high)
    assert (res.n, res.n_resamples, res.confidence) == (10, 500, 0.95)
    assert res.significant == (low > 0 or high < 0)


def test_draws_do_not_depend_on_chunk_size(monkeypatch):
    full = bootstrap_mean_difference(A, B, n_resamples=301, seed=3)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 7 * len(A))  # 7 resamples per chunk, 43 chunks
    assert bootstrap_mean_difference(A, B, n_resamples=301, seed=3) == full


def test_generic_callable_and_indices_api_equal_explicit_loop():
    n_resamples, seed = 300, 1
    deltas = [float(np.median(A[row]) - np.median(B[row])) for row in _draws(len(A), n_resamples, seed)]
    res = paired_bootstrap(A, B, np.median, n_resamples=n_resamples, seed=seed)
    assert (res.low, res.high) == _loop_interval(deltas)
    assert res.diff == float(np.median(A) - np.median(B))
    same = paired_bootstrap_indices(len(A), lambda i: float(np.median(A[i])), lambda i: float(np.median(B[i])),
                                    n_resamples=n_resamples, seed=seed)
    assert same == res


def test_spearman_difference_equals_scipy_loop():
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, size=40), 1)  # rounded: ties in gold, like STS-B's 0.2 steps
    pred_a = gold + rng.normal(scale=1.0, size=40)
    pred_b = gold + rng.normal(scale=2.0, size=40)
    n_resamples, seed = 400, 11
    deltas = [spearmanr(pred_a[row], gold[row])[0] - spearmanr(pred_b[row], gold[row])[0]
              for row in _draws(40, n_resamples, seed)]
    res = bootstrap_spearman_difference(pred_a, pred_b, gold, n_resamples=n_resamples, seed=seed)
    assert res.diff == pytest.approx(spearmanr(pred_a, gold)[0] - spearmanr(pred_b, gold)[0], abs=1e-12)
    low, high = _loop_interval(deltas)
    assert res.low == pytest.approx(low, abs=1e-12) and res.high == pytest.approx(high, abs=1e-12)


def test_average_precision_difference_equals_sklearn_loop():
    rng = np.random.default_rng(5)
    labels = np.array([0, 1] * 15)
    pred_a = labels + rng.normal(scale=0.6, size=30)
    pred_b = np.round(labels + rng.normal(scale=1.5, size=30), 0)  # many ties: one threshold per tie group
    n_resamples, seed = 200, 2
    deltas = [average_precision_score(labels[row], pred_a[row]) - average_precision_score(labels[row], pred_b[row])
              for row in _draws(30, n_resamples, seed)]
    res = paired_bootstrap_seeds([pred_a], [pred_b], "ap", labels, n_resamples=n_resamples, seed=seed)
    assert res.diff == pytest.approx(average_precision_score(labels, pred_a) - average_precision_score(labels, pred_b),
                                     abs=1e-12)
    assert (res.low, res.high) == pytest.approx(_loop_interval(deltas), abs=1e-12)


def test_seeds_average_the_statistic_per_resample():
    rng = np.random.default_rng(3)
    gold = rng.uniform(0, 5, size=25)
    seeds_a = [gold + rng.normal(scale=1.0, size=25) for _ in range(3)]
    seeds_b = [gold + rng.normal(scale=1.5, size=25) for _ in range(2)]
    n_resamples, seed = 200, 4

    def rho(pred, row):
        return spearmanr(pred[row], gold[row])[0]
    deltas = [np.mean([rho(p, row) for p in seeds_a]) - np.mean([rho(p, row) for p in seeds_b])
              for row in _draws(25, n_resamples, seed)]
    res = paired_bootstrap_seeds(seeds_a, seeds_b, "spearman", gold, n_resamples=n_resamples, seed=seed)
    everything = np.arange(25)
    assert res.diff == pytest.approx(np.mean([rho(p, everything) for p in seeds_a])
                                     - np.mean([rho(p, everything) for p in seeds_b]), abs=1e-12)
    assert (res.low, res.high) == pytest.approx(_loop_interval(deltas), abs=1e-12)
    # mean kind: per-item seed averages, then the one-seed mean bootstrap
    mean_res = paired_bootstrap_seeds([A, B, A], [B], "mean", n_resamples=300, seed=9)
    assert mean_res == bootstrap_mean_difference((A + B + A) / 3, B, n_resamples=300, seed=9)


# ----------------------------------------------------------------------------- clear-cut cases

def test_identical_inputs_give_zero_interval():
    res = bootstrap_mean_difference(A, A.copy())
    assert (res.diff, res.low, res.high, res.significant) == (0.0, 0.0, 0.0, False)
    gold = np.arange(10.0)
    res = bootstrap_spearman_difference(A, A, gold)
    assert (res.diff, res.low, res.high, res.significant) == (0.0, 0.0, 0.0, False)


def test_clearly_better_recipe_is_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=200)
    better = bootstrap_mean_difference(base + 0.05 + rng.normal(scale=0.02, size=200), base)
    assert better.significant and better.low > 0 and better.diff == pytest.approx(0.05, abs=0.01)
    worse = bootstrap_mean_difference(base, base + 0.05)
    assert worse.significant and worse.high < 0
    noise = bootstrap_mean_difference(base + rng.normal(scale=0.01, size=200), base)  # mean shift ~0
    assert noise.low < 0 < noise.high and not noise.significant


def test_results_are_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=50), rng.uniform(size=50)
    assert bootstrap_mean_difference(a, b, seed=5) == bootstrap_mean_difference(a, b, seed=5)
    assert bootstrap_mean_difference(a, b, seed=5).low != bootstrap_mean_difference(a, b, seed=6).low


def test_wider_confidence_gives_wider_interval():
    narrow = bootstrap_mean_difference(A, B, confidence=0.5)
    wide = bootstrap_mean_difference(A, B, confidence=0.99)
    assert wide.low < narrow.low <= narrow.high < wide.high


# ----------------------------------------------------------------------------- alignment and input errors

def test_align_uses_common_ids_sorted():
    ids, a, b = align({"q2": 0.5, "q1": 1.0, "q9": 0.1}, {"q1": 0.0, "q2": 0.25, "q3": 0.7})
    assert ids == ["q1", "q2"]
    assert a.tolist() == [1.0, 0.5] and b.tolist() == [0.0, 0.25]
    ids, a, b = align_seeds([{"q1": 1.0, "q2": 0.0}, {"q2": 0.5, "q1": 0.5}], [{"q1": 0.2, "q2": 0.4}])
    assert ids == ["q1", "q2"] and a.shape == (2, 2) and b.shape == (1, 2)
    assert a[1].tolist() == [0.5, 0.5]


def test_align_without_common_ids_is_a_user_error():
    with pytest.raises(UserError, match="share no query ids"):
        align({"q1": 1.0}, {"q2": 1.0})


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_mean_difference(A, B[:5]), "same items"),
    (lambda: bootstrap_mean_difference([], []), "at least one item"),
    (lambda: bootstrap_mean_difference(A, B, confidence=95), "between 0 and 1"),
    (lambda: bootstrap_mean_difference(A, B, n_resamples=0), "at least 1"),
    (lambda: bootstrap_mean_difference(np.append(A, np.nan), np.append(B, 0.0)), "NaN"),
    (lambda: paired_bootstrap_seeds([A], [B], "spearman"), "reference"),
    (lambda: paired_bootstrap_seeds([A], [B], "ap", np.arange(10.0)), "0/1 labels"),
    (lambda: paired_bootstrap_seeds([A], [B], "median"), "Unknown statistic"),
    (lambda: paired_bootstrap_seeds([A, A[:3]], [B], "mean"), "same number of items"),
    (lambda: bootstrap_spearman_difference(A, B, np.ones(10)), "undefined"),
    (lambda: paired_bootstrap(np.stack([A, A]), B), "1-D"),
])
def test_bad_input_is_one_sentence(call, message):
    with pytest.raises(UserError, match=message):
        call()
