"""Pooling modes, heads, skip-instruction, and left/right padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.model.heads import HEAD_REGISTRY
from llm2emb.model.pooling import POOLING_REGISTRY, build_pooling, content_mask, token_index

TEXTS = ["short", "a somewhat longer sentence with more tokens", "中文文本也可以", ""]


def test_token_index_left_and_right():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert token_index(right).tolist() == [[0, 1, 2, -1], [0, 1, 2, 3]]
    assert token_index(left).tolist() == [[-1, 0, 1, 2], [0, 1, 2, 3]]
    assert content_mask(left, torch.tensor([1, 4])).tolist() == [[False, False, True, True]] + [[True] * 4]


def test_eos_mean_weighted_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right padded, row 1 left padded
    eos = build_pooling("eos", 2)(hidden, mask)
    assert eos.tolist() == [hidden[0, 1].tolist(), hidden[1, 2].tolist()]
    mean = build_pooling("mean", 2)(hidden, mask)
    assert torch.allclose(mean[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    assert torch.allclose(mean[1], (hidden[1, 1] + hidden[1, 2]) / 2)
    weighted = build_pooling("weighted_mean", 2)(hidden, mask)
    assert torch.allclose(weighted[0], (1 * hidden[0, 0] + 2 * hidden[0, 1]) / 3)
    assert torch.allclose(weighted[1], (1 * hidden[1, 1] + 2 * hidden[1, 2]) / 3)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", sorted(POOLING_REGISTRY))
def test_each_pooling_shape_finite_and_padding_invariant(tiny_model, pooling, side):
    emb = Embedder.from_pretrained(str(tiny_model), pooling=pooling, padding_side=side)
    vecs = emb.encode(TEXTS, batch_size=4)
    assert vecs.shape == (len(TEXTS), 64) and np.isfinite(vecs).all()
    alone = np.stack([emb.encode([t])[0] for t in TEXTS])
    assert np.abs(vecs - alone).max() < 1e-5


@pytest.mark.parametrize("head", sorted(HEAD_REGISTRY))
def test_heads_shape(tiny_model, head):
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean", head=head, head_dim=16)
    vecs = emb.encode(TEXTS)
    assert vecs.shape == (len(TEXTS), 16) and np.isfinite(vecs).all()
    assert emb.embedding_dim == 16


@pytest.mark.parametrize("side", ["right", "left"])
def test_skip_instruction_means_only_text_tokens(tiny_model, side):
    instruction = "Instruct: find the matching passage\nQuery: "
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean", skip_instruction=True,
                                   instruction_separator="Query:", padding_side=side)
    text = "where is the cat"
    vec = emb.encode([text, "a longer second text to force padding here"], instruction=instruction,
                     normalize=False)[0]
    ids = emb.tokenizer(instruction + text)["input_ids"] + [emb.tokenizer.eos_token_id]
    query_ids = emb.tokenizer(" where is the cat")["input_ids"]
    with torch.no_grad():
        hidden = emb.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
    n_text = len(query_ids) + 1  # text tokens + EOS
    expected = hidden[-n_text:].mean(0).numpy()
    assert np.abs(vec - expected).max() < 1e-5
    plain = Embedder.from_pretrained(str(tiny_model), pooling="mean").encode([text], instruction=instruction,
                                                                             normalize=False)[0]
    assert np.abs(plain - hidden.mean(0).numpy()).max() < 1e-5
    assert np.abs(plain - vec).max() > 1e-4


def test_unknown_pooling_and_head(tiny_model):
    with pytest.raises(UserError, match="Unknown pooling mode 'maen'.*Did you mean 'mean'"):
        Embedder.from_pretrained(str(tiny_model), pooling="maen")
    with pytest.raises(UserError, match="Unknown head"):
        Embedder.from_pretrained(str(tiny_model), head="transformer")
