"""`llm2emb export`: sentence-transformers folders equal to the Embedder, LoRA merge correctness, run and
checkpoint resolution, model card, bad input (nothing half-written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.export import export_model, resolve_model_source
from llm2emb.export import st_format
from llm2emb.export.exporter import ExportCheckError

st = pytest.importorskip("sentence_transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.",
         "今天天气很好，我们去公园散步吧。", "向量检索", "a"]
QUERIES = ["what does a fox do?", "什么是向量？"]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it.\nQuery: "


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def perturb_lora(emb: Embedder, seed: int = 0) -> None:
    """A fresh LoRA is a no-op (B = 0); give it weights so merging has something to get right."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in emb.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def make_run(root: Path, tiny_model: Path, *, lora: bool, **embedder_kwargs) -> tuple[Path, Embedder]:
    """A trainer-style run dir: config.json ({"config": resolved config, ...}) + final/ (Embedder folder, LoRA
    kept as adapter)."""
    emb = Embedder.from_pretrained(str(tiny_model), query_instruction=INSTRUCTION, **embedder_kwargs)
    if lora:
        emb.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
        perturb_lora(emb)
    run = root / "run"
    emb.save(run / "final")
    (run / "config.json").write_text(json.dumps({"config": {
        "model_path": str(tiny_model), "experiment_id": "run", "pooling_mode": emb.config.pooling,
        "bi_attn_enabled": emb.config.bidirectional, "lora_enabled": lora, "lora_r": 4}, "versions": {}}))
    return run, emb


def st_vectors(folder: Path, trust: bool = False) -> tuple[np.ndarray, np.ndarray]:
    model = st.SentenceTransformer(str(folder), device="cpu", trust_remote_code=trust)
    return (model.encode(TEXTS, batch_size=3, show_progress_bar=False),
            model.encode_query(QUERIES, show_progress_bar=False))


# Without LoRA the exported model is the same code path as a merged one, so that half of the matrix runs in CI.
@pytest.mark.parametrize("lora", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "lora-merged"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["eos", "mean", "weighted_mean"])
def test_sentence_transformers_equals_embedder(tiny_model, tmp_path, pooling, bidirectional, lora):
    run, emb = make_run(tmp_path, tiny_model, lora=lora, pooling=pooling, bidirectional=bidirectional)
    docs_ref = emb.encode(TEXTS)
    queries_ref = emb.encode(QUERIES, instruction=INSTRUCTION)
    result = export_model(str(run), tmp_path / "export", merge_lora=lora, verify=False)
    assert result.route == "native" and result.lora == ("merged" if lora else "none")
    modules = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)
    assert not (tmp_path / "export" / "adapter_config.json").exists()

    docs, queries = st_vectors(tmp_path / "export")
    assert cosines(docs, docs_ref).min() > 0.9999
    assert cosines(queries, queries_ref).min() > 0.9999
    again = Embedder.from_pretrained(str(tmp_path / "export"))
    assert cosines(again.encode(TEXTS), docs_ref).min() > 0.9999


@pytest.mark.parametrize("pooling", ["eos", "weighted_mean"])
def test_left_padding_exports_match(tiny_model, tmp_path, pooling):
    """ST keeps the tokenizer's padding side; its lasttoken/weightedmean handle left padding like ours."""
    run, emb = make_run(tmp_path, tiny_model, lora=False, pooling=pooling, padding_side="left", bidirectional=True)
    export_model(str(run), tmp_path / "export", verify=False)
    model = st.SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert model.tokenizer.padding_side == "left"
    docs = model.encode(TEXTS, batch_size=5, show_progress_bar=False)
    assert cosines(docs, emb.encode(TEXTS)).min() > 0.9999


def test_st_sees_the_same_tokens_without_chat_template(tiny_model, tmp_path):
    run, emb = make_run(tmp_path, tiny_model, lora=False, pooling="eos", max_length=8)
    export_model(str(run), tmp_path / "export", verify=False)
    model = st.SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert model.max_seq_length == 8
    texts = ["hi", "word " * 40, "你好"]
    features = model.preprocess(texts)
    want = emb.tokenize(texts).input_ids   # EOS appended, kept last on truncation
    got = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    assert got == want
    assert all(ids[-1] == emb.tokenizer.eos_token_id for ids in got)


@pytest.mark.parametrize("case", ["attention+head+skip", "lora-adapter"])
def test_module_route_for_what_st_cannot_express(tiny_model, tmp_path, case):
    if case == "lora-adapter":
        run, emb = make_run(tmp_path, tiny_model, lora=True, pooling="mean", bidirectional=True)
    else:
        run, emb = make_run(tmp_path, tiny_model, lora=False, pooling="attention", head="linear", head_dim=32,
                            skip_instruction=True)
    docs_ref = emb.encode(TEXTS)
    queries_ref = emb.encode(QUERIES, instruction=INSTRUCTION)
    result = export_model(str(run), tmp_path / "export", verify=case == "lora-adapter")
    assert result.route == "module"
    if case == "lora-adapter":
        assert result.checks and min(result.checks.values()) > 0.9999
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(tmp_path / "export"), device="cpu")
    docs, queries = st_vectors(tmp_path / "export", trust=True)
    assert docs.shape[1] == emb.embedding_dim
    assert cosines(docs, docs_ref).min() > 0.9999
    assert cosines(queries, queries_ref).min() > 0.9999
    card = (tmp_path / "export" / "README.md").read_text()
    assert "trust_remote_code=True" in card
    if case == "lora-adapter":
        assert result.lora == "adapter" and (tmp_path / "export" / "adapter_config.json").exists()
        assert "--merge-lora" in card
    else:   # a sentence-transformers save of the loaded model round-trips (e.g. before further ST training)
        model = st.SentenceTransformer(str(tmp_path / "export"), device="cpu", trust_remote_code=True)
        model.save(str(tmp_path / "resaved"))
        docs_again, _ = st_vectors(tmp_path / "resaved", trust=True)
        assert np.abs(docs_again - docs).max() < 1e-6


def test_lora_merge_equals_adapter_plus_base_in_every_dtype(tiny_model, tmp_path):
    """Merged models must not "behave as untrained": merged == adapter + base, also after a bf16 cast."""
    base = Embedder.from_pretrained(str(tiny_model), pooling="mean").encode(TEXTS)
    run, emb = make_run(tmp_path, tiny_model, lora=True, pooling="mean")
    tuned = emb.encode(TEXTS)
    assert cosines(tuned, base).min() < 0.99   # the adapter really changes the vectors

    export_model(str(run), tmp_path / "fp32", merge_lora=True, verify=False)
    merged = Embedder.from_pretrained(str(tmp_path / "fp32"))
    assert not merged.is_lora and not merged.config.lora_adapter
    assert np.abs(merged.encode(TEXTS) - tuned).max() < 1e-5

    export_model(str(run), tmp_path / "bf16", merge_lora=True, dtype="bfloat16", verify=False)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    low = Embedder.from_pretrained(str(tmp_path / "bf16"))
    assert low.config.dtype == "bfloat16" and next(low.backbone.parameters()).dtype == torch.bfloat16
    vectors = low.encode(TEXTS)
    assert cosines(vectors, tuned).min() > 0.99
    # closer to the trained model than to the untrained base, for every text
    assert (cosines(vectors, tuned) > cosines(vectors, base)).all()
    docs, _ = st_vectors(tmp_path / "bf16")
    assert cosines(docs, tuned).min() > 0.99


def test_run_and_checkpoint_resolution(tiny_model, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"model_path": "x", "experiment_id": "run"}}))
    with pytest.raises(UserError, match="has no final model"):
        resolve_model_source(str(run))
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    for step, complete in ((5, True), (20, True), (30, False)):
        ckpt = run / "checkpoints" / f"step_{step}"
        emb.save(ckpt / "model")
        (ckpt / "state").mkdir()
        if complete:   # the trainer writes trainer_state.json last
            (ckpt / "trainer_state.json").write_text('{"step": %d}' % step)
    newest = resolve_model_source(str(run))
    assert newest.checkpoint_step == 20 and newest.model_path.endswith("step_20/model")
    assert newest.run_dir == run
    one = resolve_model_source(str(run / "checkpoints" / "step_5"))
    assert one.checkpoint_step == 5 and one.run_config()["experiment_id"] == "run"
    with pytest.raises(UserError, match="incomplete"):
        resolve_model_source(str(run / "checkpoints" / "step_30"))
    emb.save(run / "final")
    final = resolve_model_source(str(run))
    assert final.model_path == str(run / "final") and final.checkpoint_step is None
    inner = resolve_model_source(str(run / "final"))
    assert inner.run_dir == run.resolve()
    assert resolve_model_source("smollm2-135m").run_dir is None


def test_model_card(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "data_stats.json").write_text(json.dumps({"scifact_en": {"rows": 919, "hard_negatives": 7},
                                                      "atec_pairs_zh": {"rows": 8549, "hard_negatives": 0}}))
    (data / "manifest.json").write_text(json.dumps({"atec_pairs_zh": {"type": "sts", "instruction": "找相似问题"}}))
    run, _ = make_run(tmp_path, tiny_model, lora=False, pooling="mean")
    record = json.loads((run / "config.json").read_text())
    record["config"].update(train_data_path=str(data), learning_rate=3e-4)
    (run / "config.json").write_text(json.dumps(record))
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 10, "loss": 1.5}\n'
                                       '{"type": "train", "step": 20, "loss": 0.75}\n'
                                       '{"type": "validation", "step": 20, "loss": 0.9}\n')

    def result(task, score, source, label=None, limits=None, time="2025-01-01T00:00:00"):
        return {"format": "llm2emb-eval/1", "label": label or str(source), "model": {"source": str(source)},
                "task": {"name": task, "kind": "retrieval", "split": "test"}, "main_score": "ndcg_at_10",
                "metrics": {"ndcg_at_10": score, "recall_at_10": 0.7}, "limits": limits, "time": time}
    (run / "eval").mkdir()
    (run / "eval" / "a.json").write_text(json.dumps(result("scifact_mini", 0.61234, run / "final", "mine")))
    (run / "eval" / "broken.json").write_text("{not json")
    elsewhere = tmp_path / "eval_results"
    elsewhere.mkdir()
    (elsewhere / "b.json").write_text(json.dumps(result("T2Retrieval", 0.5, run / "final", limits=500,
                                                        time="2025-01-02T00:00:00")))
    (elsewhere / "c.json").write_text(json.dumps(result("T2Retrieval", 0.9, tmp_path / "other_model")))
    export_model(str(run), tmp_path / "export", verify=False, eval_dirs=[elsewhere])
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"base model | {tiny_model}" in card
    assert "| mine | scifact_mini | test |  | 0.61234 | 0.70000 |" in card
    assert f"| {run / 'final'} | T2Retrieval | test | 500 | 0.50000 | 0.70000 |" in card
    assert "other_model" not in card   # another model's result is not this run's
    assert "| atec_pairs_zh | sts | 8549 | 0 | 找相似问题 |" in card
    assert "| scifact_en | retrieval | 919 | 7 |" in card
    assert '"learning_rate": 0.0003' in card and '"versions"' not in card
    assert "20 training steps; last train loss 0.75000; last validation loss 0.90000." in card
    assert "SentenceTransformer('export')" in card and "Embedder.from_pretrained('export')" in card
    assert "library_name: sentence-transformers" in card


def test_output_rules_and_nothing_half_written(tiny_model, tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, tiny_model, lora=False, pooling="mean")
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_model(str(run), out, verify=False)
    with pytest.raises(UserError, match="would replace the model being exported"):
        export_model(str(run), run / "final", overwrite=True, verify=False)

    # A failing self-check (here: a wrong pooling mode written for ST) keeps the old folder untouched.
    monkeypatch.setitem(st_format.ST_POOLING_MODES, "mean", "lasttoken")
    with pytest.raises(ExportCheckError, match="nothing was written"):
        export_model(str(run), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]   # no temp dirs left
    monkeypatch.undo()

    export_model(str(run), out, overwrite=True, verify=False)
    assert not (out / "keep.txt").exists() and (out / "modules.json").exists()

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no final model"):
        export_model(str(empty_run), tmp_path / "never", verify=False)
    assert not (tmp_path / "never").exists()


def test_cli_export(tiny_model, tmp_path, capsys):
    run, _ = make_run(tmp_path, tiny_model, lora=True, pooling="weighted_mean")
    out = tmp_path / "cli_export"
    assert main(["export", "--model", str(run), "--output", str(out), "--merge-lora", "--dtype", "float32",
                 "--no-verify", "--query-instruction", "Instruct: find\\nQuery: "]) == 0
    printed = capsys.readouterr().out
    assert "LoRA merged" in printed and "plain sentence-transformers modules" in printed
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "Instruct: find\nQuery: ", "document": ""}
    assert Embedder.from_pretrained(str(out)).config.query_instruction == "Instruct: find\nQuery: "
    assert main(["export", "--model", str(run), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_export_matches_in_both_libraries(smollm2_dir, tmp_path):
    """The real 135M model, LoRA merged, mean pooling, English and Chinese: ST == Embedder."""
    emb = Embedder.from_pretrained("smollm2-135m", pooling="mean", max_length=64, query_instruction=INSTRUCTION)
    emb.add_lora(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    perturb_lora(emb)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.05)
    tuned = emb.encode(TEXTS)
    emb.save(tmp_path / "adapter")
    result = export_model(str(tmp_path / "adapter"), tmp_path / "export", merge_lora=True)
    assert result.route == "native" and min(result.checks.values()) > 0.9999
    docs, queries = st_vectors(tmp_path / "export")
    assert cosines(docs, tuned).min() > 0.9999
    assert cosines(queries, emb.encode(QUERIES, instruction=INSTRUCTION)).min() > 0.9999
