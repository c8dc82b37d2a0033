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


# ----------------------------------------------------------------------------- latent attention (NV-Embed)

def _llm_like_hidden(batch: int, length: int, size: int, seed: int = 0) -> torch.Tensor:
    """Hidden states at the scale of a decoder's last layer: unit-scale tokens around a shared offset
    (anisotropy) with a few large outlier dimensions."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, size, generator=gen) + torch.randn(size, generator=gen)
    hidden[..., :2] *= 20
    return hidden


def _activate(pooling: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter non-zero random values, as after training (init zeroes two layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pooling.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)


MIXED_MASK = torch.tensor([[1] * 10, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1] * 10])


@pytest.mark.parametrize("prefix", [None, torch.tensor([0, 3, 2, 6])])
def test_latent_attention_starts_as_mean_pooling(prefix):
    hidden = _llm_like_hidden(4, 10, 64)
    latent = build_pooling("latent_attention", 64, num_latents=32)(hidden, MIXED_MASK, prefix)
    mean = build_pooling("mean", 64)(hidden, MIXED_MASK, prefix)
    assert torch.nn.functional.cosine_similarity(latent, mean, dim=-1).min() > 0.99
    assert ((latent - mean).norm(dim=-1) / mean.norm(dim=-1)).max() < 0.05


def test_latent_attention_trained_ignores_padding_and_instruction_tokens():
    pool = build_pooling("latent_attention", 64, num_latents=32, num_heads=4)
    _activate(pool)
    hidden, prefix = _llm_like_hidden(4, 10, 64), torch.tensor([0, 3, 2, 6])
    out = pool(hidden, MIXED_MASK, prefix)
    # the layer is active: no longer plain mean pooling once its weights are non-zero
    mean = build_pooling("mean", 64)(hidden, MIXED_MASK, prefix)
    assert ((out - mean).norm(dim=-1) / mean.norm(dim=-1)).min() > 0.01
    # pad positions may hold anything (even NaN) without changing the output
    garbage = hidden.masked_fill(MIXED_MASK.unsqueeze(-1) == 0, float("nan"))
    assert torch.equal(pool(garbage, MIXED_MASK, prefix), out)
    # each text alone, unpadded, gives the same vector
    for row in range(4):
        real = MIXED_MASK[row].bool()
        alone = pool(hidden[row:row + 1, real], torch.ones(1, int(real.sum())), prefix[row:row + 1])
        assert torch.allclose(alone[0], out[row], atol=1e-5), row
    # instruction tokens are left out of the mean (tokens attend only to the latents, never to each other)
    changed = hidden.clone()
    changed[1, 3:6] += 100.0  # the 3 instruction tokens of the left-padded row
    assert torch.allclose(pool(changed, MIXED_MASK, prefix), out, atol=1e-5)


@pytest.mark.parametrize("field", ["num_latents", "num_heads"])
@pytest.mark.parametrize("value", [0, -2])
def test_latent_attention_bad_sizes(field, value):
    with pytest.raises(UserError, match=rf"^latent_attention pooling: {field} must be an integer >= 1, got {value}\.$"):
        build_pooling("latent_attention", 64, **{field: value})


def test_latent_attention_nv_embed_layout_and_trained_round_trip(tiny_model, tmp_path):
    emb = Embedder.from_pretrained(str(tiny_model), pooling="latent_attention",
                                   pooling_kwargs={"num_latents": 16, "num_heads": 4})
    # NV-Embed's LatentAttentionModel parameter names (modeling_nvembed.py)
    shapes = {k: tuple(v.shape) for k, v in emb.pooling.state_dict().items()}
    assert shapes == {
        "latents": (16, 64),
        "cross_attend_blocks.0.norm.weight": (64,), "cross_attend_blocks.0.norm.bias": (64,),
        "cross_attend_blocks.0.norm_context.weight": (64,), "cross_attend_blocks.0.norm_context.bias": (64,),
        "cross_attend_blocks.0.fn.to_q.weight": (64, 64), "cross_attend_blocks.0.fn.to_kv.weight": (128, 64),
        "cross_attend_blocks.0.fn.to_out.weight": (64, 64),
        "cross_attend_blocks.1.norm.weight": (64,), "cross_attend_blocks.1.norm.bias": (64,),
        "cross_attend_blocks.1.fn.net.0.weight": (512, 64), "cross_attend_blocks.1.fn.net.0.bias": (512,),
        "cross_attend_blocks.1.fn.net.2.weight": (64, 256), "cross_attend_blocks.1.fn.net.2.bias": (64,),
    }
    # trained (non-zero) weights survive save / load: at init the layer is mean pooling whatever is loaded
    _activate(emb.pooling)
    before = emb.encode(TEXTS, batch_size=4)
    emb.save(tmp_path / "m")
    again = Embedder.from_pretrained(str(tmp_path / "m"))
    assert again.config.pooling_kwargs == {"num_latents": 16, "num_heads": 4}
    assert np.abs(again.encode(TEXTS, batch_size=4) - before).max() < 1e-5
    alone = np.stack([again.encode([t])[0] for t in TEXTS])
    assert np.abs(alone - before).max() < 1e-5
