"""Per-dataset manifest weights (so synthetic and real data mix in chosen shares): parsing, prepare passes
them through, and MultiTaskBatcher scales each dataset's batches per epoch by its weight."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pandas as pd
import pytest

from llm2emb.data.batching import MultiTaskBatcher
from llm2emb.data.manifest import DatasetSpec, parse_manifest, resolve_manifest
from llm2emb.errors import UserError


def test_manifest_weight_is_parsed_and_checked():
    specs = resolve_manifest(parse_manifest({"a": {"weight": 0.5}, "b": {"type": "pairs"}}, "m.json"), ["a", "b"])
    assert specs["a"].weight == 0.5 and specs["b"].weight == 1.0
    assert specs["a"].to_dict() == {"type": "retrieval", "instruction": "", "weight": 0.5}
    # the default weight is left out: manifests and prepare's change keys of unweighted data stay as they were
    assert specs["b"].to_dict() == {"type": "pairs", "instruction": ""}
    assert DatasetSpec(**specs["a"].to_dict()) == specs["a"]
    for bad in (-1, "2", True, float("inf")):
        with pytest.raises(UserError, match=r"m\.json, dataset 'a': 'weight' must be a number >= 0"):
            parse_manifest({"a": {"weight": bad}}, "m.json")
    with pytest.raises(UserError, match="'type', 'instruction' and 'weight'.*Did you mean 'weight'"):
        parse_manifest({"a": {"wieght": 2}}, "m.json")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    for name, n in (("real", 160), ("synth", 80)):
        pd.DataFrame({"query": [f"{name} query {i}" for i in range(n)],
                      "passage": [f"{name} passage {i} " + "word " * (i % 7) for i in range(n)]}
                     ).to_parquet(folder / f"{name}.parquet")
    return folder


def _prepared(raw, tmp_path, smollm2_dir, manifest):
    from llm2emb.data.tokenize import prepare

    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    if manifest is not None:
        (src / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "tok"
    prepare(str(smollm2_dir), src, out, max_seq_length=32, workers=1, progress=False)
    return out


def _plan(batcher):
    return [(b.dataset, tuple(map(tuple, b.query_ids))) for b in batcher]


def test_weights_scale_each_datasets_batches(raw, tmp_path, smollm2_dir):
    plain = _prepared(raw, tmp_path / "plain", smollm2_dir, None)
    weighted = _prepared(raw, tmp_path / "w", smollm2_dir, {"synth": {"weight": 2.5}, "real": {"weight": 0.5}})
    assert json.loads((weighted / "manifest.json").read_text())["synth"]["weight"] == 2.5
    kwargs = dict(batch_size=8, num_hard_neg=0, seed=3, validation_fraction=0.0)
    base = MultiTaskBatcher(plain, **kwargs)
    assert base.steps_per_dataset() == {"real": 20, "synth": 10}
    b = MultiTaskBatcher(weighted, **kwargs)
    assert b.steps_per_dataset() == {"real": 10, "synth": 25} and len(b) == 35
    plan = _plan(b)
    assert Counter(d for d, _ in plan) == {"real": 10, "synth": 25}
    synth_rows = Counter(row for d, rows in plan if d == "synth" for row in rows)
    assert len(synth_rows) == 80                                   # every synthetic row used ...
    assert sorted(Counter(synth_rows.values()).items()) == [(2, 40), (3, 40)]  # ... 2-3 times, never 4
    real_rows = Counter(row for d, rows in plan if d == "real" for row in rows)
    assert len(real_rows) == 80 and set(real_rows.values()) == {1}  # half the real rows, none twice
    # the down-weighted half is a random subset, not the shortest rows of each length-sorted chunk
    real_lengths = [len(r) for r in real_rows]
    all_lengths = [len(r) for d, rows in _plan(base) if d == "real" for r in rows]
    assert max(real_lengths) == max(all_lengths)
    # resuming with other weights is refused (a saved position refers to a different plan)
    with pytest.raises(UserError, match="data_signature"):
        base.load_state_dict(b.state_dict())


def test_weight_one_plans_exactly_what_unweighted_data_plans(raw, tmp_path, smollm2_dir):
    plain = _prepared(raw, tmp_path / "plain", smollm2_dir, None)
    ones = _prepared(raw, tmp_path / "ones", smollm2_dir, {"synth": {"weight": 1}, "real": {"weight": 1.0}})
    kwargs = dict(batch_size=8, num_hard_neg=0, seed=5, validation_fraction=0.0)
    a, b = MultiTaskBatcher(plain, **kwargs), MultiTaskBatcher(ones, **kwargs)
    assert _plan(a) == _plan(b) and a.data_signature == b.data_signature


def test_weight_zero_leaves_a_dataset_out(raw, tmp_path, smollm2_dir):
    out = _prepared(raw, tmp_path, smollm2_dir, {"synth": {"weight": 0}})
    b = MultiTaskBatcher(out, batch_size=8, num_hard_neg=0, seed=1, validation_fraction=0.0)
    assert b.steps_per_dataset() == {"real": 20, "synth": 0}
    assert {x.dataset for x in b} == {"real"}
