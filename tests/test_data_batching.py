"""MultiTaskBatcher: one dataset per step, task types, sharding across processes, exact resume, validation."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from llm2emb.data.batching import MultiTaskBatcher
from llm2emb.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(rng: random.Random, tag: str, lo: int, hi: int) -> str:
    return f"{tag} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    """Three tokenised datasets: retrieval (k=3), classification (k=2), pairs (k=0); unique query per row."""
    from llm2emb.data.tokenize import prepare

    rng = random.Random(0)
    raw = tmp_path_factory.mktemp("raw")
    retr = {"query": [_text(rng, f"r{i}", 1, 6) for i in range(150)],
            "passage": [_text(rng, f"p{i}", 2, 40) for i in range(150)]}
    for j in range(1, 4):
        retr[f"negative_{j}"] = [_text(rng, f"n{i}x{j}", 2, 40) for i in range(150)]
    pd.DataFrame(retr).to_parquet(raw / "retr.parquet")
    pd.DataFrame({"query": [_text(rng, f"c{i}", 1, 5) for i in range(70)],
                  "passage": [["positive label", "negative label"][i % 2] for i in range(70)],
                  "negative_1": [["negative label", "positive label"][i % 2] for i in range(70)],
                  "negative_2": ["neutral label"] * 70}).to_parquet(raw / "cls.parquet")
    pd.DataFrame({"query": [_text(rng, f"s{i}", 1, 5) for i in range(60)],
                  "passage": [_text(rng, f"t{i}", 1, 5) for i in range(60)]}).to_parquet(raw / "pairs.parquet")
    (raw / "manifest.json").write_text(json.dumps({"cls": {"type": "classification"}, "pairs": {"type": "pairs"}}))
    out = tmp_path_factory.mktemp("tok")
    prepare(str(smollm2_dir), raw, out, max_seq_length=64, workers=1, progress=False)
    return out


def _key(batch) -> list[tuple]:
    return [tuple(q) for q in batch.query_ids]


def test_epoch_plan_one_dataset_per_step(prepared):
    b = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=2, seed=1)
    per_dataset = b.steps_per_dataset()
    # 1% validation (ceil) then floor(train / 8) full batches each
    assert per_dataset == {"cls": 69 // 8, "pairs": 59 // 8, "retr": 148 // 8}
    assert len(b) == sum(per_dataset.values())
    batches = list(b)
    assert len(batches) == len(b)
    seen_per_dataset: dict[str, int] = {}
    rows_seen: set[tuple] = set()
    for batch in batches:
        seen_per_dataset[batch.dataset] = seen_per_dataset.get(batch.dataset, 0) + 1
        assert len(batch.query_ids) == len(batch.passage_ids) == len(batch.query_prefix_lengths) == 8
        expected = {"retr": ("retrieval", True, 2), "cls": ("classification", False, 1), "pairs": ("pairs", True, 0)}
        assert (batch.task_type, batch.use_inbatch, batch.num_negatives) == expected[batch.dataset]
        assert len(batch.negative_ids) == 8 * batch.num_negatives
        keys = _key(batch)
        assert not rows_seen.intersection(keys)  # a row at most once per epoch
        rows_seen.update(keys)
    assert seen_per_dataset == per_dataset
    # the datasets are interleaved, not one after the other
    names = [x.dataset for x in batches]
    assert names != sorted(names)
    # validation rows never appear in training
    val_keys = {k for batch in b.validation_batches() for k in _key(batch)}
    assert val_keys and not val_keys & rows_seen


def test_negatives_come_from_the_rows_own_columns(prepared):
    import pyarrow.parquet as pq

    table = pq.read_table(prepared / "retr.parquet").to_pydict()
    negs_of = {tuple(q): {tuple(table[f"negative_{j}_input_ids"][i]) for j in (1, 2, 3)}
               for i, q in enumerate(table["query_input_ids"])}
    pos_of = {tuple(q): tuple(p) for q, p in zip(table["query_input_ids"], table["passage_input_ids"])}
    b = MultiTaskBatcher(prepared, batch_size=4, num_hard_neg=3, seed=3)
    checked = 0
    for batch in b:
        if batch.dataset != "retr":
            continue
        k = batch.num_negatives
        assert k == 3
        for i, q in enumerate(batch.query_ids):
            own = [tuple(x) for x in batch.negative_ids[i * k:(i + 1) * k]]
            assert set(own) == negs_of[tuple(q)]  # all 3 of its own, each once
            assert tuple(batch.passage_ids[i]) == pos_of[tuple(q)]
            checked += 1
    assert checked > 100


def test_every_sequence_ends_with_eos_and_fits(prepared):
    from llm2emb.data.tokenize import read_prepared

    info = read_prepared(prepared)
    b = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=3)
    for batch in list(b) + list(b.validation_batches()):
        for ids in batch.query_ids + batch.passage_ids + batch.negative_ids:
            assert ids[-1] == info["eos_token_id"] and len(ids) <= info["max_seq_length"]


def test_exact_restore_mid_epoch_and_at_epoch_end(prepared):
    kwargs = dict(batch_size=4, num_hard_neg=2, seed=7)
    a = MultiTaskBatcher(prepared, **kwargs)
    a.set_epoch(1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON (checkpoint files)
    rest = list(it)
    b = MultiTaskBatcher(prepared, **kwargs)
    b.load_state_dict(state)
    assert list(b) == rest
    # a state saved after the last batch of an epoch resumes with nothing left in that epoch
    end_state = b.state_dict()
    c = MultiTaskBatcher(prepared, **kwargs)
    c.load_state_dict(end_state)
    assert list(c) == []
    c.set_epoch(2)
    a.set_epoch(2)
    assert list(c) == list(a)


def test_epochs_differ_and_seed_matters(prepared):
    a = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=1, seed=0)
    first = [_key(x) for x in a]
    a.set_epoch(1)
    second = [_key(x) for x in a]
    assert first != second
    again = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=1, seed=0)
    assert [_key(x) for x in again] == first
    other = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=1, seed=1)
    assert [_key(x) for x in other] != first


def test_processes_share_each_global_batch(prepared):
    """Two processes see the same dataset at every step, disjoint rows, and together exactly the rows (and
    negatives) one process with the same global batch gets."""
    single = list(MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=2, seed=5))
    shards = [list(MultiTaskBatcher(prepared, batch_size=4, num_hard_neg=2, seed=5, num_processes=2,
                                    process_index=p)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for whole, p0, p1 in zip(single, *shards):
        assert whole.dataset == p0.dataset == p1.dataset
        assert len(p0.query_ids) == len(p1.query_ids) == 4
        assert not set(_key(p0)) & set(_key(p1))
        k = whole.num_negatives

        def rows(b):
            return {tuple(q): (tuple(b.passage_ids[i]), tuple(map(tuple, b.negative_ids[i * k:(i + 1) * k])))
                    for i, q in enumerate(b.query_ids)}
        assert {**rows(p0), **rows(p1)} == rows(whole)
    # validation: same number of batches on every process, together all held-out rows (a chunk of one row
    # cannot be shared by two processes and is left out)
    v0, v1 = (list(MultiTaskBatcher(prepared, batch_size=4, num_hard_neg=2, seed=5, num_processes=2,
                                    process_index=p).validation_batches()) for p in (0, 1))
    vs = list(MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=2, seed=5).validation_batches())
    assert [x.dataset for x in v0] == [x.dataset for x in v1]
    assert {k for x in v0 + v1 for k in _key(x)} == {k for x in vs if len(x) >= 2 for k in _key(x)}
    assert any(len(x) >= 2 for x in vs)


def test_length_grouping_cuts_padding(prepared):
    def padding(batcher) -> int:
        waste = 0
        for batch in batcher:
            for side in (batch.query_ids, batch.passage_ids):
                longest = max(map(len, side))
                waste += sum(longest - len(x) for x in side)
        return waste

    grouped = padding(MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=0, length_grouping=True))
    plain = padding(MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=0, length_grouping=False))
    assert grouped < 0.7 * plain


def test_drop_last_false_keeps_partial_batches(prepared):
    b = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=0, drop_last=False)
    sizes: dict[str, int] = {}
    for batch in b:
        sizes[batch.dataset] = sizes.get(batch.dataset, 0) + len(batch.query_ids)
    assert sizes == {"retr": 148, "cls": 69, "pairs": 59}  # every training row once


def test_resume_refuses_changed_settings(prepared):
    a = MultiTaskBatcher(prepared, batch_size=8, num_hard_neg=1)
    state = a.state_dict()
    with pytest.raises(UserError, match="global_batch_size"):
        MultiTaskBatcher(prepared, batch_size=4, num_hard_neg=1).load_state_dict(state)


def test_not_prepared_folder_is_a_user_error(tmp_path):
    pd.DataFrame({"query": ["a"], "passage": ["b"]}).to_parquet(tmp_path / "raw.parquet")
    with pytest.raises(UserError, match="llm2emb prepare"):
        MultiTaskBatcher(tmp_path, batch_size=2, num_hard_neg=0)
