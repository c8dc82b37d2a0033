"""Representations on tiny random models: multi-vector token sets and sparse LM-head weights against direct
computations from unpadded forward passes, padding sides, the attention sink, tied / untied LM heads, a
model without an LM head, save / load / LoRA round trips."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.model.representations import REPRESENTATION_REGISTRY, special_token_ids
from llm2emb.model.representations.encoding import encode_heads

TEXTS = ["sorting lists in place", "a much longer text about parsing dates and times in files", "x",
         "hashing strings"]


def test_registry_names():
    assert set(REPRESENTATION_REGISTRY) == {"dense", "multi_vector", "sparse", "hybrid"}


def _unpadded_states(embedder: Embedder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return embedder.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]


def _kept(embedder: Embedder, ids: list[int], skip_first: bool) -> list[int]:
    special = set(special_token_ids(embedder))
    keep = [i for i, t in enumerate(ids) if t not in special and not (skip_first and i == 0)]
    return keep or list(range(len(ids)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_multi_vector_token_sets_equal_unpadded_projection(tiny_model, side):
    emb = Embedder.from_pretrained(tiny_model, representation="multi_vector", padding_side=side, max_length=32,
                                   representation_options={"token_dim": 16})
    out = encode_heads(emb, TEXTS, batch_size=4)
    weight = emb.representation.projection.weight.detach()
    for i, text in enumerate(TEXTS):
        ids = emb.tokenize([text]).input_ids[0]
        states = _unpadded_states(emb, ids)
        keep = _kept(emb, ids, skip_first=False)
        expected = torch.nn.functional.normalize(states[keep] @ weight.T, dim=-1).numpy()
        assert ids[-1] == 2 and len(ids) - 1 not in keep or len(ids) == 1  # the EOS is a special token
        np.testing.assert_allclose(out.multi_vector[i], expected, atol=2e-5)


def test_multi_vector_keeps_special_tokens_when_asked(tiny_model):
    emb = Embedder.from_pretrained(tiny_model, representation="multi_vector", max_length=32,
                                   representation_options={"skip_special_tokens": False})
    out = encode_heads(emb, TEXTS)
    lengths = [len(emb.tokenize([t]).input_ids[0]) for t in TEXTS]
    assert out.multi_vector.lengths.tolist() == lengths


def _causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("skip_first", [True, False])
def test_sparse_equals_max_pooled_lm_logits(tiny_model, side, skip_first):
    """log(1 + relu(logits)) of the causal LM's own forward pass, max over the kept tokens."""
    emb = Embedder.from_pretrained(tiny_model, representation="sparse", padding_side=side, max_length=32,
                                   representation_options={"sparse_skip_first": skip_first,
                                                           "sparse_doc_top_k": 0})
    out = encode_heads(emb, TEXTS, batch_size=4).sparse.toarray()
    lm = _causal_lm(tiny_model)
    for i, text in enumerate(TEXTS):
        ids = emb.tokenize([text]).input_ids[0]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0]
        keep = _kept(emb, ids, skip_first)
        expected = torch.log1p(torch.relu(logits[keep])).max(dim=0).values.numpy()
        np.testing.assert_allclose(out[i], expected, atol=1e-4)


def test_sparse_first_position_attention_sink_is_not_pooled(tiny_model):
    """A huge first-position state (what massive activations look like) changes nothing with
    sparse_skip_first, and dominates the weights without it."""
    texts = TEXTS[:2]

    def weights(skip_first: bool, sink: bool) -> np.ndarray:
        emb = Embedder.from_pretrained(tiny_model, representation="sparse", padding_side="left", max_length=32,
                                       representation_options={"sparse_skip_first": skip_first,
                                                               "sparse_doc_top_k": 0})
        if sink:
            def hook(module, args, output):
                mask = emb._sink_mask
                return output + 1000.0 * mask.unsqueeze(-1) * output
            emb.backbone.norm.register_forward_hook(hook)
            original = emb.hidden_states

            def hidden_states(input_ids, attention_mask, padded=None):
                idx = (attention_mask.long().cumsum(1) - 1)
                emb._sink_mask = ((idx == 0) & attention_mask.bool()).to(torch.float32)
                return original(input_ids, attention_mask, padded)
            emb.hidden_states = hidden_states
        return encode_heads(emb, texts, batch_size=2).sparse.toarray()

    np.testing.assert_allclose(weights(True, sink=True), weights(True, sink=False), atol=1e-5)
    assert np.abs(weights(False, sink=True) - weights(False, sink=False)).max() > 1.0


def test_sparse_untied_lm_head_is_loaded_saved_and_reloaded(untied_model, tmp_path):
    emb = Embedder.from_pretrained(untied_model, representation="sparse", max_length=32,
                                   representation_options={"sparse_doc_top_k": 0})
    assert not emb.representation.tied
    lm = _causal_lm(untied_model)
    assert not torch.equal(lm.lm_head.weight, lm.get_input_embeddings().weight)
    torch.testing.assert_close(emb.representation.lm_head.weight, lm.lm_head.weight.detach())
    out = encode_heads(emb, TEXTS).sparse.toarray()
    ids = emb.tokenize([TEXTS[1]]).input_ids[0]
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log1p(torch.relu(logits[_kept(emb, ids, True)])).max(0).values.numpy()
    np.testing.assert_allclose(out[1], expected, atol=1e-4)
    emb.save(tmp_path / "saved")  # AutoModel saves no lm_head: it travels in modules.safetensors
    again = Embedder.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(encode_heads(again, TEXTS).sparse.toarray(), out)


def test_sparse_on_a_model_without_lm_head_is_a_user_error(untied_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "no-head"
    AutoModel.from_pretrained(untied_model).save_pretrained(folder)
    AutoTokenizer.from_pretrained(untied_model).save_pretrained(folder)
    Embedder.from_pretrained(folder, representation="multi_vector")  # fine without an LM head
    with pytest.raises(UserError, match="no LM head"):
        Embedder.from_pretrained(folder, representation="sparse")


def _arrays(encoded, head):
    value = getattr(encoded, head)
    return value.vectors if hasattr(value, "vectors") else value.toarray() if hasattr(value, "toarray") else value


def _reinit(emb: Embedder) -> Embedder:
    """Trained-looking representation weights (not their init), the same for every call."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in emb.representation.parameters():
            if p.requires_grad:
                p.normal_(generator=gen)
    return emb


@pytest.mark.parametrize("representation", ["multi_vector", "sparse", "hybrid"])
def test_save_load_round_trip_and_bidirectional_padding(tiny_model, tmp_path, representation):
    kwargs = dict(representation=representation, max_length=32)
    right = _reinit(Embedder.from_pretrained(tiny_model, padding_side="right", bidirectional=True, **kwargs))
    left = _reinit(Embedder.from_pretrained(tiny_model, padding_side="left", bidirectional=True, **kwargs))
    causal = _reinit(Embedder.from_pretrained(tiny_model, padding_side="left", **kwargs))
    a, b, c = (encode_heads(e, TEXTS, batch_size=4) for e in (right, left, causal))
    for head in right.representation.head_names:
        np.testing.assert_allclose(_arrays(a, head), _arrays(b, head), atol=2e-5)  # padding side: no change
        assert np.abs(_arrays(a, head) - _arrays(c, head)).max() > 1e-4          # bidirectional is not causal
    right.save(tmp_path / "m")
    again = Embedder.from_pretrained(tmp_path / "m")
    assert again.config.representation == representation and again.config.bidirectional
    d = encode_heads(again, TEXTS, batch_size=4)
    for head in right.representation.head_names:
        np.testing.assert_array_equal(_arrays(a, head), _arrays(d, head))


def test_lora_multi_vector_adapter_round_trip(tiny_model, tmp_path):
    emb = Embedder.from_pretrained(tiny_model, representation="hybrid", max_length=32,
                                   representation_options={"hybrid_heads": ["sparse", "multi_vector"],
                                                           "hybrid_weights": [0.5, 1.0]})
    emb.add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in emb.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(5))
    before = encode_heads(emb, TEXTS)
    emb.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    again = Embedder.from_pretrained(tmp_path / "adapter")
    after = encode_heads(again, TEXTS)
    np.testing.assert_allclose(before.multi_vector.vectors, after.multi_vector.vectors, atol=1e-5)
    np.testing.assert_allclose(before.sparse.toarray(), after.sparse.toarray(), atol=1e-4)
    assert after.dense is None


def test_encode_refuses_models_without_dense_head_and_hybrid_gives_its_dense_head(tiny_model):
    mv = Embedder.from_pretrained(tiny_model, representation="multi_vector", max_length=32)
    with pytest.raises(UserError, match="no dense vector"):
        mv.encode(["x"])
    hybrid = Embedder.from_pretrained(tiny_model, representation="hybrid", max_length=32)
    dense = Embedder.from_pretrained(tiny_model, max_length=32)
    np.testing.assert_allclose(hybrid.encode(TEXTS), dense.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(encode_heads(hybrid, TEXTS).dense, dense.encode(TEXTS), atol=1e-6)


def test_sparse_top_k_pruning_keeps_the_largest_weights(tiny_model):
    full = Embedder.from_pretrained(tiny_model, representation="sparse", max_length=32,
                                    representation_options={"sparse_doc_top_k": 0, "sparse_query_top_k": 5})
    dense_rows = encode_heads(full, TEXTS, role="document").sparse.toarray()
    pruned = encode_heads(full, TEXTS, role="query").sparse
    assert (np.diff(pruned.indptr) <= 5).all()
    for i in range(len(TEXTS)):
        top = np.sort(dense_rows[i])[::-1][:5]
        np.testing.assert_allclose(np.sort(pruned[i].toarray()[0])[::-1][:5], top, atol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"token_dim": 0}, "token_dim must be an integer >= 1"),
    ({"hybrid_heads": ["dense", "sparse"], "hybrid_weights": [1.0]}, "one weight per head"),
    ({"hybrid_heads": ["dense", "colbert"]}, "hybrid_heads must list"),
    ({"sparse_doc_top_k": -1}, "sparse_doc_top_k"),
    ({"tokn_dim": 3}, "Did you mean 'token_dim'"),
])
def test_bad_representation_options_are_user_errors(tiny_model, options, match):
    with pytest.raises(UserError, match=match):
        Embedder.from_pretrained(tiny_model, representation="hybrid", representation_options=options)


def test_unknown_representation_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="Did you mean 'sparse'"):
        Embedder.from_pretrained(tiny_model, representation="sparce")
