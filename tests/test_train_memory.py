"""The activation-memory estimate and `gradient_checkpointing_auto`: the formula against hand arithmetic, the
passes a step keeps alive (with and without the gradient cache), the decision, and a run that turns
checkpointing on when told memory is short (same weights as without it) and leaves it off otherwise."""
from __future__ import annotations

import pytest
import torch

from llm2emb.config import load_train_config
from llm2emb.train import memory
from llm2emb.train.memory import ModelShape, activation_bytes, auto_checkpointing, forward_passes
from test_train_support import prepare_data, quick_overrides, trainable_state, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = ModelShape(layers=30, hidden=576, heads=9)  # SmolLM2-135M


def test_estimate_is_korthikantis_formula():
    passes = [(16, 256), (16, 256)]
    per_layer_token = 34 + 5 * 9 * 256 / 576                       # bytes per hidden unit at 2-byte precision
    expected = 30 * 2 * 16 * 256 * 576 * per_layer_token * 4 / 2    # fp32: twice the 2-byte figure
    assert activation_bytes(SHAPE, passes, 4, scores=True) == int(expected)
    assert activation_bytes(SHAPE, passes, 2, scores=False) == int(30 * 2 * 16 * 256 * 576 * 34)
    # checkpointing: every layer's input plus one layer's activations
    one_layer = expected / 30
    assert activation_bytes(SHAPE, passes, 4, scores=True, checkpointing=True) == int(
        30 * 2 * 16 * 256 * 576 * 4 + one_layer)
    # the CPU measurement it was checked against (bench/results/train_memory.json: 15.1 GiB peak RSS)
    assert 13 < activation_bytes(SHAPE, passes, 4, scores=True) / memory.GIB < 15.1


def test_passes_alive_together():
    assert forward_passes(8, 32, 64, 3) == [(8, 32), (8, 64), (24, 64)]
    assert forward_passes(8, 32, 64, 0) == [(8, 32), (8, 64)]
    assert forward_passes(8, 32, 64, 3, chunk=4) == [(4, 64)]      # gradient cache: one chunk at a time


def test_decision_against_free_memory():
    passes = forward_passes(16, 256, 256, 0)
    need = activation_bytes(SHAPE, passes, 4, scores=True)
    cpu = torch.device("cpu")
    on, why = auto_checkpointing(SHAPE, passes, 4, "sdpa", cpu, free=int(need / 0.8) + 1)
    assert not on and "left off" in why
    on, why = auto_checkpointing(SHAPE, passes, 4, "sdpa", cpu, free=int(need / 0.8) - 1)
    assert on and "turned on" in why and "GiB with it" in why



def test_unknown_free_memory_leaves_it_off(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)
    on, why = auto_checkpointing(SHAPE, forward_passes(16, 256, 256, 0), 4, "sdpa", torch.device("cpu"))
    assert not on and "free memory unknown" in why


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


def test_a_run_short_of_memory_turns_it_on_with_the_same_result(tiny_model, prepared, tmp_path, monkeypatch):
    from llm2emb.train import Trainer, train

    enabled = []
    real_setup = Trainer.setup

    def setup(self):
        done = real_setup(self)
        enabled.append(bool(self.embedder.backbone.is_activation_checkpointing))
        return done

    monkeypatch.setattr(Trainer, "setup", setup)
    finals = []
    for name, free in (("roomy", 10 ** 12), ("short", 1024)):
        monkeypatch.setattr(memory, "free_bytes", lambda device, free=free: free)
        cfg = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path, experiment=name, steps=2,
                                                      lora_enabled=True, lora_dropout=0.0, pooling_mode="mean",
                                                      checkpointing_steps=0, validation_steps=0))
        train(cfg, show_progress=False)
        finals.append(trainable_state(cfg.run_dir / "final"))
    assert enabled == [False, True]
    assert all(torch.allclose(finals[0][k], finals[1][k], atol=1e-6) for k in finals[0])
    # switched off: never turned on, however short memory is
    cfg = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path, experiment="off", steps=1,
                                                  gradient_checkpointing_auto=False, checkpointing_steps=0,
                                                  validation_steps=0))
    train(cfg, show_progress=False)
    assert enabled[-1] is False
