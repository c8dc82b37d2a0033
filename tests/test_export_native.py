"""`llm2emb export` takes the native sentence-transformers route (no remote code) for every recipe plain
sentence-transformers modules can express: skip-instruction mean / weighted-mean pooling (Pooling with
include_prompt=False and the query instruction as the "query" prompt) where sentence-transformers' prompt
length agrees with llm2emb's instruction prefix, EOS pooling with skip-instruction, and causal LoRA adapters
(loaded through peft). Only trainable pooling, heads, bidirectional adapters and prompt lengths that cannot
agree take the module route, and the export says why."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.export import export_model
from llm2emb.export import st_format
from llm2emb.model.tokenization import encode_texts, instruction_prefix_end

st = pytest.importorskip("sentence_transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.",
         "今天天气很好，我们去公园散步吧。", "向量检索", "a"]
QUERIES = ["what does a fox do?", "什么是向量？", "(parenthesised) start", " leading space", "123 numbers"]
#: ends exactly at the separator: sentence-transformers' prompt length equals llm2emb's prefix
AT_SEPARATOR = "Instruct: Given a question, retrieve passages that answer it.\nQuery:"
#: a space after the separator: sentence-transformers counts the lone space as one more prompt token
AFTER_SEPARATOR = AT_SEPARATOR + " "


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def source(tmp_path: Path, tiny_model: Path, name: str = "src", lora: bool = False, **kwargs) -> tuple[Path, Embedder]:
    emb = Embedder.from_pretrained(str(tiny_model), **kwargs)
    if lora:
        emb.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, param in emb.backbone.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    emb.save(tmp_path / name)
    return tmp_path / name, emb


def plain_st(folder: Path):
    """SentenceTransformer without remote code: fails for a folder that needs llm2emb's module."""
    return st.SentenceTransformer(str(folder), device="cpu")


def modules_of(folder: Path) -> list[str]:
    return [m["type"] for m in json.loads((folder / "modules.json").read_text())]


# ---------------------------------------------------------------------------------------------- native skip
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["mean", "weighted_mean"])
def test_skip_instruction_exports_natively(tiny_model, tmp_path, pooling, bidirectional):
    src, emb = source(tmp_path, tiny_model, pooling=pooling, bidirectional=bidirectional, skip_instruction=True,
                      query_instruction=AT_SEPARATOR)
    result = export_model(str(src), tmp_path / "export")
    assert result.route == "native", result.route_reasons
    assert min(result.checks.values()) > 0.9999
    folder = tmp_path / "export"
    assert all(t.startswith("sentence_transformers.") for t in modules_of(folder))
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    prompts = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == AT_SEPARATOR and prompts["document"] == ""

    model = plain_st(folder)
    queries_ref = emb.encode(QUERIES, instruction=AT_SEPARATOR)
    assert cosines(model.encode(QUERIES, prompt_name="query", batch_size=5), queries_ref).min() > 0.9999
    assert cosines(model.encode_query(QUERIES), queries_ref).min() > 0.9999
    assert cosines(model.encode(TEXTS, batch_size=3), emb.encode(TEXTS)).min() > 0.9999
    # skip-instruction really excludes something: the plain-mean vector of the same query text differs
    with_prompt = Embedder.from_pretrained(str(src), skip_instruction=False).encode(QUERIES, instruction=AT_SEPARATOR)
    assert cosines(with_prompt, queries_ref).min() < 0.9999


def test_skip_instruction_left_padding(tiny_model, tmp_path):
    """sentence-transformers drops pad + prompt positions on left-padded batches, as llm2emb does."""
    src, emb = source(tmp_path, tiny_model, pooling="weighted_mean", skip_instruction=True, padding_side="left",
                      bidirectional=True, query_instruction=AT_SEPARATOR)
    assert export_model(str(src), tmp_path / "export").route == "native"
    model = plain_st(tmp_path / "export")
    assert model.tokenizer.padding_side == "left"
    got = model.encode_query(QUERIES, batch_size=5)
    assert cosines(got, emb.encode(QUERIES, instruction=AT_SEPARATOR)).min() > 0.9999


def test_prompt_length_rule(tiny_model, tmp_path):
    """Our reading of sentence-transformers' rule (prompt tokenised alone, the trailing special token not
    counted) equals what the installed sentence-transformers computes, and agrees with llm2emb's prefix
    exactly when the instruction ends at its separator or has none (SmolLM2's byte-level BPE)."""
    src, emb = source(tmp_path, tiny_model, pooling="mean", skip_instruction=True)
    export_model(str(src), tmp_path / "export", verify=False)
    model = plain_st(tmp_path / "export")
    tokenizer = model.tokenizer
    cases = {AT_SEPARATOR: True, AFTER_SEPARATOR: False, AT_SEPARATOR + "\n": False, "query: ": True,
             "为这个句子生成表示以用于检索相关文章：": True, "Query: ": False}
    for instruction, agrees in cases.items():
        ours = st_format.st_prompt_length(tokenizer, instruction, 512)
        if hasattr(model[0], "_get_prompt_length"):   # sentence-transformers >= 6
            assert ours == model[0]._get_prompt_length(instruction), instruction
        prefix = encode_texts(tokenizer, [instruction + q for q in QUERIES], 512,
                              instruction_prefix_end(instruction, "Query:")).prefix_lengths
        assert (set(prefix) == {ours}) is agrees, (instruction, ours, prefix)
        assert (st_format.prompt_length_mismatch(tokenizer, instruction, "Query:", 512) is None) is agrees


def test_instruction_after_separator_falls_back_to_module(tiny_model, tmp_path, capsys):
    src, emb = source(tmp_path, tiny_model, pooling="mean", skip_instruction=True, query_instruction=AFTER_SEPARATOR)
    out = tmp_path / "export"
    assert main(["export", "--model", str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "route: module" in printed and "17 prompt tokens" in printed and "16" in printed
    assert modules_of(out)[0] == "llm2emb.export.st_module.LLM2EmbModule"
    with pytest.raises(ValueError, match="trust_remote_code"):
        plain_st(out)
    model = st.SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    got = model.encode_query(QUERIES, batch_size=5)
    assert cosines(got, emb.encode(QUERIES, instruction=AFTER_SEPARATOR)).min() > 0.9999
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "17 prompt tokens" in card


def test_eos_pooling_with_skip_instruction_is_native(tiny_model, tmp_path):
    """EOS pooling reads the last token whatever the prefix: the same vector, so any instruction is native."""
    src, emb = source(tmp_path, tiny_model, pooling="eos", skip_instruction=True, query_instruction=AFTER_SEPARATOR)
    result = export_model(str(src), tmp_path / "export")
    assert result.route == "native" and min(result.checks.values()) > 0.9999
    model = plain_st(tmp_path / "export")
    assert cosines(model.encode_query(QUERIES), emb.encode(QUERIES, instruction=AFTER_SEPARATOR)).min() > 0.9999


# ---------------------------------------------------------------------------------------------- adapters
def test_causal_lora_adapter_is_native(tiny_model, tmp_path):
    src, emb = source(tmp_path, tiny_model, lora=True, pooling="mean", skip_instruction=True,
                      query_instruction=AT_SEPARATOR)
    result = export_model(str(src), tmp_path / "export")
    assert result.route == "native" and result.lora == "adapter", result.route_reasons
    assert min(result.checks.values()) > 0.9999
    folder = tmp_path / "export"
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    model = plain_st(folder)
    assert cosines(model.encode(TEXTS, batch_size=3), emb.encode(TEXTS)).min() > 0.9999
    assert cosines(model.encode_query(QUERIES), emb.encode(QUERIES, instruction=AT_SEPARATOR)).min() > 0.9999
    card = (folder / "README.md").read_text()
    assert "pip install peft" in card and "trust_remote_code" not in card


def test_bidirectional_lora_adapter_needs_merge_for_native(tiny_model, tmp_path):
    src, emb = source(tmp_path, tiny_model, lora=True, pooling="mean", bidirectional=True)
    result = export_model(str(src), tmp_path / "adapter")
    assert result.route == "module" and any("--merge-lora" in r for r in result.route_reasons)
    merged = export_model(str(src), tmp_path / "merged", merge_lora=True)
    assert merged.route == "native"
    assert cosines(plain_st(tmp_path / "merged").encode(TEXTS), emb.encode(TEXTS)).min() > 0.9999


@pytest.mark.parametrize("kwargs, reason", [
    (dict(pooling="attention"), "attention pooling"),
    (dict(pooling="latent_attention", pooling_kwargs={"num_latents": 4, "num_heads": 2}), "latent_attention pooling"),
    (dict(pooling="mean", head="linear", head_dim=32), "linear head"),
])
def test_module_route_only_for_trainable_pooling_and_heads(tiny_model, tmp_path, kwargs, reason):
    src, emb = source(tmp_path, tiny_model, skip_instruction=True, query_instruction=AT_SEPARATOR, **kwargs)
    result = export_model(str(src), tmp_path / "export")
    assert result.route == "module" and any(reason in r for r in result.route_reasons), result.route_reasons
    assert min(result.checks.values()) > 0.9999


# ---------------------------------------------------------------------------------------------- card and CLI
def test_card_and_cli_state_route_and_snippet(tiny_model, tmp_path, capsys):
    src, _ = source(tmp_path, tiny_model, pooling="mean", skip_instruction=True, query_instruction=AT_SEPARATOR)
    out = tmp_path / "shipped"
    assert main(["export", "--model", str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "route: native" in printed and "include_prompt=False" in printed
    card = (out / "README.md").read_text()
    assert "SentenceTransformer('shipped')" in card and "trust_remote_code" not in card
    assert 'model.encode(queries, prompt_name="query")' in card
    assert "| sentence-transformers route | native" in card


# ONNX export: tests/test_onnx_export.py


# ---------------------------------------------------------------------------------------------- seed configs
@pytest.mark.slow
@pytest.mark.parametrize("config", ["config.f2llm.json", "config.mrl_spread.json", "config.mrl_spread.bi_mean.json",
                                    "config.mrl_spread.lora.bi_mean.json"])
def test_seed_configs_export_natively(tiny_model, tmp_path, config):
    """Each seed recipe, trained a few steps, ships as a plain sentence-transformers folder equal to llm2emb
    (English and Chinese, documents and instructed queries)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_support import CONFIGS, prepare_data, quick_overrides, write_raw_data

    data = prepare_data(tiny_model, write_raw_data(tmp_path / "raw"), tmp_path / "tok")
    args = ["train", "--config", str(CONFIGS / config), "--no-progress"]
    for item in quick_overrides(tiny_model, data, tmp_path, steps=3, mrl_dims=[16, 32]):
        args += ["--set", item]
    assert main(args) == 0
    run = tmp_path / "runs" / "exp"
    trained = Embedder.from_pretrained(str(run / "final"))
    instruction = "Instruct: find the module.\nQuery:"
    out = tmp_path / "shipped"
    assert main(["export", "--model", str(run), "--output", str(out), "--merge-lora",
                 "--query-instruction", instruction]) == 0
    model = plain_st(out)
    docs = TEXTS + ["sorting lists is done by the list sorting module in step 0."]
    assert cosines(model.encode(docs), trained.encode(docs)).min() > 0.9999
    queries = ["how are sorting lists handled?", "列表如何排序？"]
    assert cosines(model.encode_query(queries), trained.encode(queries, instruction=instruction)).min() > 0.9999
