"""ONNX without optimum: the exported graph (inputs input_ids + attention_mask only) gives the torch fp32
vectors (cosine >= 0.9999) for eos / mean pooling, causal / bidirectional attention, left / right padding,
on tiny llama, qwen2 and gemma3 models; the int8 graph loads and stays close (>= 0.9); `llm2emb export
--onnx` writes an engine-ready folder only after its self-check; `Embedder.from_pretrained(backend="onnx")`
and `llm2emb eval --backend onnx` reproduce torch, and the embedding cache never mixes the backends."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.export import backends, export_model
from llm2emb.export.exporter import ExportCheckError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "a", "今天天气很好，我们去公园散步吧。",
         "Embeddings map text to vectors that can be compared with a dot product.", ""]
#: fp32 graph vs torch fp32; int8 graph (dynamic, per-channel weights) vs torch fp32 on tiny random models
FP32_BOUND, INT8_BOUND = 0.9999, 0.9


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_graph(session, embedder: Embedder, texts: list[str]) -> np.ndarray:
    batch = embedder.collate(embedder.tokenize(texts).input_ids)
    return session.run(["sentence_embedding"], {k: v.numpy() for k, v in batch.items()})[0]


# (arch, pooling, bidirectional): every combination on llama, one causal and one bidirectional on the others
CASES = [("llama", p, b) for p in ("eos", "mean") for b in (False, True)] + [
    ("qwen2", "eos", False), ("qwen2", "mean", True), ("gemma3_text", "mean", False), ("gemma3_text", "eos", True)]


@pytest.mark.parametrize("arch, pooling, bidirectional", CASES)
def test_graph_matches_torch_both_padding_sides(tiny_model_factory, tmp_path, arch, pooling, bidirectional):
    embedder = Embedder.from_pretrained(str(tiny_model_factory(arch)), pooling=pooling, bidirectional=bidirectional)
    path = tmp_path / "model.onnx"
    exporter = backends.export_graph(embedder, path)
    assert exporter == "dynamo"   # the TorchScript exporter is only the fallback
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["token_embeddings", "sentence_embedding"]
    for side in ("left", "right"):
        embedder.config.padding_side = side
        reference = embedder.encode(TEXTS, batch_size=len(TEXTS))
        assert cosines(reference, run_graph(session, embedder, TEXTS)).min() >= FP32_BOUND, side
        for text in TEXTS[:2]:   # unpadded batches of one, down to a single token plus EOS
            assert cosines(reference[TEXTS.index(text):][:1], run_graph(session, embedder, [text])).min() \
                >= FP32_BOUND
    if bidirectional:   # the graph really attends both ways: a later token changes the first token's state
        batch = embedder.collate(embedder.tokenize(["one two three", "one two four"]).input_ids)
        states = session.run(["token_embeddings"], {k: v.numpy() for k, v in batch.items()})[0]
        assert not np.allclose(states[0, 0], states[1, 0], atol=1e-6)


def test_torchscript_fallback_and_exporter_failure(tiny_model, tmp_path, monkeypatch):
    embedder = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    real = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("Failed to export: no ONNX function for aten.fake_op.default")
        return real(*args, dynamo=False, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    assert backends.export_graph(embedder, tmp_path / "ts.onnx") == "torchscript"
    session = ort.InferenceSession(str(tmp_path / "ts.onnx"), providers=["CPUExecutionProvider"])
    assert cosines(embedder.encode(TEXTS), run_graph(session, embedder, TEXTS)).min() >= FP32_BOUND

    def broken(*args, dynamo=True, **kwargs):
        raise RuntimeError("Unsupported: aten::fake_op" if not dynamo else "no function for aten.fake_op.default")
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(UserError, match=r"cannot export llama: .*aten\.fake_op\.default.*aten::fake_op"):
        backends.export_graph(embedder, tmp_path / "never.onnx")


@pytest.mark.parametrize("dynamo", [True, False])
def test_int8_keeps_the_mlp_output_projections_fp32(tiny_model, tmp_path, monkeypatch, dynamo):
    """int8 finds every decoder layer's down_proj in either exporter's graph (dynamo: name-scope metadata;
    TorchScript: node names) and leaves exactly those MatMuls unquantised."""
    import onnx

    embedder = Embedder.from_pretrained(str(tiny_model), pooling="eos")
    if not dynamo:
        real = torch.onnx.export
        monkeypatch.setattr(torch.onnx, "export", lambda *a, dynamo=True, **k: (_ for _ in ()).throw(
            RuntimeError("aten.x")) if dynamo else real(*a, dynamo=False, **k))
    backends.export_graph(embedder, tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx"))
    layers = embedder.backbone.config.num_hidden_layers
    modules = backends.linear_modules(graph)
    assert sorted(set(modules.values())) == sorted((i, p) for i in range(layers) for p in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    kept = backends.fp32_linears(graph)
    assert sorted(modules[n] for n in kept) == [(i, "down_proj") for i in range(layers)]
    info = backends.quantize_int8(tmp_path / "model.onnx", tmp_path / "int8.onnx", "avx512_vnni")
    assert info == {"fp32_linears": layers, "reduce_range": False}
    quantised = onnx.load(str(tmp_path / "int8.onnx"))
    plain = {n.name for n in quantised.graph.node if n.op_type == "MatMul"}
    assert set(kept) <= plain and any(n.op_type == "DynamicQuantizeMatMul" or n.op_type == "MatMulInteger"
                                      for n in quantised.graph.node)
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert cosines(embedder.encode(TEXTS), run_graph(session, embedder, TEXTS)).min() >= INT8_BOUND


@pytest.fixture(scope="module")
def onnx_export(tiny_model, tmp_path_factory):
    """A merged-LoRA, bidirectional, mean-pooling model with a query instruction, exported with
    --onnx-int8 avx512_vnni: (source folder, export folder, ExportResult)."""
    root = tmp_path_factory.mktemp("onnx-export")
    embedder = Embedder.from_pretrained(str(tiny_model), pooling="mean", bidirectional=True, padding_side="left",
                                        query_instruction="Instruct: find the passage\nQuery:")
    embedder.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in embedder.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    embedder.save(root / "src")
    result = export_model(str(root / "src"), root / "out", merge_lora=True, onnx_int8="avx512_vnni")
    return root / "src", root / "out", result


def test_export_writes_engine_ready_folder(onnx_export):
    _, out, result = onnx_export
    assert result.lora == "merged" and result.route == "native"
    assert set(result.onnx) == {"fp32", "int8"}
    assert result.onnx["fp32"]["min_cosine"] >= FP32_BOUND and result.onnx["fp32"]["exporter"] == "dynamo"
    assert result.onnx["int8"]["min_cosine"] >= INT8_BOUND
    assert result.onnx["int8"]["fp32_linears"] == Embedder.from_pretrained(str(out)).backbone.config.num_hidden_layers
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "model_qint8_avx512_vnni.onnx").is_file()
    assert (out / "onnx" / "model_qint8_avx512_vnni.onnx").stat().st_size < (out / "onnx" / "model.onnx").stat().st_size * 0.7
    config = json.loads((out / "config.json").read_text())
    assert config["is_causal"] is False and config["use_bidirectional_attention"] is True
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == 512 and tok_config["padding_side"] == "left"
    # tokenizer.json alone (no transformers, no llm2emb rule) appends the end token
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello world").ids
    assert ids[-1] == Embedder.from_pretrained(str(out)).tokenizer.eos_token_id
    card = (out / "README.md").read_text()
    assert 'backend="onnx"' in card and "model_qint8_avx512_vnni.onnx" in card and "optimum" in card
    assert "add_custom_model" in card and "--pooling mean" in card and "--pooler-config" in card


def test_legacy_pooling_keys_load_in_sentence_transformers(onnx_export):
    st = pytest.importorskip("sentence_transformers")
    _, out, _ = onnx_export
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "mean" and pooling["pooling_mode_mean_tokens"] is True
    assert pooling["pooling_mode_lasttoken"] is False and "word_embedding_dimension" not in pooling
    model = st.SentenceTransformer(str(out), device="cpu")
    assert model[1].pooling_mode == "mean"
    torch_vectors = Embedder.from_pretrained(str(out)).encode(TEXTS)
    assert cosines(torch_vectors, model.encode(TEXTS)).min() >= FP32_BOUND


@pytest.mark.parametrize("file_name, bound", [(None, FP32_BOUND), ("onnx/model_qint8_avx512_vnni.onnx", INT8_BOUND)])
def test_onnx_backend_matches_torch(onnx_export, file_name, bound):
    _, out, _ = onnx_export
    torch_model = Embedder.from_pretrained(str(out))
    onnx_model = Embedder.from_pretrained(str(out), backend="onnx", onnx_file=file_name)
    instruction = torch_model.config.query_instruction
    for side in ("left", "right"):
        torch_model.config.padding_side = onnx_model.config.padding_side = side
        for kwargs in ({}, {"instruction": instruction}, {"dim": 16}, {"normalize": False}, {"max_length": 4}):
            ref = torch_model.encode(TEXTS, batch_size=2, **kwargs)
            got = onnx_model.encode(TEXTS, batch_size=2, **kwargs)
            assert got.shape == ref.shape and cosines(ref, got).min() >= bound, (side, kwargs)
    with pytest.raises(UserError, match="pooling cannot be changed"):
        Embedder.from_pretrained(str(out), backend="onnx", pooling="eos")
    with pytest.raises(UserError, match="has no onnx/model_fp16.onnx; it has onnx/model.onnx"):
        Embedder.from_pretrained(str(out), backend="onnx", onnx_file="onnx/model_fp16.onnx")


def _beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = ["the cat sat on the mat", "dogs bark loudly", "rain falls in spring", "stocks went up today",
            "向量检索把文本变成向量"]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    queries = ["where did the cat sit", "what do dogs do", "when does rain fall", "什么是向量检索"]
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(queries)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n"
                                             "q3\td4\t1\n")
    return root


def test_eval_backend_onnx_reproduces_torch_and_keys_the_cache(onnx_export, tmp_path, capsys):
    _, out, _ = onnx_export
    task = _beir(tmp_path / "mini")
    records = {}
    for backend in ("torch", "onnx"):
        for cache in (["--no-cache"], ["--cache-dir", str(tmp_path / "cache")]):
            results = tmp_path / f"{backend}-{len(cache)}"
            assert main(["eval", "--model", str(out), "--tasks", str(task), "--backend", backend,
                         "--output", str(results), "--no-progress", *cache]) == 0
            [record] = [json.loads(p.read_text()) for p in results.glob("*.json")]
            records[backend, len(cache)] = record
    torch_scores, onnx_scores = records["torch", 1]["metrics"], records["onnx", 1]["metrics"]
    assert onnx_scores["ndcg_at_10"] == pytest.approx(torch_scores["ndcg_at_10"], abs=1e-6)
    assert records["onnx", 1]["model"]["backend"] == "onnx" and records["onnx", 1]["model"]["graph_sha256"]
    assert records["onnx", 1]["model"]["fingerprint"] != records["torch", 1]["model"]["fingerprint"]
    # one cache entry per backend: the ONNX run never read the torch run's vectors
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert records["onnx", 2]["metrics"]["ndcg_at_10"] == onnx_scores["ndcg_at_10"]
    assert main(["eval", "--model", str(out), "--tasks", str(task), "--backend", "onnx", "--pooling", "eos"]) == 2
    assert "--pooling cannot be changed" in capsys.readouterr().err


def test_encode_backend_onnx(onnx_export, tmp_path):
    _, out, _ = onnx_export
    (tmp_path / "docs.txt").write_text("\n".join(TEXTS[:4]) + "\n")
    for backend in ("torch", "onnx"):
        assert main(["encode", "--model", str(out), "--input", str(tmp_path / "docs.txt"), "--backend", backend,
                     "--output", str(tmp_path / f"{backend}.npy")]) == 0
    assert cosines(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "onnx.npy")).min() >= FP32_BOUND


def test_onnx_refusals(tiny_model, tmp_path, monkeypatch, capsys):
    attention = tmp_path / "attn"
    Embedder.from_pretrained(str(tiny_model), pooling="attention").save(attention)
    with pytest.raises(UserError, match=r"attention pooling.*sentence-transformers with trust_remote_code"):
        export_model(str(attention), tmp_path / "never", onnx=True, verify=False)
    skip = tmp_path / "skip"
    Embedder.from_pretrained(str(tiny_model), pooling="mean", skip_instruction=True,
                             query_instruction="Instruct: x\nQuery:").save(skip)
    with pytest.raises(UserError, match="skip-instruction pooling"):
        export_model(str(skip), tmp_path / "never", onnx=True, verify=False)
    for name, pooling, why in (("echo", "mean", "only the last copy is pooled"),
                               ("prompteol", "eos", "ending without the end token")):
        strategy = tmp_path / name
        Embedder.from_pretrained(str(tiny_model), pooling=pooling, input_strategy=name).save(strategy)
        with pytest.raises(UserError, match=rf"input_strategy {name} \(.*{why}.*serve it with llm2emb itself"):
            export_model(str(strategy), tmp_path / "never", onnx=True, verify=False)
    plain = tmp_path / "plain"
    Embedder.from_pretrained(str(tiny_model), pooling="eos").save(plain)
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else object())
    assert main(["export", "--model", str(plain), "--output", str(tmp_path / "never"), "--onnx-int8"]) == 2
    assert "pip install 'llm2emb[onnx]'" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(UserError, match="between 0 and 1"):
        export_model(str(plain), tmp_path / "never", onnx=True, onnx_min_cosine=1.5)
    # an int8 bar the int8 graph cannot clear: nothing is written
    with pytest.raises(ExportCheckError, match="--onnx-min-cosine"):
        export_model(str(plain), tmp_path / "never", onnx_int8="avx2", onnx_min_cosine=0.999999999)
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn", "echo", "plain", "prompteol", "skip"]


@pytest.mark.slow
@pytest.mark.parametrize("pooling, int8", [("eos", "auto"), ("mean", "auto")])
def test_smollm2_onnx_export(smollm2_dir, tmp_path, pooling, int8):
    """The real built-in model: fp32 graph >= 0.9999 against torch fp32 on the probes, int8 >= 0.9 with both
    poolings (with every linear layer int8, SmolLM2's last-token state fell to cosine 0.56 and the export's gate
    refused it; the MLP output projections now stay fp32, see docs/serving.md)."""
    src = tmp_path / "src"
    Embedder.from_pretrained(str(smollm2_dir), pooling=pooling).save(src)
    result = export_model(str(src), tmp_path / "out", onnx=True, onnx_int8=int8, verify=False)
    assert result.onnx["fp32"]["min_cosine"] >= FP32_BOUND
    if int8:
        assert result.onnx["int8"]["min_cosine"] >= INT8_BOUND
    torch_model = Embedder.from_pretrained(str(tmp_path / "out"))
    onnx_model = Embedder.from_pretrained(str(tmp_path / "out"), backend="onnx")
    assert cosines(torch_model.encode(TEXTS), onnx_model.encode(TEXTS)).min() >= FP32_BOUND


def test_route_table_in_docs_matches_model_card():
    """docs/serving.md and every model card show the same engine table (one source: model_card.ROUTE_TABLE)."""
    from llm2emb.export.model_card import ROUTE_TABLE

    docs = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    if not docs.is_file():
        pytest.skip("docs/ is not shipped with this copy")
    assert ROUTE_TABLE.strip() in docs.read_text(encoding="utf-8")
    for strategy in ("echo", "prompteol"):
        assert f"input_strategy: {strategy}" in ROUTE_TABLE
