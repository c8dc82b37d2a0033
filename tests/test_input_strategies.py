"""Input strategies (llm2emb.model.input_strategies): echo and PromptEOL tokenised token by token as their
papers' templates, the pooled positions against a direct computation over the backbone's hidden states,
shortening inside the template, the strategy kept by save / load, prepared training data for PromptEOL, and
one sentence for each combination a strategy cannot serve."""
from __future__ import annotations

import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.model.input_strategies import INPUT_STRATEGIES
from llm2emb.model.tokenization import encode_texts

ECHO = "Rewrite the sentence: {x}, rewritten sentence: {x}"
EOL = 'This sentence : "{x}" means in one word:"'
TEXT = "sorting lists is done by the list module"
INSTRUCTION = "Instruct: find the code.\nQuery: "


@pytest.fixture(scope="module")
def tok(tiny_model):
    return Embedder.from_pretrained(str(tiny_model)).tokenizer


def test_registered():
    assert {"plain", "echo", "prompteol"} <= set(INPUT_STRATEGIES)


def test_echo_tokens_and_pooled_span(tok):
    enc = encode_texts(tok, [INSTRUCTION + TEXT, TEXT], 128, input_strategy="echo",
                       instruction_length=[len(INSTRUCTION), 0])
    for ids, prefix, instruction in zip(enc.input_ids, enc.prefix_lengths, (INSTRUCTION, "")):
        want = tok(instruction + ECHO.format(x=TEXT), add_special_tokens=True)["input_ids"]
        assert ids == want                                  # no end token after the second copy
        assert tok.eos_token_id not in ids
        assert tok.decode(ids[prefix:]).strip() == TEXT     # exactly the second copy is pooled
        assert tok.decode(ids[:prefix]).endswith("rewritten sentence:")


def test_prompteol_tokens_end_at_the_closing_quote(tok):
    enc = encode_texts(tok, [INSTRUCTION + TEXT], 128, input_strategy="prompteol",
                       instruction_length=len(INSTRUCTION))
    ids = enc.input_ids[0]
    assert ids == tok(INSTRUCTION + EOL.format(x=TEXT), add_special_tokens=True)["input_ids"]
    assert tok.decode(ids[-1:]).endswith('"') and tok.eos_token_id not in ids


def test_long_texts_are_shortened_inside_the_template(tok):
    long = " ".join(["parsing"] * 200)
    for name, ending in (("echo", None), ("prompteol", 'means in one word:"')):
        enc = encode_texts(tok, [long], 40, input_strategy=name)
        ids = enc.input_ids[0]
        assert len(ids) <= 40 and enc.truncated == 1
        text = tok.decode(ids)
        if ending:
            assert text.endswith(ending)
        else:   # both copies cut alike: the pooled span is the second copy
            first = text.split("Rewrite the sentence: ")[1].split(", rewritten sentence:")[0]
            assert tok.decode(ids[enc.prefix_lengths[0]:]).strip() == first.strip()
    with pytest.raises(UserError, match="too short for input_strategy prompteol"):
        encode_texts(tok, ["x"], 5, input_strategy="prompteol")


def _hidden(embedder, ids):
    with torch.no_grad():
        return embedder.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_pooled_positions_match_a_direct_computation(tiny_model, tmp_path):
    echo = Embedder.from_pretrained(str(tiny_model), pooling="mean", input_strategy="echo")
    enc = echo.tokenize([TEXT], instruction=INSTRUCTION)
    want = _hidden(echo, enc.input_ids[0])[enc.prefix_lengths[0]:].mean(dim=0)
    got = echo.encode([TEXT], instruction=INSTRUCTION, normalize=False)[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    # Matryoshka: the first dims of the same vector
    short = echo.encode([TEXT], instruction=INSTRUCTION, normalize=False, dim=16)[0]
    torch.testing.assert_close(torch.from_numpy(short), want[:16], rtol=1e-4, atol=1e-5)

    eol = Embedder.from_pretrained(str(tiny_model), pooling="eos", input_strategy="prompteol")
    ids = eol.tokenize([TEXT]).input_ids[0]
    got = eol.encode([TEXT, TEXT + " and more"], normalize=False)[0]   # padded batch: still the quote's state
    torch.testing.assert_close(torch.from_numpy(got), _hidden(eol, ids)[-1], rtol=1e-4, atol=1e-5)

    eol.save(tmp_path / "eol")
    again = Embedder.from_pretrained(str(tmp_path / "eol"))
    assert again.config.input_strategy == "prompteol"
    torch.testing.assert_close(torch.from_numpy(again.encode([TEXT])), torch.from_numpy(eol.encode([TEXT])))


@pytest.mark.parametrize("kwargs, message", [
    ({"input_strategy": "echo", "pooling": "eos"}, "input_strategy echo needs pooling mean or weighted_mean"),
    ({"input_strategy": "prompteol", "pooling": "mean"}, "input_strategy prompteol needs pooling eos"),
    ({"input_strategy": "echo", "pooling": "mean", "representation": "multi_vector"}, "representation dense"),
    ({"input_strategy": "prompteol", "pooling": "eos", "bidirectional": True}, "exists for causal attention"),
    ({"input_strategy": "ecko"}, "Did you mean 'echo'"),
])
def test_combinations_a_strategy_cannot_serve_are_one_sentence(tiny_model, kwargs, message):
    with pytest.raises(UserError, match=message):
        Embedder.from_pretrained(str(tiny_model), **kwargs)


def test_training_config_refuses_echo_and_checks_the_pooling():
    base = {"model_path": "m", "experiment_id": "e", "train_data_path": "d"}
    with pytest.raises(UserError, match="input_strategy echo cannot be trained yet"):
        load_train_config(None, **base, input_strategy="echo", pooling_mode="mean")
    with pytest.raises(UserError, match="needs pooling eos"):
        load_train_config(None, **base, input_strategy="prompteol", pooling_mode="mean")
    assert load_train_config(None, **base, input_strategy="prompteol").input_strategy == "prompteol"


def test_prepared_prompteol_data_is_what_encode_gives(tiny_model, tmp_path):
    import pyarrow.parquet as pq
    from test_train_support import write_raw_data

    from llm2emb.data.tokenize import prepare

    raw = write_raw_data(tmp_path / "raw", retrieval_rows=6, classification_rows=4, k=1)
    prepare(str(tiny_model), raw, tmp_path / "p", max_seq_length=64, workers=1, progress=False,
            input_strategy="prompteol")
    eol = Embedder.from_pretrained(str(tiny_model), pooling="eos", input_strategy="prompteol", max_length=64)
    table = pq.read_table(tmp_path / "p" / "facts.parquet").to_pydict()
    frame = __import__("pandas").read_parquet(raw / "facts.parquet")
    instruction = "Instruct: find the module.\nQuery: "
    assert table["query_input_ids"][0] == eol.tokenize([frame["query"][0]], instruction=instruction).input_ids[0]
    assert table["passage_input_ids"][0] == eol.tokenize([frame["passage"][0]]).input_ids[0]
    with pytest.raises(UserError, match="different input_strategy"):
        prepare(str(tiny_model), raw, tmp_path / "p", max_seq_length=64, workers=1, progress=False)
    with pytest.raises(UserError, match="--input-strategy echo"):
        prepare(str(tiny_model), raw, tmp_path / "e", max_seq_length=64, workers=1, progress=False,
                input_strategy="echo")


def test_exports_of_a_strategy_take_the_llm2emb_module_route(tiny_model):
    """sentence-transformers' tokenizer and Pooling cannot apply a template (nor ONNX, which needs the plain
    route): the export goes through LLM2EmbModule, which tokenises with Embedder.tokenize."""
    from llm2emb.export.st_format import native_route_blockers

    eol = Embedder.from_pretrained(str(tiny_model), pooling="eos", input_strategy="prompteol")
    assert any("input_strategy prompteol" in r for r in native_route_blockers(eol.config, False, eol.tokenizer))
    plain = Embedder.from_pretrained(str(tiny_model), pooling="eos")
    assert not any("input_strategy" in r for r in native_route_blockers(plain.config, False, plain.tokenizer))


def test_a_strategy_refuses_a_second_cut_at_batch_time():
    with pytest.raises(UserError, match="set query_max_length to null"):
        load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", input_strategy="prompteol",
                          max_seq_length=160, query_max_length=64)


def test_prompteol_trains_and_reloads(tiny_model, tmp_path):
    """A PromptEOL run on data prepared for it: the final folder keeps the strategy (its texts end at the
    closing quote), and data prepared plainly is refused for it."""
    from test_train_support import quick_overrides, write_raw_data

    from llm2emb.data.tokenize import prepare
    from llm2emb.train import train

    raw = write_raw_data(tmp_path / "raw", retrieval_rows=16, classification_rows=8, k=2)
    data = tmp_path / "eol"
    prepare(str(tiny_model), raw, data, max_seq_length=48, workers=1, progress=False, input_strategy="prompteol")
    fields = {"pooling_mode": "eos", "input_strategy": "prompteol", "max_seq_length": 48, "lora_enabled": True}
    whole = load_train_config(None, quick_overrides(tiny_model, data, tmp_path, experiment="whole", steps=4,
                                                    **fields))
    train(whole, show_progress=False)
    final = Embedder.from_pretrained(str(whole.run_dir / "final"))
    assert final.config.input_strategy == "prompteol" and final.config.pooling == "eos"
    assert final.tokenize([TEXT]).input_ids[0][-1] == final.tokenize(["x"]).input_ids[0][-1]   # the quote

    plain = tmp_path / "plain"
    prepare(str(tiny_model), raw, plain, max_seq_length=48, workers=1, progress=False)
    wrong = load_train_config(None, quick_overrides(tiny_model, plain, tmp_path, experiment="wrong", steps=1,
                                                    **fields))
    with pytest.raises(UserError, match="prepared with input strategy 'plain'"):
        train(wrong, show_progress=False)
