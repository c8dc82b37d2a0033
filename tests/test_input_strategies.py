"""Input strategies (llm2emb.model.input_strategies): echo and PromptEOL tokenised token by token as their
papers' templates, the pooled positions against a direct computation over the backbone's hidden states,
shortening inside the template, the strategy kept by save / load, prepared training data for PromptEOL and
echo (every text's pooled span), echo training whose forward pools what Embedder.encode pools, exact resume of
a strategy run, and one sentence for each combination a strategy cannot serve."""
from __future__ import annotations

from pathlib import Path

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


def test_training_config_checks_the_pooling():
    base = {"model_path": "m", "experiment_id": "e", "train_data_path": "d"}
    with pytest.raises(UserError, match="needs pooling mean or weighted_mean"):
        load_train_config(None, **base, input_strategy="echo", pooling_mode="eos")
    with pytest.raises(UserError, match="needs pooling eos"):
        load_train_config(None, **base, input_strategy="prompteol", pooling_mode="mean")
    with pytest.raises(UserError, match="representation dense"):
        load_train_config(None, **base, input_strategy="echo", pooling_mode="mean", representation="sparse")
    with pytest.raises(UserError, match="on-the-fly teacher reads the student's token ids back as text"):
        load_train_config(None, **base, input_strategy="echo", pooling_mode="mean", teacher_model="t",
                          losses=[{"name": "contrastive"}, {"name": "distill_kl"}])
    assert load_train_config(None, **base, input_strategy="prompteol").input_strategy == "prompteol"
    assert load_train_config(None, **base, input_strategy="echo", pooling_mode="mean").input_strategy == "echo"


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
    # PromptEOL pools the last token of every text: no span columns beyond the query's
    assert [c for c in table if c.endswith("_prefix_length")] == ["query_prefix_length"]


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


# ---------------------------------------------------------------------------------------------- echo training

def _first_copy(tok, ids: list[int]) -> str:
    """The text of the first copy of an echo input (between the template's two parts)."""
    return tok.decode(ids).split("Rewrite the sentence: ", 1)[1].split(", rewritten sentence:", 1)[0]


@pytest.fixture(scope="module")
def echo_data(tiny_model, tmp_path_factory):
    from test_train_support import write_raw_data

    from llm2emb.data.tokenize import prepare

    root = tmp_path_factory.mktemp("echo")
    raw = write_raw_data(root / "raw", retrieval_rows=16, classification_rows=8, k=2)
    prepare(str(tiny_model), raw, root / "echo", max_seq_length=96, workers=1, progress=False,
            input_strategy="echo")
    return raw, root / "echo"


def test_echo_prepared_batches_pool_exactly_the_second_copy(tiny_model, tok, echo_data):
    """Every text of every prepared batch (queries with their instruction, positives, hard negatives) reaches
    the pooling with the span of its second copy, the one Embedder.tokenize gives for its raw text."""
    import json

    from llm2emb.data.batching import MultiTaskBatcher
    from llm2emb.train.encode import collate_batch

    raw, data = echo_data
    assert json.loads((data / "prepare_info.json").read_text())["format_version"] == 2
    echo = Embedder.from_pretrained(str(tiny_model), pooling="mean", input_strategy="echo", max_length=96)
    batcher = MultiTaskBatcher(data, batch_size=4, num_hard_neg=2, validation_fraction=0.0)
    seen = {"queries": 0, "passages": 0, "negatives": 0}
    for batch in batcher:
        encoded = collate_batch(echo, batch, 96, 96)
        for side in seen:
            inputs = getattr(encoded, side)
            if inputs is None:
                continue
            for ids, mask, start in zip(inputs["input_ids"], inputs["attention_mask"], inputs["prefix_lengths"]):
                ids = ids[mask.bool()].tolist()
                assert tok.decode(ids[int(start):]).strip() == _first_copy(tok, ids).strip()
                assert tok.decode(ids[:int(start)]).endswith("rewritten sentence:")
                seen[side] += 1
    assert all(seen.values()), seen
    # the same ids and span as Embedder.tokenize for the raw texts
    import pandas as pd
    import pyarrow.parquet as pq

    frame = pd.read_parquet(raw / "facts.parquet")
    table = pq.read_table(data / "facts.parquet").to_pydict()
    instruction = "Instruct: find the module.\nQuery: "
    for column, text, given in (("query", frame["query"][0], instruction), ("passage", frame["passage"][0], None),
                                ("negative_2", frame["negative_2"][0], None)):
        enc = echo.tokenize([text], instruction=given)
        assert table[f"{column}_input_ids"][0] == enc.input_ids[0]
        assert table[f"{column}_prefix_length"][0] == enc.prefix_lengths[0]


def test_echo_data_without_span_columns_is_refused(echo_data, tmp_path):
    """A folder whose parquet lacks a span column (format 1) is refused, never pooled over the whole text."""
    import shutil

    import pyarrow.parquet as pq

    from llm2emb.data.batching import MultiTaskBatcher

    _, data = echo_data
    old = tmp_path / "old"
    shutil.copytree(data, old)
    table = pq.read_table(old / "facts.parquet")
    pq.write_table(table.drop(["passage_prefix_length"]), old / "facts.parquet")
    with pytest.raises(UserError, match="without the 'passage_prefix_length' column .* --overwrite"):
        MultiTaskBatcher(old, batch_size=4, num_hard_neg=2)


def test_echo_trains_and_encode_pools_the_training_span(tiny_model, echo_data, tmp_path):
    """A few LoRA steps of echo with Matryoshka dims and skip-instruction: the final folder keeps echo, and its
    vectors from the training forward (prepared ids, collate_batch, TripletEncoder) equal Embedder.encode's of
    the raw texts, in fp32, for queries (with instruction), positives and hard negatives."""
    import pandas as pd

    from test_train_support import quick_overrides

    from llm2emb.data.batching import MultiTaskBatcher
    from llm2emb.train import train
    from llm2emb.train.encode import TripletEncoder, collate_batch

    raw, data = echo_data
    fields = {"pooling_mode": "mean", "input_strategy": "echo", "max_seq_length": 96, "lora_enabled": True,
              "skip_instruction": True, "mrl_enabled": True, "mrl_dims": [16, 32]}
    cfg = load_train_config(None, quick_overrides(tiny_model, data, tmp_path, steps=3, **fields))
    train(cfg, show_progress=False)
    final = Embedder.from_pretrained(str(cfg.run_dir / "final"), precision="fp32")
    assert final.config.input_strategy == "echo" and final.config.pooling == "mean"
    final.eval()

    frame = pd.read_parquet(raw / "facts.parquet")
    instruction = "Instruct: find the module.\nQuery: "
    by_ids = {}
    for column in ("query", "passage", "negative_1", "negative_2"):
        given = instruction if column == "query" else None
        for text, ids in zip(frame[column], final.tokenize(list(frame[column]), instruction=given).input_ids):
            by_ids[tuple(ids)] = (text, given)
    batch = next(b for b in MultiTaskBatcher(data, batch_size=4, num_hard_neg=2, validation_fraction=0.0)
                 if b.dataset == "facts")
    with torch.no_grad():
        q, p, n = TripletEncoder(final)(collate_batch(final, batch, 96, 96))
    for vectors, id_lists in ((q, batch.query_ids), (p, batch.passage_ids),
                              (n.reshape(-1, n.shape[-1]), batch.negative_ids)):
        for vector, ids in zip(vectors, id_lists):
            text, given = by_ids[tuple(ids)]
            want = final.encode([text], instruction=given, normalize=False)[0]
            torch.testing.assert_close(vector, torch.from_numpy(want), rtol=1e-5, atol=1e-5)

    # the trained run exports (LoRA merged) through LLM2EmbModule, which tokenises and pools as encode does
    st = pytest.importorskip("sentence_transformers")
    from llm2emb.export.exporter import export_model

    texts = list(frame["passage"][:3])
    result = export_model(str(cfg.run_dir), tmp_path / "export", merge_lora=True)
    assert result.route == "module"
    got = st.SentenceTransformer(str(tmp_path / "export"), device="cpu", trust_remote_code=True).encode(
        texts, show_progress_bar=False, normalize_embeddings=True)
    assert ((got * final.encode(texts, normalize=True)).sum(1) > 0.9999).all()


@pytest.fixture(scope="module")
def prompteol_data(echo_data, tiny_model):
    from llm2emb.data.tokenize import prepare

    raw, echo = echo_data
    data = echo.parent / "prompteol"
    prepare(str(tiny_model), raw, data, max_seq_length=96, workers=1, progress=False, input_strategy="prompteol")
    return data


@pytest.mark.parametrize("strategy, pooling", [("prompteol", "eos"), ("echo", "mean")])
def test_a_strategy_run_killed_mid_way_resumes_exactly(tiny_model, echo_data, prompteol_data, tmp_path, strategy,
                                                      pooling):
    """A run with an input strategy, killed after its step-2 checkpoint and started again, ends with the
    weights and losses of the run that was never interrupted (LoRA dropout on, so the restored RNG matters);
    resuming it with another input strategy is refused with one sentence (the run's identity)."""
    from test_train_support import quick_overrides, read_metrics, rewind_to_checkpoint, trainable_state

    from llm2emb.train import train

    data = echo_data[1] if strategy == "echo" else prompteol_data
    fields = {"pooling_mode": pooling, "input_strategy": strategy, "max_seq_length": 96, "lora_enabled": True,
              "lora_dropout": 0.1, "steps": 4, "checkpointing_steps": 2, "validation_steps": 0,
              "mrl_enabled": True, "mrl_dims": [16, 32]}
    full = load_train_config(None, quick_overrides(tiny_model, data, tmp_path / "a", **fields))
    train(full, show_progress=False)
    crashed = load_train_config(None, quick_overrides(tiny_model, data, tmp_path / "b", **fields))
    train(crashed, show_progress=False)
    rewind_to_checkpoint(crashed.run_dir, 4)   # killed after the step-2 checkpoint

    other = {"echo": ("prompteol", "eos", prompteol_data), "prompteol": ("echo", "mean", echo_data[1])}[strategy]
    changed = load_train_config(None, quick_overrides(tiny_model, other[2], tmp_path / "b", **{
        **fields, "input_strategy": other[0], "pooling_mode": other[1]}))
    with pytest.raises(UserError, match=f"holds a different experiment: input_strategy \\('{strategy}' there, "
                                        f"'{other[0]}' now\\)"):
        train(changed, show_progress=False)

    result = train(crashed, show_progress=False)
    assert result.resumed_from == 2
    a, b = trainable_state(full.run_dir / "final"), trainable_state(crashed.run_dir / "final")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(m["step"], m["loss"]) for m in read_metrics(run) if m["type"] == "train"]
    assert losses(crashed.run_dir) == losses(full.run_dir)
    assert Embedder.from_pretrained(str(crashed.run_dir / "final")).config.input_strategy == strategy


def test_a_pipeline_stage_prepares_its_data_for_its_input_strategy(tiny_model, echo_data, tmp_path):
    """A pipeline training stage with input_strategy echo gets echo data (with every text's span), not plain
    data that training would then refuse."""
    import json
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from llm2emb.pipeline.data import prepare_stage_data

    raw, _ = echo_data
    stage = SimpleNamespace(name="echo", data=str(raw), simcse=False, teacher=None)
    _, prepared = prepare_stage_data(stage, str(tiny_model), {"input_strategy": "echo", "max_seq_length": 96}, {},
                                     tmp_path / "stage")
    assert json.loads((Path(prepared) / "prepare_info.json").read_text())["input_strategy"] == "echo"
    assert "negative_1_prefix_length" in pq.read_table(Path(prepared) / "facts.parquet").column_names


def test_echo_gradient_cache_equals_the_uncached_step(tiny_model, echo_data):
    """Gradient cache cuts each side into pieces: every piece keeps its texts' spans, so the cached gradients of
    an echo batch (spans on queries, positives and negatives) equal the uncached step's."""
    from test_grad_cache import _assert_equal_grads, _gradients

    from llm2emb.data.batching import MultiTaskBatcher
    from llm2emb.losses.representation import objective_for_config
    from llm2emb.train.encode import collate_batch
    from llm2emb.train.trainer import build_embedder, build_encoder

    cfg = load_train_config(None, model_path=str(tiny_model), experiment_id="e", train_data_path="d",
                            pooling_mode="mean", input_strategy="echo", lora_enabled=True, lora_dropout=0.0,
                            max_seq_length=96)
    torch.manual_seed(0)
    embedder = build_embedder(cfg)
    encoder, objective = build_encoder(embedder), objective_for_config(cfg)
    batch = next(b for b in MultiTaskBatcher(echo_data[1], batch_size=5, num_hard_neg=2, validation_fraction=0.0)
                 if b.dataset == "facts")
    encoded = collate_batch(embedder, batch, 96, 96)
    assert all("prefix_lengths" in side for side in (encoded.queries, encoded.passages, encoded.negatives))
    _assert_equal_grads(_gradients(encoder, objective, encoded, 3), _gradients(encoder, objective, encoded, None))
