"""Summary-token pooling (`pooling_mode: cls`, llm2emb.model.summary_token) on tiny random models: the pooled
position for both padding sides, the token inserted once by the one tokenisation rule (prepare and encode
agree), its new embedding row trained under LoRA and full fine-tuning, saved, reloaded, resumed and merged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from test_train_support import prepare_data, quick_overrides, rewind_to_checkpoint, trainable_state, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "<|embed|>"
TEXTS = ["sorting lists is done by the list sorting module", "hashing files", "a much longer text " * 6]


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    return write_raw_data(tmp_path_factory.mktemp("raw"), retrieval_rows=24, classification_rows=8)


def _prepared(tiny_model, raw_data, folder: Path, position: str) -> Path:
    from llm2emb.data.tokenize import prepare

    prepare(str(tiny_model), raw_data, folder, max_seq_length=48, workers=1, progress=False,
            summary_token=TOKEN, summary_token_position=position)
    return folder


@pytest.fixture(scope="module")
def prepared_end(tiny_model, raw_data, tmp_path_factory) -> Path:
    return _prepared(tiny_model, raw_data, tmp_path_factory.mktemp("tok-end"), "end")


def _cls(tiny_model, bidirectional: bool = False, **kw):
    from llm2emb import Embedder

    return Embedder.from_pretrained(tiny_model, pooling="cls", bidirectional=bidirectional, **kw)


def _cfg(tiny_model, data, tmp_path, **extra):
    values = dict(steps=4, pooling_mode="cls", lora_dropout=0.0, learning_rate=5e-3)
    values.update(extra)
    return load_train_config(None, quick_overrides(tiny_model, data, tmp_path, **values))


def _train(cfg):
    from llm2emb.train.trainer import Trainer

    trainer = Trainer(cfg, show_progress=False)
    return trainer, trainer.train()


@pytest.mark.parametrize("index", [0, 2, -1])
def test_pooling_picks_the_summary_position_for_both_padding_sides(index):
    from llm2emb.model.pooling import build_pooling

    torch.manual_seed(0)
    lengths = [5, 3, 4]
    hidden = torch.randn(3, 5, 8)
    right = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    left = right.flip(1)
    hidden_left = torch.zeros_like(hidden)
    for i, n in enumerate(lengths):
        hidden_left[i, 5 - n:] = hidden[i, :n]
    pool = build_pooling("cls", 8, index=index)
    want = torch.stack([hidden[i, index if index >= 0 else n + index] for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool(hidden, right), want)
    torch.testing.assert_close(pool(hidden_left, left), want)


@pytest.mark.parametrize("bidirectional,position", [(True, "start"), (False, "end")])
def test_token_inserted_once_where_configured_and_prepare_agrees(tiny_model, raw_data, tmp_path, bidirectional,
                                                                  position):
    embedder = _cls(tiny_model, bidirectional=bidirectional)
    assert embedder.config.summary_token_position == position  # auto resolved
    token_id = embedder.summary_token_id
    assert token_id == embedder.tokenizer.convert_tokens_to_ids(TOKEN)
    enc = embedder.tokenize(TEXTS, max_length=12)
    for ids in enc.input_ids:
        assert ids.count(token_id) == 1 and len(ids) <= 12
        assert ids.index(token_id) == (0 if position == "start" else len(ids) - 1)  # kept under truncation
        end = embedder.config.end_token_ids[-1]
        assert ids[-1 if position == "start" else -2] == end
    # prepare (the training data) tokenises exactly as encode does
    out = _prepared(tiny_model, raw_data, tmp_path / "tok", position)
    passages = pd.read_parquet(raw_data / "facts.parquet")["passage"].tolist()[:3]
    table = pd.read_parquet(out / "facts.parquet")
    got = [list(ids) for ids in table["passage_input_ids"][:3]]
    assert got == embedder.tokenize(passages, max_length=48).input_ids


def test_new_row_is_initialised_by_the_stated_rule(tiny_model):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_model).get_input_embeddings().weight.detach()
    mean = _cls(tiny_model).backbone.get_input_embeddings().weight.detach()
    assert mean.shape[0] == base.shape[0] + 1
    torch.testing.assert_close(mean[-1], base.mean(0))
    torch.testing.assert_close(mean[:-1], base)
    copy = _cls(tiny_model, summary_token_init="<|im_end|>")
    torch.testing.assert_close(copy.backbone.get_input_embeddings().weight[-1].detach(), base[2])


def test_lora_trains_the_new_row_saves_reloads_and_merges(tiny_model, prepared_end, tmp_path):
    from llm2emb import Embedder

    cfg = _cfg(tiny_model, prepared_end, tmp_path, lora_enabled=True, lora_merge_on_save=True)
    trainer, result = _train(cfg)
    embedder = trainer.embedder
    deltas = [p for n, p in embedder.backbone.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and deltas[0].shape == (1, embedder.hidden_size)
    untrained = _cls(tiny_model)
    init_row = untrained.backbone.get_input_embeddings().weight[untrained.summary_token_id]
    assert not torch.allclose(deltas[0].detach()[0], init_row)  # the new row trained
    assert result.steps == 4
    want = embedder.encode(TEXTS)
    lora = Embedder.from_pretrained(result.final_dir)
    assert lora.is_lora and lora.config.summary_token_id == untrained.summary_token_id
    np.testing.assert_allclose(lora.encode(TEXTS), want, atol=1e-5)
    merged = Embedder.from_pretrained(result.run_dir / "final_merged")
    assert not merged.is_lora
    np.testing.assert_allclose(merged.encode(TEXTS), want, atol=1e-5)
    assert merged.backbone.get_input_embeddings().num_embeddings == untrained.backbone.get_input_embeddings(
    ).num_embeddings
    assert np.abs(untrained.encode(TEXTS) - want).max() > 1e-3


@pytest.mark.parametrize("lora", [True, False])
def test_resume_gives_the_uninterrupted_run(tiny_model, prepared_end, tmp_path, lora):
    whole = _cfg(tiny_model, prepared_end, tmp_path / "a", lora_enabled=lora)
    _train(whole)
    cfg = _cfg(tiny_model, prepared_end, tmp_path / "b", lora_enabled=lora)
    _, first = _train(cfg)
    rewind_to_checkpoint(first.run_dir, 4)
    _, resumed = _train(_cfg(tiny_model, prepared_end, tmp_path / "b", lora_enabled=lora))
    assert resumed.resumed_from == 2
    a, b = trainable_state(whole.run_dir / "final"), trainable_state(resumed.final_dir)
    rows = "trainable_tokens_delta" if lora else "embed_tokens.weight"
    assert any(rows in k for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_full_fine_tuning_trains_the_row_and_reloads(tiny_model, raw_data, tmp_path):
    from llm2emb import Embedder

    data = _prepared(tiny_model, raw_data, tmp_path / "tok", "start")
    cfg = _cfg(tiny_model, data, tmp_path, steps=2, bi_attn_enabled=True, pooling_mode="cls")
    trainer, result = _train(cfg)
    reloaded = Embedder.from_pretrained(result.final_dir)
    assert reloaded.config.summary_token_position == "start" and reloaded.config.bidirectional
    untrained = _cls(tiny_model, bidirectional=True)
    token = untrained.summary_token_id
    row = reloaded.backbone.get_input_embeddings().weight[token]
    assert not torch.allclose(row, untrained.backbone.get_input_embeddings().weight[token])
    np.testing.assert_allclose(reloaded.encode(TEXTS), trainer.embedder.encode(TEXTS), atol=1e-5)


def test_training_on_data_prepared_without_the_token_is_refused(tiny_model, raw_data, tmp_path):
    plain = prepare_data(tiny_model, raw_data, tmp_path / "plain")
    with pytest.raises(UserError, match="summary-token"):
        _train(_cfg(tiny_model, plain, tmp_path, lora_enabled=True))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_training_cut_keeps_what_encode_keeps(tiny_model, bidirectional):
    """query_max_length / passage_max_length cut prepared ids again in training: the end token and a summary
    token at the end stay last, as when encode_texts cuts at that length."""
    from llm2emb.train.encode import truncate

    embedder = _cls(tiny_model, bidirectional=bidirectional)
    assert embedder.tail_length == (1 if bidirectional else 2)
    long = TEXTS[2]
    full = embedder.tokenize([long], max_length=48).input_ids[0]
    assert truncate(full, 12, embedder.tail_length) == embedder.tokenize([long], max_length=12).input_ids[0]


# ------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("bidirectional,mode", [(False, "lasttoken"), (True, "cls")])
def test_export_native_route_inserts_the_token_in_tokenizer_json(tiny_model, tmp_path, bidirectional, mode):
    """A full-weights cls model exports to plain sentence-transformers modules (`lasttoken` for the token at
    the end, `cls` at the start); tokenizer.json's post-processor inserts the token, and the export's own
    check (llm2emb and sentence-transformers reload, cosine >= 0.9999) passes."""
    import json

    from tokenizers import Tokenizer

    from llm2emb import Embedder
    from llm2emb.export import export_model

    source = _cls(tiny_model, bidirectional=bidirectional)
    source.save(tmp_path / "src")
    result = export_model(str(tmp_path / "src"), tmp_path / "out")
    assert result.route == "native", result.route_reasons
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())["pooling_mode"] == mode
    plain = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode(TEXTS[0]).ids
    assert plain == source.tokenize(TEXTS[:1]).input_ids[0]
    reloaded = Embedder.from_pretrained(tmp_path / "out")   # its tokenizer inserts the token itself: once only
    assert reloaded.tokenize(TEXTS).input_ids == source.tokenize(TEXTS).input_ids
    np.testing.assert_allclose(reloaded.encode(TEXTS), source.encode(TEXTS), atol=1e-5)


def test_export_merge_lora_keeps_the_trained_row(tiny_model, prepared_end, tmp_path):
    from llm2emb import Embedder
    from llm2emb.export import export_model

    _, result = _train(_cfg(tiny_model, prepared_end, tmp_path, steps=2, lora_enabled=True))
    lora = Embedder.from_pretrained(result.final_dir)
    export = export_model(str(result.run_dir), tmp_path / "out", merge_lora=True)
    assert export.lora == "merged" and export.route == "native"
    merged = Embedder.from_pretrained(tmp_path / "out")
    assert not merged.is_lora
    np.testing.assert_allclose(merged.encode(TEXTS), lora.encode(TEXTS), atol=1e-5)


def test_onnx_export_reproduces_cls(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from llm2emb import Embedder
    from llm2emb.export import export_model

    source = _cls(tiny_model, bidirectional=True)
    source.save(tmp_path / "src")
    result = export_model(str(tmp_path / "src"), tmp_path / "out", onnx=True)
    # checked inside the export against torch: llm2emb's ONNX backend and plain ONNX Runtime + tokenizer.json
    assert result.onnx["fp32"]["min_cosine"] >= 0.9999
    onnx = Embedder.from_pretrained(tmp_path / "out", backend="onnx")
    np.testing.assert_allclose(onnx.encode(TEXTS), source.encode(TEXTS), atol=1e-4)
    np.testing.assert_allclose(onnx.encode(TEXTS, normalize=False), source.encode(TEXTS, normalize=False),
                               rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ merge

@pytest.fixture(scope="module")
def cls_runs(tiny_model, prepared_end, tmp_path_factory) -> list[Path]:
    """Two LoRA cls runs of different seeds (their summary rows differ)."""
    root = tmp_path_factory.mktemp("cls-runs")
    runs = []
    for seed in (1, 2):
        _, result = _train(_cfg(tiny_model, prepared_end, root / f"s{seed}", steps=2, lora_enabled=True, seed=seed))
        runs.append(result.run_dir)
    return runs


def _row(folder) -> torch.Tensor:
    from llm2emb import Embedder

    embedder = Embedder.from_pretrained(folder)
    if embedder.is_lora:
        embedder.merge_lora()
    return embedder.backbone.get_input_embeddings().weight[embedder.summary_token_id].detach()


def test_linear_merge_averages_the_summary_rows_full_and_adapter_level(cls_runs, tmp_path):
    from llm2emb import Embedder
    from llm2emb.merge import merge_models

    rows = [_row(run / "final") for run in cls_runs]
    assert not torch.allclose(rows[0], rows[1])
    merge_models([str(r) for r in cls_runs], tmp_path / "full")
    torch.testing.assert_close(_row(tmp_path / "full"), (rows[0] + rows[1]) / 2)
    merge_models([str(r) for r in cls_runs], tmp_path / "adapter", adapter_level=True)
    assert Embedder.from_pretrained(tmp_path / "adapter").is_lora
    torch.testing.assert_close(_row(tmp_path / "adapter"), (rows[0] + rows[1]) / 2)
    np.testing.assert_allclose(Embedder.from_pretrained(tmp_path / "adapter").encode(TEXTS),
                               Embedder.from_pretrained(tmp_path / "full").encode(TEXTS), atol=1e-5)


def test_task_vector_merge_takes_the_base_with_its_initialised_row(cls_runs, tiny_model, tmp_path):
    """TIES over the plain base LLM (one row fewer): the base is loaded with the inputs' summary token, so the
    row's task vector is trained minus initialised; two equal inputs give that input back."""
    from llm2emb.merge import merge_models

    result = merge_models([str(cls_runs[0] / "final"), str(cls_runs[1] / "final")], tmp_path / "ties",
                          method="ties", base=str(tiny_model))
    assert not any("embed_tokens" in key for key in result.linear_fallback)
    row = _row(tmp_path / "ties")
    init = _cls(tiny_model).backbone.get_input_embeddings().weight[-1].detach()
    assert row.shape == init.shape and not torch.allclose(row, init)


def test_merging_different_summary_tokens_or_vocabularies_is_refused(cls_runs, tiny_model, prepared_end, tmp_path):
    from transformers import AddedToken, AutoModel, AutoTokenizer

    from llm2emb.merge import merge_models

    other = _cls(tiny_model, summary_token="<|vec|>")
    other.save(tmp_path / "other-token")
    with pytest.raises(UserError, match="has summary_token='<|vec|>' but input 1"):
        merge_models([str(cls_runs[0] / "final"), str(tmp_path / "other-token")], tmp_path / "out")
    # a base whose tokenizer already has one more token: its cls model has one more row
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens([AddedToken("<|extra|>", special=True)], special_tokens=True)
    model = AutoModel.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "wider-vocab")
    tokenizer.save_pretrained(tmp_path / "wider-vocab")
    _cls(tmp_path / "wider-vocab").save(tmp_path / "wider-cls")
    with pytest.raises(UserError, match=r"input 2 \(.*\) has a vocabulary of 49154 tokens but input 1 .* has 49153"):
        merge_models([str(cls_runs[0] / "final"), str(tmp_path / "wider-cls")], tmp_path / "out", any_base=True)


def test_embedding_cache_fingerprint_names_the_summary_token_only_for_cls(tiny_model):
    """Other poolings' cache fingerprints stay as before the cls fields existed; cls models' name the token."""
    from llm2emb import Embedder
    from llm2emb.eval.encoders import EmbedderEncoder

    plain = EmbedderEncoder(Embedder.from_pretrained(tiny_model, pooling="mean")).settings()
    assert not any(key.startswith("summary_token") for key in plain)
    cls = EmbedderEncoder(_cls(tiny_model)).settings()
    assert cls["summary_token"] == TOKEN and cls["summary_token_position"] == "end"
    other = EmbedderEncoder(_cls(tiny_model, summary_token="<|vec|>"))
    assert other.fingerprint() != EmbedderEncoder(_cls(tiny_model)).fingerprint()


def test_token_at_start_goes_after_bos_and_exports_through_the_module(tiny_model, tmp_path):
    """A tokenizer that adds BOS: the summary token goes right after it (index 1), the pooling reads index 1,
    and sentence-transformers' cls mode (the first position) cannot serve it, so export takes the module
    route with that reason."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from llm2emb.export import export_model

    folder = tmp_path / "bos-model"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.convert_ids_to_tokens(1)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=[bos, "$A"], special_tokens=[(bos, 1)])
    tokenizer.save_pretrained(folder)
    embedder = _cls(folder, bidirectional=True)
    ids = embedder.tokenize(TEXTS).input_ids
    assert all(row[0] == 1 and row[1] == embedder.summary_token_id and row.count(row[1]) == 1 for row in ids)
    assert embedder.pooling.index == 1
    embedder.save(tmp_path / "src")
    result = export_model(str(tmp_path / "src"), tmp_path / "out")
    assert result.route == "module" and any("after a BOS token" in r for r in result.route_reasons)
