"""Gradient-cached step (GradCache): the parameter gradients equal the uncached step's — hard negatives,
Matryoshka, spread-out, LoRA, a multi-vector head, uneven chunks — and dropout is replayed per chunk; a
short training run with the cache ends where the uncached run ends."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from llm2emb.train import grad_cache
from llm2emb.train.encode import EncodedBatch
from llm2emb.train.grad_cache import GradCachedStep, largest_side, split_pieces
from test_train_support import prepare_data, quick_overrides, read_metrics, trainable_state, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS, K = 7, 2


def _setup(tiny_model: Path, **fields):
    from llm2emb.losses.representation import objective_for_config
    from llm2emb.train.trainer import build_embedder, build_encoder

    values = {"model_path": str(tiny_model), "experiment_id": "e", "train_data_path": "d",
              "pooling_mode": "mean", "lora_enabled": True, "lora_dropout": 0.0, "max_seq_length": 32, **fields}
    cfg = load_train_config(None, **values)
    torch.manual_seed(0)
    embedder = build_embedder(cfg)
    return embedder, build_encoder(embedder), objective_for_config(cfg)


def _batch(embedder, rows: int = ROWS, k: int = K) -> EncodedBatch:
    rng = random.Random(3)

    def texts(n):
        return [[rng.randrange(5, 200) for _ in range(rng.randrange(3, 12))] + [2] for _ in range(n)]
    queries, passages, negatives = texts(rows), texts(rows), texts(rows * k)
    return EncodedBatch(embedder.collate(queries, [1] * rows), embedder.collate(passages),
                        embedder.collate(negatives), k, True, "d", rows)


def _gradients(encoder, objective, encoded, chunk: int | None, seed: int = 11) -> dict[str, torch.Tensor]:
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if chunk is None:
        q, p, n = encoder(encoded)
        objective(q, p, n, True).total.backward()
    else:
        step = GradCachedStep(encoder, encoded, chunk)
        q, p, n = step.embed()
        step.backward(objective(q, p, n, True).total, lambda loss: loss.backward())
    return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.requires_grad}


def _assert_equal_grads(cached: dict, plain: dict) -> None:
    assert cached.keys() == plain.keys() and plain
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:  # float summation order differs (chunked matmuls): tolerance relative to the tensor's scale
        scale = float(plain[name].abs().max())
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)


def test_pieces_cut_each_side_into_chunks_of_texts(tiny_model):
    embedder, _, _ = _setup(tiny_model)
    encoded = _batch(embedder)
    pieces = split_pieces(encoded, 3)
    assert [(p.side, p.start, p.stop) for p in pieces] == [
        (0, 0, 3), (0, 3, 6), (0, 6, 7), (1, 0, 3), (1, 3, 6), (1, 6, 7),
        (2, 0, 3), (2, 3, 6), (2, 6, 9), (2, 9, 12), (2, 12, 14)]
    negatives = torch.cat([p.batch.queries["input_ids"] for p in pieces if p.side == 2])
    assert torch.equal(negatives, encoded.negatives["input_ids"])
    assert all(p.batch.passages is None and p.batch.negatives is None for p in pieces)
    assert torch.equal(pieces[2].batch.queries["prefix_lengths"], encoded.queries["prefix_lengths"][6:])
    assert largest_side(encoded) == ROWS * K


@pytest.mark.parametrize("fields", [
    {},
    {"mrl_enabled": True, "mrl_dims": [16, 32], "spread_enabled": True, "spread_weight": 0.1},
    {"pooling_mode": "eos", "lora_enabled": False, "bi_attn_enabled": True},
    {"representation": "multi_vector", "token_dim": 16},
], ids=["lora_mean", "mrl_spread", "full_weights_bi_eos", "multi_vector"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_cached_gradients_equal_the_uncached_step(tiny_model, fields, chunk):
    embedder, encoder, objective = _setup(tiny_model, **fields)
    encoded = _batch(embedder)
    _assert_equal_grads(_gradients(encoder, objective, encoded, chunk), _gradients(encoder, objective, encoded, None))


def test_dropout_is_replayed_in_the_second_pass(tiny_model, monkeypatch):
    """One chunk per side = the uncached step's forward order (queries, positives, negatives), so with dropout
    on the gradients are equal only if each re-run draws the masks of its first run."""
    embedder, encoder, objective = _setup(tiny_model, lora_dropout=0.3)
    encoded = _batch(embedder)
    plain = _gradients(encoder, objective, encoded, None)
    _assert_equal_grads(_gradients(encoder, objective, encoded, ROWS * K), plain)
    monkeypatch.setattr(grad_cache.RandomState, "restore", lambda self: None)
    unreplayed = _gradients(encoder, objective, encoded, ROWS * K)
    assert any(not torch.allclose(unreplayed[k], plain[k], rtol=1e-3, atol=1e-6) for k in plain)


def test_bad_chunk_size_is_a_user_error():
    with pytest.raises(UserError, match="field 'grad_cache_chunk_size' must be >= 0"):
        load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", grad_cache_chunk_size=-1)


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


def test_training_with_the_cache_ends_where_the_uncached_run_ends(tiny_model, prepared, tmp_path):
    from llm2emb.train import train

    finals = {}
    for chunk in (0, 3):
        out = tmp_path / f"chunk{chunk}"
        overrides = quick_overrides(tiny_model, prepared, out, steps=3, lora_enabled=True, lora_dropout=0.0,
                                    pooling_mode="mean", mrl_enabled=True, mrl_dims=[16, 32],
                                    grad_cache_chunk_size=chunk, validation_steps=3, checkpointing_steps=0)
        cfg = load_train_config(None, overrides)
        train(cfg, show_progress=False)
        run = out / "runs" / "exp"
        finals[chunk] = (trainable_state(run / "final"), [m for m in read_metrics(run) if m["type"] != "info"])
    (w0, m0), (w3, m3) = finals[0], finals[3]
    assert [m["type"] for m in m0] == [m["type"] for m in m3] and any(m["type"] == "validation" for m in m3)
    for a, b in zip(m0, m3):
        assert a.get("loss") == pytest.approx(b.get("loss"), rel=1e-4)
    assert w0.keys() == w3.keys()
    assert all(torch.allclose(w0[k], w3[k], atol=1e-5) for k in w0)


def test_the_synchronised_backward_is_the_last_piece_with_gradients(tiny_model, monkeypatch):
    """A loss that ignores the hard negatives leaves their pieces (the last ones) without gradients: the
    gradient all-reduce (the piece outside `no_sync`) must run with the last backward that exists, else DDP
    waits for a reduction that never comes and fails at the next step."""
    import contextlib

    embedder, encoder, _ = _setup(tiny_model)
    encoded = _batch(embedder)

    def loss_of(q, p, n):   # in-batch only: n is embedded but unused
        return -(torch.nn.functional.normalize(q, dim=-1) * torch.nn.functional.normalize(p, dim=-1)).sum()

    state = {"sync": True}
    events: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def no_sync():
        state["sync"] = False
        try:
            yield
        finally:
            state["sync"] = True

    real_backward, real_forward = torch.autograd.backward, type(encoder).forward

    def backward(*args, **kwargs):
        events.append(("backward", state["sync"]))
        return real_backward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        events.append(("forward", state["sync"] and torch.is_grad_enabled()))
        return real_forward(self, *args, **kwargs)

    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    q, p, n = encoder(encoded)
    loss_of(q, p, n).backward()
    plain = {name: t.grad.clone() for name, t in encoder.named_parameters() if t.requires_grad}

    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    step = GradCachedStep(encoder, encoded, 4)
    q, p, n = step.embed()
    monkeypatch.setattr(torch.autograd, "backward", backward)
    monkeypatch.setattr(type(encoder), "forward", forward)
    step.backward(loss_of(q, p, n), lambda loss: loss.backward(), no_sync)
    monkeypatch.undo()
    backwards = [synced for kind, synced in events if kind == "backward"][1:]   # [0]: the loss to the leaves
    synced_forwards = [i for i, (kind, synced) in enumerate(events) if kind == "forward" and synced]
    assert backwards[-1] is True and backwards.count(True) == 1       # the all-reduce rides on the last backward
    assert len(synced_forwards) == 1 and events[synced_forwards[0] + 1] == ("backward", True)
    _assert_equal_grads({name: t.grad.clone() for name, t in encoder.named_parameters() if t.requires_grad}, plain)
