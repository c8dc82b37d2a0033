"""End tokens per tokenizer (Qwen3-Embedding-style post-processors) and skip-instruction prefixes derived
from the instruction actually prepended."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from llm2emb.errors import UserError
from llm2emb.model.tokenization import encode_texts, instruction_prefix_end, resolve_end_tokens

ENDOFTEXT, IM_START, IM_END = 0, 1, 2   # SmolLM2's vocabulary; its eos_token is <|im_end|>


@pytest.fixture(scope="module")
def qwen3_style_dir(tmp_path_factory, tiny_model):
    """The tiny model with a tokenizer whose post-processor appends <|endoftext|> while eos is <|im_end|>,
    as Qwen3-Embedding's does (QwenLM/Qwen3-Embedding issue 122)."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3-style")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", ENDOFTEXT)])
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen3_style_tokenizer(qwen3_style_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_style_dir)
    assert tok.eos_token_id == IM_END and tok("hi")["input_ids"][-1] == ENDOFTEXT
    return tok


def test_auto_keeps_the_post_processors_token_once_and_last(qwen3_style_tokenizer):
    tok = qwen3_style_tokenizer
    assert resolve_end_tokens(tok) == (ENDOFTEXT,)
    ids = encode_texts(tok, ["hello world", "x " * 50], 8).input_ids
    assert ids[0][-1] == ENDOFTEXT and IM_END not in ids[0] and ids[0].count(ENDOFTEXT) == 1
    assert len(ids[1]) == 8 and ids[1][-1] == ENDOFTEXT  # truncation keeps it last
    # explicit settings
    assert encode_texts(tok, ["hello world"], 8, end_token="eos").input_ids[0][-2:] != [ENDOFTEXT, IM_END]
    assert encode_texts(tok, ["hello world"], 8, end_token="eos").input_ids[0][-1] == IM_END
    assert ENDOFTEXT not in encode_texts(tok, ["hello world"], 8, end_token="eos").input_ids[0]
    assert encode_texts(tok, ["hello world"], 8, end_token="<|im_start|>").input_ids[0][-1] == IM_START
    assert encode_texts(tok, ["hello world"], 8, end_token="none").input_ids == \
        [tok("hello world")["input_ids"]]


def test_auto_appends_eos_when_the_tokenizer_appends_nothing(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain = tok("hello world", add_special_tokens=False)["input_ids"]
    assert resolve_end_tokens(tok) == (tok.eos_token_id,)
    assert encode_texts(tok, ["hello world"], 16).input_ids == [plain + [tok.eos_token_id]]
    assert encode_texts(tok, ["hello world"], 16, end_token="none").input_ids == [plain]


@pytest.mark.parametrize("bad", ["hello world", "not-a-token-xyz", ""])
def test_end_token_string_must_be_one_token(qwen3_style_tokenizer, bad):
    with pytest.raises(UserError, match="end_token"):
        resolve_end_tokens(qwen3_style_tokenizer, bad)


def test_embedder_records_the_resolved_end_token(qwen3_style_dir, tmp_path):
    from llm2emb import Embedder

    emb = Embedder.from_pretrained(qwen3_style_dir, pooling="eos")
    assert emb.tokenize(["hello"]).input_ids[0][-1] == ENDOFTEXT
    emb.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "llm2emb_config.json").read_text())
    assert (saved["end_token"], saved["end_token_ids"]) == ("auto", [ENDOFTEXT])
    again = Embedder.from_pretrained(tmp_path / "m", end_token="eos")
    assert again.tokenize(["hello"]).input_ids[0][-1] == IM_END and again.config.end_token_ids == [IM_END]
    with pytest.raises(UserError, match="end_token 'two words' is not a single token"):
        Embedder.from_pretrained(qwen3_style_dir, end_token="two words")


def test_prepare_records_end_tokens_and_training_refuses_a_mismatch(qwen3_style_dir, tmp_path):
    from llm2emb import Embedder
    from llm2emb.config import load_train_config
    from llm2emb.data.tokenize import prepare
    from llm2emb.train.trainer import check_data

    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"query": ["a b", "c d", "e f"], "passage": ["x y", "z w", "u v"]}).to_parquet(raw / "d.parquet")
    out = tmp_path / "tok"
    prepare(str(qwen3_style_dir), raw, out, max_seq_length=16, workers=1, progress=False)
    info = json.loads((out / "prepare_info.json").read_text())
    assert (info["end_token"], info["end_token_ids"]) == ("auto", [ENDOFTEXT])
    ids = pd.read_parquet(out / "d.parquet")["passage_input_ids"].tolist()
    assert all(list(row)[-1] == ENDOFTEXT and IM_END not in list(row) for row in ids)

    def cfg(end_token: str):
        return load_train_config(None, model_path=str(qwen3_style_dir), experiment_id="e", end_token=end_token,
                                 train_data_path=str(out), output_dir=str(tmp_path / "runs"))

    ok = cfg("auto")
    check_data(ok, Embedder.from_pretrained(qwen3_style_dir, end_token=ok.end_token))
    bad = cfg("eos")
    with pytest.raises(UserError, match=r"ends texts with token ids \[0\].*--end-token eos"):
        check_data(bad, Embedder.from_pretrained(qwen3_style_dir, end_token=bad.end_token))


# ----------------------------------------------------------------------------- skip-instruction prefixes

def test_instruction_prefix_end():
    assert instruction_prefix_end("Instruct: find code\nQuery: ", "Query:") == len("Instruct: find code\nQuery:")
    assert instruction_prefix_end("Represent this: ", "Query:") == len("Represent this: ")
    assert instruction_prefix_end(None, "Query:") == 0 and instruction_prefix_end("", "Query:") == 0


def test_documents_containing_the_separator_get_no_prefix(tiny_model):
    from llm2emb import Embedder

    docs = ["Query: this document happens to start like a query", "a plain document. Query: and more text"]
    skip = Embedder.from_pretrained(tiny_model, pooling="mean", skip_instruction=True)
    plain = Embedder.from_pretrained(tiny_model, pooling="mean", skip_instruction=False)
    assert skip.tokenize(docs).prefix_lengths == [0, 0]
    np.testing.assert_allclose(skip.encode(docs), plain.encode(docs), atol=1e-6)
    # an instructed query: exactly the instruction's tokens are skipped, also when the query repeats "Query:"
    instruction = "Instruct: find code\nQuery: "
    encoded = skip.tokenize(["Query: what is x"], instruction=instruction)
    alone = skip.tokenizer(instruction.rstrip(), add_special_tokens=True)["input_ids"]
    assert encoded.prefix_lengths == [len(alone)]
