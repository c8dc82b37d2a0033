"""Training multi-vector, sparse and hybrid representations: config validation (one sentence per error), short
CPU runs whose final/ loads back with its representation and trained weights, and an exact resume of a hybrid
LoRA + bidirectional + self-distillation run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from test_train_support import (prepare_data, quick_overrides, read_metrics, rewind_to_checkpoint, trainable_state,
                                write_raw_data)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["model_path=m", "experiment_id=e", "train_data_path=d"]


@pytest.mark.parametrize("overrides, match", [
    (["representation=multi_vector", "mrl_enabled=true", "mrl_dims=16"], "Matryoshka dimensions"),
    (["representation=sparse", "losses=[{\"name\": \"contrastive\", \"mrl_dims\": [8]}]"], "Matryoshka"),
    (["representation=multi_vector", "token_dim=0"], "token_dim must be an integer >= 1"),
    (["representation=hybrid", "hybrid_heads=dense,sparse", "hybrid_weights=1,0.3,1"], "one weight per head"),
    (["representation=hybrid", "hybrid_heads=dense,colbert"], "hybrid_heads must list"),
    (["representation=sparse", "hybrid_self_distill=true"], "needs representation hybrid"),
    (["representation=multi_vector", "losses=[{\"name\": \"contrastive\"}]"], "scores the dense head"),
    (["representation=sparse", "flops_doc_weight=-1"], "flops_doc_weight"),
    (["representation=sparce"], "Did you mean 'sparse'"),
    (["representation=multi_vector", "head=linear"], "field 'head'"),
    (["representation=hybrid", "hybrid_heads=sparse,multi_vector", "hybrid_weights=1,1",
      "pooling_mode=attention"], "trainable weights"),
])
def test_bad_representation_settings_are_one_sentence_user_errors(overrides, match):
    with pytest.raises(UserError, match=match) as info:
        load_train_config(None, BASE + overrides)
    assert str(info.value).count(". ") <= 1 or "Did you mean" in str(info.value)


def test_hybrid_with_mrl_on_its_dense_head_is_accepted():
    cfg = load_train_config(None, BASE + ["representation=hybrid", "mrl_enabled=true", "mrl_dims=16"])
    assert cfg.representation == "hybrid"


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


def _train(cfg):
    from llm2emb.train import train

    return train(cfg, show_progress=False)


@pytest.mark.parametrize("representation", ["multi_vector", "sparse"])
def test_short_run_trains_saves_and_reloads(tiny_model, prepared, tmp_path, representation):
    from llm2emb.model.embedder import Embedder
    from llm2emb.model.representations.encoding import encode_heads

    cfg = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path, steps=3, validation_steps=0,
                                                  checkpointing_steps=0, representation=representation,
                                                  token_dim=16))
    result = _train(cfg)
    names = {"multi_vector": "maxsim", "sparse": "sparse_contrastive"}
    train_lines = [m for m in read_metrics(cfg.run_dir) if m["type"] == "train"]
    assert all(names[representation] in m for m in train_lines)
    if representation == "sparse":
        assert all("flops" in m and "flops/query" in m for m in train_lines)
    final = Embedder.from_pretrained(result.final_dir)
    start = Embedder.from_pretrained(tiny_model, representation=representation, max_length=32,
                                     representation_options={"token_dim": 16})
    texts = ["how are lists sorted?", "sorting lists is done by the list sorting module"]
    a, b = encode_heads(final, texts), encode_heads(start, texts)
    if representation == "multi_vector":
        assert final.representation.options.token_dim == 16
        assert a.multi_vector.vectors.shape[1] == 16
        assert np.abs(a.multi_vector.vectors - b.multi_vector.vectors).max() > 1e-4  # trained
    else:
        assert np.abs(a.sparse.toarray() - b.sparse.toarray()).max() > 1e-4


def test_hybrid_lora_bidirectional_self_distill_resumes_exactly(tiny_model, prepared, tmp_path):
    extra = dict(steps=4, checkpointing_steps=2, validation_steps=0, representation="hybrid",
                 hybrid_self_distill=True, lora_enabled=True, bi_attn_enabled=True, pooling_mode="mean",
                 token_dim=8, hybrid_weights=[1.0, 0.2, 0.5])
    full = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path / "a", **extra))
    _train(full)
    crashed = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path / "b", **extra))
    _train(crashed)
    run = crashed.run_dir
    rewind_to_checkpoint(run, 4)  # killed after the step-2 checkpoint
    from llm2emb.train import train

    result = train(crashed, show_progress=False)
    assert result.resumed_from == 2
    a, b = trainable_state(full.run_dir / "final"), trainable_state(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("representation.parts.multi_vector.projection" in k for k in a)  # trained head is saved
    assert any("lora_A" in k for k in a)
    metrics = [m for m in read_metrics(run) if m["type"] == "train"]
    assert all("self_distill" in m and "maxsim" in m and "contrastive" in m for m in metrics)
