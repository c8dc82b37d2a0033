"""Teacher data for the distillation losses: teacher columns added to prepared data, carried by the batcher
with the negatives the student got, resumed per dataset, and training with the distillation losses."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llm2emb.errors import UserError
# ------------------------------------------------------------------------------------------ teacher data

@pytest.fixture(scope="module")
def teacher_data(tiny_model, tmp_path_factory):
    """Prepared tiny data with teacher columns from a second (differently pooled) tiny model."""
    from test_train_support import prepare_data, write_raw_data

    from llm2emb.model.embedder import Embedder
    from llm2emb.pipeline.teacher import add_teacher_columns

    root = tmp_path_factory.mktemp("teacher")
    raw = write_raw_data(root / "raw", retrieval_rows=24, classification_rows=12, k=3)
    prepared = prepare_data(tiny_model, raw, root / "prepared")
    teacher = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    result = add_teacher_columns(prepared, raw, str(tiny_model), embedder=teacher)
    return raw, prepared, teacher, result


def test_teacher_columns_follow_the_rows(teacher_data):
    import pyarrow.parquet as pq

    raw, prepared, teacher, result = teacher_data
    assert sorted(result["done"]) == ["facts", "labels"] and result["dim"] == 64
    table = pq.read_table(prepared / "facts.parquet")
    frame = pd_read(raw / "facts.parquet")
    row = 5
    want = teacher.encode(["Instruct: find the module.\nQuery: " + frame["query"][row], frame["passage"][row],
                           frame["negative_2"][row]])
    got = [table.column(c)[row].as_py() for c in ("teacher_query", "teacher_passage", "teacher_negative_2")]
    np.testing.assert_allclose(np.array(got), want, atol=1e-6)


def test_batches_carry_the_teacher_view_of_their_rows(teacher_data):
    import pyarrow.parquet as pq

    from llm2emb.data.batching import MultiTaskBatcher

    raw, prepared, teacher, _ = teacher_data
    table = pq.read_table(prepared / "facts.parquet").to_pydict()
    index = {(tuple(q), tuple(p)): r for r, (q, p) in enumerate(zip(table["query_input_ids"],
                                                                      table["passage_input_ids"]))}
    batcher = MultiTaskBatcher(prepared, batch_size=4, num_hard_neg=2, seed=3, validation_fraction=0.0)
    checked = 0
    for batch in batcher:
        if batch.dataset != "facts":
            continue
        k = batch.num_negatives
        assert batch.teacher["q"].shape == (len(batch), 64) and batch.teacher["n"].shape == (len(batch), k, 64)
        for i in range(len(batch)):
            r = index[(tuple(batch.query_ids[i]), tuple(batch.passage_ids[i]))]
            np.testing.assert_array_equal(batch.teacher["q"][i], np.float32(table["teacher_query"][r]))
            for s in range(k):
                ids = batch.negative_ids[i * k + s]
                j = next(j for j in range(1, 4) if table[f"negative_{j}_input_ids"][r] == ids)
                np.testing.assert_array_equal(batch.teacher["n"][i, s], np.float32(table[f"teacher_negative_{j}"][r]))
                checked += 1
    assert checked >= 8


def test_teacher_resume_and_changed_raw_data(teacher_data, tiny_model, tmp_path):
    import shutil

    import pandas as pd

    from llm2emb.pipeline.teacher import add_teacher_columns

    raw, prepared, teacher, _ = teacher_data
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    first = add_teacher_columns(copy, raw, str(tiny_model), embedder=teacher)
    again = add_teacher_columns(copy, raw, str(tiny_model), embedder=teacher)
    assert sorted(again["skipped"]) == ["facts", "labels"] and not again["done"], first
    other = add_teacher_columns(copy, raw, "another-teacher", embedder=teacher)     # another teacher: redone
    assert sorted(other["done"]) == ["facts", "labels"]
    changed = tmp_path / "raw"
    shutil.copytree(raw, changed)
    frame = pd.read_parquet(changed / "facts.parquet")
    frame.iloc[:10].to_parquet(changed / "facts.parquet")
    with pytest.raises(UserError, match="'facts' has 10 rows in .* but 24 in"):
        add_teacher_columns(copy, changed, str(tiny_model), embedder=teacher, overwrite=True)


def pd_read(path):
    import pandas as pd

    return pd.read_parquet(path)


@pytest.mark.usefixtures("one_torch_thread")
def test_training_with_distillation_losses(teacher_data, tiny_model, tmp_path):
    from test_train_support import quick_overrides, read_metrics

    from llm2emb.config import load_train_config
    from llm2emb.train import train

    _, prepared, _, _ = teacher_data
    losses = ('losses=[{"name": "contrastive"}, {"name": "distill_kl", "weight": 0.5}, '
              '{"name": "margin_mse"}, {"name": "embedding_mse"}]')
    cfg = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path, steps=3) + [losses])
    train(cfg, show_progress=False)
    train_rows = [m for m in read_metrics(cfg.run_dir) if m.get("type") == "train"]
    assert train_rows and all(math.isfinite(m["distill_kl"]) and "embedding_mse" in m for m in train_rows)
    # data without teacher columns: one sentence naming the fix
    plain = tmp_path / "plain"
    from test_train_support import prepare_data, write_raw_data

    prepare_data(tiny_model, write_raw_data(tmp_path / "raw2", 16, 8), plain)
    cfg = load_train_config(None, quick_overrides(tiny_model, plain, tmp_path, experiment="plain", steps=1)
                            + ['losses=[{"name": "distill_kl"}]'])
    with pytest.raises(UserError, match="needs teacher embeddings or scores.*no teacher columns"):
        train(cfg, show_progress=False)


def test_on_the_fly_teacher_trains_as_the_precomputed_columns_do(teacher_data, tiny_model, tmp_path):
    """teacher_model embeds the batch's decoded texts at every step: the same teacher vectors as the columns
    computed once, so the run (losses at every step, validation, final weights) is the same; data that has
    columns and a teacher_model as well is refused."""
    import torch
    from test_train_support import prepare_data, quick_overrides, read_metrics, trainable_state

    from llm2emb.config import load_train_config
    from llm2emb.pipeline.teacher import add_teacher_columns
    from llm2emb.train import train

    raw, _, teacher, _ = teacher_data
    folder = tmp_path / "teacher"
    teacher.save(folder)
    with_columns = prepare_data(tiny_model, raw, tmp_path / "columns")
    add_teacher_columns(with_columns, raw, str(folder))
    plain = prepare_data(tiny_model, raw, tmp_path / "plain")
    losses = ('losses=[{"name": "contrastive"}, {"name": "distill_kl", "weight": 0.5}, '
              '{"name": "margin_mse"}, {"name": "embedding_mse"}]')
    runs = {}
    for name, data, extra in (("columns", with_columns, []), ("fly", plain, [f"teacher_model={folder}"])):
        cfg = load_train_config(None, quick_overrides(tiny_model, data, tmp_path, experiment=name, steps=4)
                                + [losses] + extra)
        train(cfg, show_progress=False)
        runs[name] = (read_metrics(cfg.run_dir), trainable_state(cfg.run_dir / "final"))
    (m_cols, w_cols), (m_fly, w_fly) = runs["columns"], runs["fly"]
    m_cols, m_fly = ([m for m in ms if m["type"] in ("train", "validation")] for ms in (m_cols, m_fly))
    assert [m["type"] for m in m_cols] == [m["type"] for m in m_fly] and len(m_cols) >= 5
    for a, b in zip(m_cols, m_fly):
        for key in ("loss", "distill_kl", "margin_mse", "embedding_mse"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["type"], a["step"], key)
    assert all(torch.allclose(w_cols[k], w_fly[k], atol=1e-5) for k in w_cols)

    cfg = load_train_config(None, quick_overrides(tiny_model, with_columns, tmp_path, experiment="both", steps=1)
                            + [losses, f"teacher_model={folder}"])
    with pytest.raises(UserError, match="has teacher_\\* columns and teacher_model is set"):
        train(cfg, show_progress=False)


def test_teachers_get_the_instruction_apart_from_the_query(tiny_model, teacher_data, tmp_path):
    """A skip-instruction teacher must not pool over the instruction: the teacher columns and the on-the-fly
    teacher hand encode() the instruction separately, as evaluation does."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq
    from test_train_support import prepare_data

    from llm2emb.model.embedder import Embedder
    from llm2emb.pipeline.teacher import add_teacher_columns
    from llm2emb.train.teacher import OnTheFlyTeacher

    raw, _, _, _ = teacher_data
    teacher = Embedder.from_pretrained(str(tiny_model), pooling="mean", skip_instruction=True)
    instruction = "Instruct: find the module.\nQuery: "
    frame = pd_read(raw / "facts.parquet")
    queries = [frame["query"][row] for row in (0, 3)]
    want = teacher.encode(queries, instruction=instruction)
    assert not np.allclose(want, teacher.encode([instruction + q for q in queries]), atol=1e-4)

    prepared = prepare_data(tiny_model, raw, tmp_path / "prepared")
    add_teacher_columns(prepared, raw, "skip-teacher", embedder=teacher)
    table = pq.read_table(prepared / "facts.parquet")
    got = np.array([table.column("teacher_query")[row].as_py() for row in (0, 3)])
    np.testing.assert_allclose(got, want, atol=1e-5)

    folder = tmp_path / "teacher"
    teacher.save(folder)
    fly = OnTheFlyTeacher(str(folder), teacher.tokenizer, dataset_instructions={"facts": instruction})
    ids = [list(map(int, table.column("query_input_ids")[row].as_py())) for row in (0, 3)]
    passages = [list(map(int, table.column("passage_input_ids")[row].as_py())) for row in (0, 3)]
    batch = SimpleNamespace(dataset="facts", query_ids=ids, query_prefix_lengths=[0, 0], passage_ids=passages,
                            negative_ids=[], num_negatives=0)
    # the on-the-fly teacher encodes in the commands' default precision (auto), as evaluation does
    want_auto = teacher.encode(queries, instruction=instruction, precision="auto")
    np.testing.assert_allclose(fly(batch).q.numpy(), want_auto, atol=1e-5)
